"""The adapter library on held-out CLINC150 domains: fresh LoRA vs a LoraHub-style composed init
vs a generated init vs Arrow routing (issue 19), optionally vs a meta-init.

Library: built only from the 8 meta-train domains (the CLINC150 train split minus banking and
travel): ``--per-domain`` 5-way episodes of each domain (``--build-shots`` per class), each a
fresh LoRA trained ``--build-steps`` steps and kept with its task profile
(``api.library_build``). Then ``--warm-tasks`` compositions on more meta-train-domain
episodes fill the store of past compositions that warm-starts the search, and the LoRA generator
is trained on the library (``metapeft.generate``).

Evaluation: ``--tasks`` 5-way 5-shot episodes of the *test* split of banking + travel (10 query
examples per class), every arm adapted with Adam at LoRA's default lr, query accuracy at steps
0/1/5/10:

* fresh: B = 0 (step 0 is the base model's zero-shot rank classification);
* compose: ``adapt --init library:compose`` (K = 5 nearest, 20 GP trials on the support loss);
* generate: ``adapt --init library:generate`` (the generator's LoRA for the task's embedding);
* route: ``adapt --route arrow``; its step 0 is Arrow's per-token routed model (training-free),
  steps 1+ train from the merged mixture (its own step 0 is reported as "route, merged");
* meta (``--meta-init NAME@V`` or a file): a registry init, at its calibrated lr;
* compose-meta (with ``--meta-init``): ``library:compose:K+INIT``, the meta-init as one more
  member (the search also starts from it alone), adapted at the meta-init's calibrated lr;
* merge-meta (with ``--meta-init``): ``library:merge:K+INIT``, the K members' updates merged
  exactly (Σ wᵢ·ΔWᵢ) into a frozen copy of the model and the meta-init's own factors trained
  on top, at its calibrated lr (the search starts from w = 0, the meta-init alone);
* generate-e2e (``--e2e-steps N``): the same generator (same seed, same reconstruction stage)
  then fine-tuned end to end for N steps on the query loss of its LoRAs over 5-way 5-shot
  episodes of the meta-train domains (``library train-generator --e2e-steps``, ``--e2e-inner-steps
  K`` support steps first); ``generate`` is then the reconstruction-only version. With
  ``--e2e-anchor FILE`` (a meta-init whose header carries its calibrated step size) it is a
  residual on that init instead (``library train-generator --anchor``: no reconstruction, every
  task starts at the init until the e2e steps train the residual, adapted at the init's step
  size); ``--e2e-algorithm reptile`` trains it with Reptile's direction (needs
  ``--e2e-inner-steps`` ≥ 1).

``--arms`` runs a subset of the arms, ``--marks`` sets the evaluated steps (default 0,1,5,10).

``--calibrate N`` first chooses the step size of the compose arms (``library calibrate``:
``compose.calibrate_step_size``) on N episodes (seeds 70000 + i) of the library's domains in
``--calibrate-split`` (default val: on CLINC150 neither the test split nor the library's rows),
and keeps it in the library, so that every shard's ``adapt`` trains the mixtures at it; each
compose row records the ``step_size`` it ran at; for the merge-meta arm it chooses the merge's
weight bound instead (``compose.calibrate_merge_bound``), unless ``--merge-bound B`` gives it
(a bound chosen elsewhere: on CLINC150's validation tasks, then used unchanged on WordNet).
Each merge row records the ``bound`` it ran at. (``metapeft library calibrate --processes 2``
does the same on two cores, into a ``--registry`` the shards then reuse.)

Sharding and pairing with the meta-init table: ``--task-seed 30000`` samples the same test tasks
as ``meta_clinc.py`` (task i is episode seed 30000 + i there); ``--pair-with RUN.json`` (a
``meta_clinc.py --json`` run on the same tasks) then adds its ``fresh``, ``meta`` and
``multitask`` curves (same adapter, LoRA's default lr, meta/multitask at their calibrated lrs) as
arms of this table, task by task, when this run does not run them itself. ``--shard I/N`` runs
tasks i ≡ I (mod N) (every shard after the build: ``--registry`` the built library),
``--resume`` keeps the tasks already in ``--json`` (written after every task), and ``--merge
A.json,B.json`` prints the table of shards' runs together.

``--library-domains banking,travel`` builds the library from the test domains' *train* split
instead: past tasks that share the test tasks' classes but none of their texts, the library a
user who adapts task after task in one domain accumulates. ``--data DIR --held-out DOMAINS`` runs
the same on another corpus in CLINC150's layout (benchmarks/wordnet_tasks.py's: ``--held-out
verb``).

Compositions found on the held-out tasks are not recorded (``adapt(record_composition=False)``):
each task sees the store as the build left it, so the tasks stay independent and shards can
share one registry. (Runs before this reset the store before every task instead, which needed
one registry per process.) Paired differences are per task.

    uv run python benchmarks/library_clinc.py --tasks 60               # stories260K
    uv run python benchmarks/library_clinc.py --smol --tasks 100       # SmolLM2-135M
    # SmolLM2, build once, then two shards paired with meta_clinc.py's run on the same tasks:
    uv run python benchmarks/library_clinc.py --smol --registry LIB --tasks 0 \
        --per-domain 4 --build-steps 20 --build-shots 5
    uv run python benchmarks/library_clinc.py --smol --registry LIB --tasks 100 --task-seed 30000 \
        --arms compose,generate,route --pair-with meta100.json --shard 0/2 --json a.json  # and 1/2
    uv run python benchmarks/library_clinc.py --merge a.json,b.json --pair-with meta100.json
    uv run python benchmarks/library_clinc.py --per-domain 1 --warm-tasks 0 --e2e-steps 30 \
        --arms generate,generate-e2e --marks 0,1,5 --tasks 30               # e2e vs reconstruction
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import (CLINC, HELD_OUT_DOMAINS, SMOL, STORIES, bad_input, clinc_pool, fmt, mean_ci,
                     require, write_json)

STEPS = (0, 1, 5, 10)
BUILD_INFO = "library_clinc_build.json"  # in the registry: what building the library cost


def build_library(args, registry: str) -> dict:
    from metapeft import api

    domains = library_domains(args)
    t0 = time.perf_counter()
    rows = []
    for j, d in enumerate(domains):
        res = api.library_build(Path(args.data) / "train.jsonl", model=args.model,
                                tasks=args.per_domain, steps=args.build_steps, ways=5,
                                shots=args.build_shots, query=10, seed=1000 * (j + 1),
                                domains=[d], registry=registry)
        rows += res.tasks
        print(f"  {d}: {res.added} adapters, mean score "
              f"{sum(r['final_accuracy'] for r in res.tasks) / len(res.tasks):.1%}", flush=True)
    info = {"domains": domains, "adapters": len(rows),
            "build_seconds": round(time.perf_counter() - t0, 1),
            "mean_library_score": sum(r["final_accuracy"] for r in rows) / len(rows)}
    return {**info, **finish_library(args, registry, domains)}


def finish_library(args, registry: str, domains: list[str]) -> dict:
    """After the entries: ``--warm-tasks`` past compositions on more episodes of the library's
    domains (what the search on a new task warm-starts from), the generator, and the e2e one."""
    from metapeft import library
    from metapeft.adapt import adapt
    from metapeft.data.episodes import EpisodeSource

    source = EpisodeSource(clinc_pool("train", domains=domains, root=args.data), ways=5, shots=5,
                           query=10, name="clinc-train")
    t1 = time.perf_counter()
    for i in range(args.warm_tasks):
        os.environ["METAPEFT_HOME"] = registry
        adapt(source.sample(50_000 + i), model=args.model, steps=0, init="library:compose",
              target=None)
    warm_s = time.perf_counter() - t1
    from metapeft.adapters import get_adapter_class
    from metapeft.generate import train_generator
    from metapeft.models import load_base_model

    gen = train_generator(get_adapter_class("lora").attach(load_base_model(args.model), {}),
                          registry=registry, seed=args.seed)
    info = {"warm_compositions": args.warm_tasks, "warm_seconds": round(warm_s, 1),
            "generator_seconds": gen["seconds"], "generator_loss": gen["final_loss"],
            "generator_version": gen["version"], "disk_bytes": library.disk_bytes(registry)}
    return {**info, **train_e2e(args, registry)}


def corpus_domains(data: Path) -> list[str]:
    """A corpus's domains: its ``domains.json`` (CLINC150's order), else those of its train rows."""
    if (data / "domains.json").exists():
        return json.loads((data / "domains.json").read_text())
    return sorted({r.extra.get("domain") for r in clinc_pool("train", root=data)} - {None})


def check_domains(flag: str, domains: list[str], args) -> list[str]:
    """``domains`` if the corpus has them all; else one line naming the first unknown, exit 2."""
    unknown = [d for d in domains if d not in args.all_domains]
    if unknown:
        bad_input(f"{flag}: unknown domain {unknown[0]!r} "
                  f"({Path(args.data).name} has {', '.join(args.all_domains)})")
    return domains


def library_domains(args) -> list[str]:
    """The domains whose *train* split the library is built from: the 8 meta-train domains, or
    ``--library-domains`` (e.g. banking,travel: past tasks of the test domains, on other rows)."""
    if not args.library_domains:
        return [d for d in args.all_domains if d not in args.held_out_list]
    return check_domains("--library-domains", args.library_domains.split(","), args)


def train_e2e(args, registry: str) -> dict:
    """The end-to-end generator (same seed and reconstruction, then ``--e2e-steps``) on 5-way
    5-shot episodes of the meta-train domains; {} without ``--e2e-steps``."""
    if not args.e2e_steps:
        return {}
    from metapeft.adapters import get_adapter_class
    from metapeft.generate import E2E, train_generator
    from metapeft.models import load_base_model

    gen = train_generator(
        get_adapter_class("lora").attach(load_base_model(args.model), {}), registry=registry,
        seed=args.seed, anchor=args.e2e_anchor,
        e2e=E2E(steps=args.e2e_steps, inner_steps=args.e2e_inner_steps, lr=args.e2e_lr,
                algorithm=args.e2e_algorithm, val_episodes=args.e2e_val_episodes,
                data=str(Path(args.data) / "train.jsonl"), exclude_domains=args.held_out_list,
                ways=5, shots=5, query=10))
    s = gen["training"]["e2e"]
    print(f"  e2e generator v{gen['version']}: {s['tasks']} episodes of {s['classes']} "
          f"meta-train classes, query loss {s['query_loss_first']:.3f} -> "
          f"{s['query_loss_last']:.3f} (on {s['validation']['episodes']} held-out episodes "
          f"{s['validation']['query_loss_before']:.3f} -> "
          f"{s['validation']['query_loss_after']:.3f}), {s['seconds']:.0f} s", flush=True)
    return {"e2e_version": gen["version"], "e2e_seconds": s["seconds"], "e2e": s}


def versions(registry: str) -> dict:
    """The newest reconstruction-only and end-to-end generator versions in a reused library."""
    from metapeft.artifacts import json_field, read_metadata
    from metapeft.generate import generators_dir

    out = {}
    for p in sorted(generators_dir(registry).glob("v*.safetensors")):
        meta = read_metadata(p)
        e2e = (json_field(meta, "training") or {}).get("e2e_steps", 0)
        out["e2e_version" if e2e else "generator_version"] = int(meta["version"])
    return out


def trial_line(row: dict) -> str:
    """One calibration candidate's accuracies at its marks and their mean."""
    if row.get("diverged"):
        return "diverged"
    steps = " ".join(f"@{k} {v:.1%}" for k, v in row.items() if k.isdigit())
    return f"{steps}, mean {row['mean']:.1%}"


def calibrate(args, registry: str) -> None:
    """``--calibrate N``: the step size of each compose arm, chosen on N episodes of the
    library's domains in ``--calibrate-split`` (``api.library_calibrate``; seeds 70000 + i)."""
    from metapeft import api

    specs = ([f"library:compose:{args.k}"] if "compose" in args.arm_list else []) + (
        [f"library:compose:{args.k}+{args.meta_init}"] if "compose-meta" in args.arm_list else [])
    pool = Path(args.data) / f"{args.calibrate_split}.jsonl"
    factors, decays = args.calibrate_grid
    if "merge-meta" in args.arm_list and args.merge_bound is None and args.merge_lr_factor is None:
        rec = api.library_calibrate(
            pool, init=f"library:merge:{args.k}+{args.meta_init}", model=args.model,
            tasks=args.calibrate, seed=70_000, domains=library_domains(args), registry=registry,
            factors=factors,
            on_task=lambda i, reps: print(f"  calibration task {i}: " + "; ".join(
                f"bound {b:g} weights {r['weights']}" for b, r in reps.items()), flush=True),
            on_trial=lambda key, row: print(f"  bound {key}: {trial_line(row)}", flush=True))
        print(f"  {rec['key']}: bound {rec['merge_bound']:g}, lr x{rec['merge_lr_factor']:g} "
              f"({rec['seconds']:.0f} s)", flush=True)
    for spec in specs:
        rec = api.library_calibrate(
            pool, init=spec, model=args.model, tasks=args.calibrate, seed=70_000,
            domains=library_domains(args), registry=registry,
            factors=factors, decays=decays,
            on_task=lambda i, rep: print(f"  calibration task {i}: weights {rep['weights']}",
                                         flush=True),
            on_trial=lambda key, row: print(f"  x{key}: {trial_line(row)}", flush=True))
        print(f"  {rec['key']}: lr {rec['adapt_lr']:g} decay {rec['adapt_lr_decay']:g} "
              f"({rec['seconds']:.0f} s)", flush=True)


def run_task(args, task) -> dict:
    from metapeft.adapt import adapt

    out = {}
    arms = [("fresh", {}), ("compose", {"init": f"library:compose:{args.k}"}),
            ("generate", {"init": "library:generate" + (f"@{args.gen_version}"
                                                         if args.gen_version else "")}),
            ("route", {"route": "arrow"})]
    if args.meta_init:
        arms.append(("meta", {"init": args.meta_init}))
        arms.append(("compose-meta", {"init": f"library:compose:{args.k}+{args.meta_init}"}))
        arms.append(("merge-meta", {"init": f"library:merge:{args.k}+{args.meta_init}",
                                    "merge_bound": args.merge_bound,
                                    "merge_lr_factor": args.merge_lr_factor}))
    if args.e2e_version:
        arms.append(("generate-e2e", {"init": f"library:generate@{args.e2e_version}"}))
    for name, kw in arms:
        if name not in args.arm_list:
            continue
        t0 = time.perf_counter()
        # record_composition=False: the store stays as the build left it, so every task sees
        # the same warm starts and shards can share one registry
        r = adapt(task, model=args.model, method="lora", steps=max(STEPS), target=None,
                  eval_at=set(STEPS), seed=args.seed, record_composition=False, **kw)
        row = {"acc": list(r.accuracies), "seconds": time.perf_counter() - t0}
        if name.startswith(("compose", "merge")):
            c = r.extra["composition"]
            row.update(search_seconds=c["search_seconds"], weights=c["weights"],
                       members=[m["id"] for m in c["members"]], warm=c["warm_points"],
                       loss=c["support_loss"], uniform=c.get("objective_uniform"),
                       objective_init=c.get("objective_init"),
                       objective=c["objective"], step_size=c.get("step_size"),
                       **({"bound": c["bound"], "bound_source": c["bound_source"],
                           "lr_factor": c.get("lr_factor", 1.0)}
                          if "bound" in c else {}))
        if name == "route":
            rt = r.extra["route"]
            row.update(merged0=row["acc"][0], routed0=rt["routed_accuracy"],
                       route_seconds=rt["seconds"])
            row["acc"] = [rt["routed_accuracy"]] + row["acc"][1:]
        out[name] = row
    return out


def table(results: list[dict], arms: list[str]) -> list[str]:
    lines = ["| arm | " + " | ".join(f"step {s}" for s in STEPS) + " |",
             "|---|" + "---:|" * len(STEPS)]
    for a in arms:
        lines.append(f"| {a} | " + " | ".join(fmt([r[a]["acc"][i] for r in results])
                                              for i in range(len(STEPS))) + " |")
    if "route" in arms:
        lines.append("| route, merged (its own step 0) | " + fmt([r["route"]["merged0"]
                                                                for r in results]) +
                     " |" + " |" * (len(STEPS) - 1))
    lines += ["", "| paired difference (points) | " + " | ".join(f"step {s}" for s in STEPS)
              + " |", "|---|" + "---:|" * len(STEPS)]
    pairs = [("compose", "fresh"), ("generate", "fresh"), ("route", "fresh"),
             ("compose", "route"), ("compose", "generate")]
    if "meta" in arms:
        pairs += [("compose", "meta"), ("generate", "meta"), ("route", "meta"),
                  ("compose-meta", "meta"), ("compose-meta", "compose"),
                  ("merge-meta", "meta"), ("merge-meta", "compose-meta")]
    if "multitask" in arms:
        pairs += [("compose", "multitask"), ("generate", "multitask"),
                  ("compose-meta", "multitask")]
    pairs += [("generate-e2e", "generate"), ("generate-e2e", "fresh"),
              ("generate-e2e", "meta"), ("generate-e2e", "multitask")]
    for a, b in pairs:
        if a not in arms or b not in arms:
            continue
        cells = []
        for i in range(len(STEPS)):
            m, c = mean_ci([r[a]["acc"][i] - r[b]["acc"][i] for r in results])
            cells.append(f"{100 * m:+.1f} ± {100 * c:.1f}")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return lines


PAIRABLE = ("fresh", "meta", "multitask")  # arms a meta_clinc.py run holds per task
DEFAULTS = {"data": str(CLINC), "held_out": ",".join(HELD_OUT_DOMAINS)}  # of runs before --data


def pair_with(results: list[dict], path: str | None, arms: list[str]) -> list[str]:
    """Add the curves of a ``meta_clinc.py`` run on the same tasks (by task index) as arms this
    run did not run itself; returns the arm list with them."""
    if not path:
        return arms
    records = {r["i"]: r for r in json.loads(Path(path).read_text())["records"]}
    missing = [r["i"] for r in results if r["i"] not in records]
    if missing:
        bad_input(f"{path}: no record for tasks {missing[:5]} (run it with --tasks >= "
                  f"{max(missing) + 1})")
    added = [a for a in PAIRABLE if a not in arms and all(
        a in records[r["i"]]["acc"] for r in results)]
    for r in results:
        for a in added:
            curve = records[r["i"]]["acc"][a]
            r[a] = {"acc": [curve[str(s)] for s in STEPS], "from": path}
    return arms + added


def summary(results: list[dict], info: dict, arms: list[str], args, load: str) -> list[str]:
    lines = table(results, arms)
    ran = [a for a in arms if "from" not in results[0][a]]
    composed = next((a for a in ("compose", "compose-meta", "merge-meta") if a in ran), None)
    search = [r[composed]["search_seconds"] for r in results] if composed else [0]
    first = ran[0]  # a run's seconds per step (evaluations included)
    step_s = [r[first]["seconds"] / max(STEPS) for r in results]
    paired = [a for a in arms if a not in ran]
    lines += ["", f"{len(results)} held-out tasks ({args.held_out}, 5-way 5-shot, "
              f"10 query per class; episode seeds {args.task_seed} + i), model "
              f"{Path(args.model).name}; library: "
              + (f"{info['adapters']} LoRAs from the train split of "
                 f"{', '.join(info.get('domains', ['?']))} (other texts than the test tasks'), "
                 if args.library_domains else
                 f"{info['adapters']} LoRAs from {len(info.get('domains', [])) or '?'} meta-train "
                 "domains, ")
              + f"{info['disk_bytes'] / 2**20:.2f} MiB, built in "
              f"{info.get('build_seconds', '?')} s (+{info.get('warm_seconds', 0)} s for "
              f"{info.get('warm_compositions', 0)} warm-start compositions, "
              f"+{info.get('generator_seconds', '?')} s to train the generator"
              + (f", +{info['e2e_seconds']:.0f} s for its {args.e2e_steps} end-to-end steps "
                 f"({info['e2e']['tasks']} episodes, {args.e2e_inner_steps} inner steps, "
                 f"{info['e2e'].get('algorithm', 'fomaml')}"
                 + (f", a residual on {args.e2e_anchor}" if args.e2e_anchor else "") + ")"
                 if info.get("e2e") else "") + "); "
              + (f"composition search ({composed}) {fmt(search, pct=False)} s per task; "
                 if composed else "")
              + f"a {first} run: {fmt(step_s, pct=False)} s per step incl. evaluation; "
              + (f"route build+score "
                 f"{fmt([r['route']['route_seconds'] for r in results], pct=False)} s; "
                 if "route" in ran else "")
              + (f"arms {', '.join(paired)} from {args.pair_with} (same tasks); "
                 if paired else "")
              + f"uptime at start: {load}; at end: "
              + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    return lines


def merge(args) -> None:
    """The table of several ``--json`` runs together (``--merge A,B``): shards of one run, or
    runs of other arms on the same tasks (each task's arms are joined; a task is kept when it
    has every arm)."""
    runs = [json.loads(Path(p).read_text()) for p in args.merge.split(",")]
    for k in ("task_seed", "model", "data", "held_out"):  # absent (older runs): CLINC150's
        if len({str(run["args"].get(k, DEFAULTS.get(k))) for run in runs}) > 1:
            bad_input(f"--merge: the runs differ in {k}; they are not the same tasks")
    global STEPS
    # merged files written before this kept no "steps": take them from a run that has them
    STEPS = tuple(next(run["args"]["steps"] for run in runs if "steps" in run["args"]))
    args.steps = list(STEPS)  # so that a merged file can be merged again
    arm_list, by_task = [], {}
    for run in runs:
        arm_list += [a for a in run["args"]["arm_list"] if a not in arm_list]
        for r in run["results"]:
            by_task.setdefault(r["i"], {}).update(r)
    results = sorted((r for r in by_task.values() if all(a in r for a in arm_list)),
                     key=lambda r: r["i"])
    # the run whose library figures to print: one with e2e figures, else the fullest build record
    main_run = next((run for run in runs if run["info"].get("e2e")),
                    max(runs, key=lambda run: len(run["info"])))
    # the merged record's args are that run's (build, marks, tasks), not this command's defaults;
    # keys it lacks (runs before --data) keep the defaults, which are CLINC150's
    for k, v in main_run["args"].items():
        if k not in ("merge", "json", "pair_with", "shard", "steps", "arm_list"):
            setattr(args, k, v)
    args.pair_with = args.pair_with or runs[0]["args"].get("pair_with")
    arms = pair_with(results, args.pair_with, arm_list)
    load = runs[0].get("load", "?")
    lines = summary(results, main_run["info"], arms, args, load)
    print("\n".join(lines))
    write_json(args.json, {"info": main_run["info"], "results": results, "table": lines,
                           "args": {**vars(args), "arm_list": arm_list},
                           "merged": args.merge.split(",")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(STORIES))
    ap.add_argument("--smol", action="store_true", help="SmolLM2-135M instead of stories260K")
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--task-seed", type=int, default=None,
                    help="task i is test episode seed TASK_SEED + i (default --seed; 30000 = the "
                         "tasks of meta_clinc.py)")
    ap.add_argument("--pair-with", help="a meta_clinc.py --json run on the same tasks: its fresh, "
                    "meta and multitask curves join the table as arms")
    ap.add_argument("--shard", default="0/1", help="I/N: run tasks i with i mod N == I")
    ap.add_argument("--resume", action="store_true", help="keep the tasks already in --json")
    ap.add_argument("--merge", help="A.json,B.json: print the table of shards' runs together")
    ap.add_argument("--per-domain", type=int, default=4, help="library adapters per domain")
    ap.add_argument("--data", default=str(CLINC), help="a corpus in CLINC150's layout "
                    "(train.jsonl, test.jsonl), e.g. benchmarks/wordnet_tasks.py's")
    ap.add_argument("--held-out", default=",".join(HELD_OUT_DOMAINS),
                    help="the test domains (default banking,travel)")
    ap.add_argument("--library-domains", help="build the library from these domains' train "
                    "split (default: the 8 meta-train domains; banking,travel: the test domains' "
                    "train rows, so past tasks share the test tasks' classes, not their texts)")
    ap.add_argument("--build-steps", type=int, default=30)
    ap.add_argument("--build-shots", type=int, default=10)
    ap.add_argument("--warm-tasks", type=int, default=8)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--meta-init", help="registry NAME@V of a meta-init (same registry)")
    ap.add_argument("--registry", help="reuse a built library here (default: a temp dir)")
    ap.add_argument("--time-budget", type=float, help="stop starting tasks after S seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--e2e-steps", type=int, default=0, help="also an end-to-end generator")
    ap.add_argument("--e2e-inner-steps", type=int, default=0)
    ap.add_argument("--e2e-lr", type=float, default=1e-4)
    ap.add_argument("--e2e-algorithm", default="fomaml", help="fomaml | maml | reptile")
    ap.add_argument("--e2e-val-episodes", type=int, default=8, help="fixed meta-train "
                    "episodes scored before and after the e2e stage")
    ap.add_argument("--e2e-anchor", help="a meta-init file: the e2e generator is a residual on "
                    "it (library train-generator --anchor)")
    ap.add_argument("--arms", help="comma-separated subset of fresh,compose,generate,route,"
                    "meta,generate-e2e (default: all that apply)")
    ap.add_argument("--marks", default="0,1,5,10", help="steps at which to evaluate")
    ap.add_argument("--calibrate", type=int, default=0, help="first choose the step size of the "
                    "compose arms (the merge arm's weight bound) on N past episodes of the "
                    "library's domains (--calibrate-split, never test) and keep it in the "
                    "library: adapt then uses it")
    ap.add_argument("--merge-bound", type=float, default=None, help="the merge-meta arm's "
                    "weight bound (default: the one calibrated in the library, else 1.5)")
    ap.add_argument("--merge-lr-factor", type=float, default=None, help="the merge-meta arm's "
                    "factor on INIT's lr (default: the one calibrated with the bound, else 1)")
    ap.add_argument("--calibrate-split", default="val", help="the split those episodes come from")
    ap.add_argument("--calibrate-factors", default=None, help="lr factors (default compose's; "
                    "for the merge-meta arm, factors on INIT's lr for the merged start, default 1)")
    ap.add_argument("--calibrate-decays", default=None, help="lr decays (default compose's)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.merge:
        return merge(args)
    global STEPS
    STEPS = tuple(sorted({int(x) for x in args.marks.split(",")}))
    args.steps = list(STEPS)
    if args.task_seed is None:
        args.task_seed = args.seed
    if args.smol:
        args.model = str(SMOL)
    require(Path(args.model), "the model")
    args.data = str(require(Path(args.data), "the task data"))
    args.all_domains = corpus_domains(Path(args.data))
    args.held_out_list = check_domains("--held-out", args.held_out.split(","), args)
    if args.calibrate:  # before anything is built: the split and the grids
        from metapeft.cli._common import parse_numbers
        from metapeft.errors import UserError

        if not (Path(args.data) / f"{args.calibrate_split}.jsonl").exists():
            bad_input(f"--calibrate-split: {Path(args.data).name} has no "
                      f"{args.calibrate_split}.jsonl")
        try:
            args.calibrate_grid = (
                parse_numbers(args.calibrate_factors, "calibrate_factors", positive=True),
                parse_numbers(args.calibrate_decays, "calibrate_decays", positive=False))
        except UserError as e:
            bad_input(e.one_line())
    import metapeft  # noqa: F401
    from metapeft import library
    from metapeft.data.episodes import EpisodeSource

    tmp = None
    registry = args.registry or (tmp := tempfile.mkdtemp(prefix="library-clinc-"))
    os.environ["METAPEFT_HOME"] = registry  # adapt's library and its experience records
    os.environ.setdefault("METAPEFT_EXPERIENCE", "off")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"model {Path(args.model).name}; registry {registry}; {load}", flush=True)
    built = Path(registry) / BUILD_INFO  # the build's own figures, for runs that reuse it
    if library.entries(registry):
        info = {**(json.loads(built.read_text()) if built.exists() else {}), "reused": True,
                "adapters": len(library.entries(registry)),
                "disk_bytes": library.disk_bytes(registry), **versions(registry)}
        if args.e2e_steps and "e2e_version" not in info:
            info.update(train_e2e(args, registry))
    else:
        info = build_library(args, registry)
        write_json(str(built), info)
    args.gen_version = info.get("generator_version")
    args.e2e_version = info.get("e2e_version") if args.e2e_steps else None
    every = ["fresh", "compose", "generate", "route"] \
        + (["meta", "compose-meta", "merge-meta"] if args.meta_init else []) \
        + (["generate-e2e"] if args.e2e_version else [])
    args.arm_list = every if not args.arms else [a for a in every if a in args.arms.split(",")]
    if args.calibrate:
        calibrate(args, registry)
    info["step_sizes"] = [{k: r.get(k) for k in ("key", "adapt_lr", "adapt_lr_decay", "num_tasks",
                                                 "seconds", "search_seconds", "table")}
                          for r in library.step_sizes(registry)]
    info["merge_bounds"] = [{k: r.get(k) for k in ("key", "merge_bound", "merge_lr_factor",
                                                   "margin", "num_tasks",
                                                   "marks", "tasks", "seconds", "search_seconds",
                                                   "table")}
                            for r in library.merge_bounds(registry)]
    print(json.dumps(info), flush=True)
    test = EpisodeSource(clinc_pool("test", domains=args.held_out_list, root=args.data), ways=5,
                         shots=5, query=10, name="clinc-test-held-out")
    shard, num_shards = (int(x) for x in args.shard.split("/"))
    mine = [i for i in range(args.tasks) if i % num_shards == shard]
    results = []
    if args.resume and args.json and Path(args.json).exists():
        results = [r for r in json.loads(Path(args.json).read_text())["results"] if r["i"] in mine]
        done = {r["i"] for r in results}
        mine = [i for i in mine if i not in done]
        print(f"resuming: {len(done)} tasks already in {args.json}, {len(mine)} to run", flush=True)
    t0 = time.perf_counter()
    for i in mine:
        if args.time_budget and time.perf_counter() - t0 > args.time_budget:
            break
        r = {"i": i, **run_task(args, test.sample(args.task_seed + i))}
        results.append(r)
        print(f"task {i}: " + "  ".join(f"{a} {' '.join(f'{x:.0%}' for x in r[a]['acc'])}"
                                         for a in args.arm_list), flush=True)
        write_json(args.json, {"info": info, "results": results, "args": vars(args),
                               "load": load})
    if results:
        arms = pair_with(results, args.pair_with, args.arm_list)
        lines = summary(results, info, arms, args, load)
        print("\n".join(lines))
        write_json(args.json, {"info": info, "results": results, "table": lines,
                               "args": vars(args), "load": load})
    if tmp and not args.registry:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

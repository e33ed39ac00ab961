"""Meta-learned init vs fresh init vs a multi-task-pretrained init, on held-out CLINC150 domains
(or another corpus's: ``--data DIR --held-out DOMAINS``, e.g. benchmarks/wordnet_tasks.py's).

Model: stories260K by default (`--model DIR` for any mlx-lm model, e.g. SmolLM2-135M). Meta-train: CLINC150 train split minus the held-out domains (banking, travel),
8 domains / 120 intents, of which a share of intents is kept aside for validation (early
stopping picks the best validation step). Meta-test: 5-way 5-shot episodes from the *test* split
of banking + travel only, so meta-test classes are disjoint from every class seen in training.
For each init we adapt every test task with the same optimizer (Adam, the method's default lr) and
report query accuracy after every step to 10 (and 15/20/30/50 on a subset), mean ± 95% CI, and
how many steps each init needs to reach the accuracy fresh init has after k steps.

    uv run python benchmarks/meta_clinc.py --tasks 200 --long-tasks 50     # full size

On 2 cores the evaluation can be split: build the inits once (``--tasks 0 --registry R
--multitask-weights M``), evaluate shards in parallel (``--meta-weights R/.../v0001.safetensors
--multitask-weights M --shard 0/2 --json a.json``, ``--shard 1/2 --json b.json``), then
``--merge a.json b.json`` prints the combined tables.
``--compare NEW.json OLD.json`` puts a run of some inits with new settings (``--inits meta
--calibrate-decays 0,1``, say) beside an earlier run on the same tasks, paired task by task: each
of NEW's inits (named ``<init>*``) minus every arm of OLD.

``--processes N`` runs the meta-training over MLX's distributed engine: it is handed to
``metapeft meta-train --processes N`` (N data-parallel ranks of MLX's ring backend on this
machine; the same θ as one process up to float rounding), with the settings and the
episode sources this script uses in-process; the evaluation that follows is unchanged.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _baselines import in_context_accuracy, logistic_regression_accuracy
from _common import (CLINC, HELD_OUT_DOMAINS, STORIES, bad_input, clinc_pool, fmt, mean_ci,
                     nearest_class_mean_accuracy, require, write_json)

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten


def _params_digest(params) -> str:
    """A short fingerprint of an init's weights: a calibration cached under --calibrate DIR
    belongs to the weights it was run on, and DIR/meta.json must not be reused for another
    meta init."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(tree_flatten(params), key=lambda kv: kv[0]):
        h.update(k.encode())
        h.update(np.array(v.astype(mx.float32)).tobytes())
    return h.hexdigest()[:16]


def launched_meta_train(args, registry: str):
    """The meta-training step as ``metapeft meta-train --processes N`` (ring backend): the same
    data, sources (held-out domains left out, 5-way 5-shot, 5 query, 15% validation classes,
    seed 0) and settings as the in-process ``api.meta_train`` call below; no experience record
    (as in-process). Its progress goes to stderr; its ``--json`` report gives what the rest of
    the script reads (path, validation curve, best step)."""
    import json
    import os
    import subprocess
    import sys
    from types import SimpleNamespace

    cmd = [sys.executable, "-m", "metapeft.cli", "meta-train", "--data",
           str(Path(args.data) / "train.jsonl"), "--exclude-domains", args.held_out,
           "--ways", "5", "--shots", "5", "--query", "5", "--seed", "0", "--model", args.model,
           *(("--val-domains", args.val_domains) if args.val_domains else ("--val-fraction", "0.15")),
           "--method", args.method, "--algorithm", args.algorithm, "--name", "bench",
           "--registry", str(registry), "--meta-steps", str(args.meta_steps),
           "--meta-batch", str(args.meta_batch), "--inner-steps", str(args.inner_steps),
           "--inner-lr", str(args.inner_lr), "--outer-lr", str(args.outer_lr),
           "--eval-every", str(args.eval_every), "--eval-episodes", "6",
           "--processes", str(args.processes),
           "--json", *(x for o in args.options for x in ("--set", o))]
    if args.meta_start == "multitask":
        cmd += ["--start-from", args.multitask_weights]
    if not args.vectorise:
        cmd.append("--sequential")
    if args.calibrate or args.no_calibrate:  # the step size is chosen by main(), or not at all
        cmd.append("--no-calibrate-lr")
    else:
        cmd += ["--lr-decays", args.calibrate_decays]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                       env={**os.environ, "METAPEFT_EXPERIENCE": "off"})
    if p.returncode != 0:
        sys.exit(f"meta-train --processes {args.processes} failed (exit {p.returncode}); its "
                 "error is above")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return SimpleNamespace(path=out["path"], val_steps=out["val_steps"],
                           val_accuracies=out["val_accuracy"], best_step=out["best_step"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(STORIES),
                    help="any mlx-lm model directory (default stories260K; the headline model is "
                         "../shared/models/SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(CLINC),
                    help="a directory with train.jsonl and test.jsonl rows {text, label, domain} "
                         "(default: CLINC150; benchmarks/wordnet_tasks.py builds another)")
    ap.add_argument("--held-out", default=",".join(HELD_OUT_DOMAINS),
                    help="the meta-test domains (comma-separated); meta-training never sees them")
    ap.add_argument("--val-domains", default=None,
                    help="hold these meta-train domains out whole as the validation classes "
                         "(early stopping, the lr calibration), as the meta-test holds out "
                         "--held-out; default: 15%% of the classes of every meta-train domain")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--algorithm", default="reptile")
    ap.add_argument("--meta-steps", type=int, default=30)
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--inner-lr", type=float, default=1e-3,
                    help="3e-3 diverged on meta-train episodes (10-step support loss 5-15)")
    ap.add_argument("--outer-lr", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=10,
                    help="validate every N meta-steps; the published init is the best validated "
                         "step's (default 10: the last step of the 10-step SmolLM2 recipe)")
    ap.add_argument("--lr", type=float, default=None,
                    help="test-time Adam lr for every init (default: the method's default lr)")
    ap.add_argument("--tasks", type=int, default=200, help="held-out test tasks (to step 10)")
    ap.add_argument("--long-tasks", type=int, default=50, help="of which run to step 50")
    ap.add_argument("--long-marks", default="15,20,30,50",
                    help="the extra marks (past 10) of the first --long-tasks tasks")
    ap.add_argument("--marks", default="0,1,2,3,4,5,6,7,8,9,10",
                    help="steps (to 10) at which every task's query accuracy is measured; tasks "
                         "run to the last of them. Each evaluation costs about a training step, "
                         "so fewer marks run faster")
    ap.add_argument("--multitask-steps", type=int, default=None,
                    help="default: meta-steps x meta-batch x inner-steps / 2: each multitask step "
                         "trains on an episode's support + query (2x the support), so both "
                         "inits see the same number of examples")
    ap.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                    help="adapter option for meta-training and every init's evaluation, e.g. "
                         "total_step=10 for AdaLoRA: one budget schedule (it ends at step 10, the "
                         "final rank pattern is kept after it) for the 10- and 50-step runs alike")
    ap.add_argument("--vectorise", action="store_true")
    ap.add_argument("--processes", type=int, default=1,
                    help="meta-train over N data-parallel processes (metapeft meta-train "
                         "--processes N: ring backend, this machine)")
    ap.add_argument("--registry", default=None, help="keep the meta-weights here (default: temp)")
    ap.add_argument("--meta-weights", default=None,
                    help="skip meta-training: evaluate these published meta-weights")
    ap.add_argument("--meta-start", choices=("fresh", "multitask"), default="fresh",
                    help="where meta-training starts: a fresh adapter, or the multitask init of "
                         "--multitask-weights (build it first: --inits multitask --tasks 0), i.e. "
                         "multitask pretraining then meta-learning (meta-train --start-from)")
    ap.add_argument("--multitask-weights", default=None,
                    help="load the multitask init from this file if it exists, else train it and "
                         "save it there (so sharded evaluations share one init)")
    ap.add_argument("--shard", default="0/1",
                    help="K/N: evaluate only the test tasks i with i %% N == K (run N processes, "
                         "then --merge their JSON files)")
    ap.add_argument("--compare", nargs=2, default=None, metavar=("NEW", "OLD"),
                    help="NEW's inits against OLD's arms on the tasks both ran, paired")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="combine the per-task results of sharded runs' JSON files and report")
    ap.add_argument("--calibrate", default=None, metavar="DIR",
                    help="adapt the meta and multitask inits at the test-time lr chosen for each "
                         "on the run's validation tasks (metapeft.meta.stepsize), cached as "
                         "DIR/<init>.json; meta-weights that carry adapt_lr use it")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="no step-size calibration at all: every init adapts at --lr (default: "
                         "the method's lr) with --lr-decay, and meta-training skips the "
                         "calibration it otherwise runs when --calibrate is not given")
    ap.add_argument("--calibrate-decays", default="0,1",
                    help="inverse-time lr decays tried with every lr factor in the calibration "
                         "(train.lr_schedule; 0 = constant lr); the default is meta-train's "
                         "(config.META_RECIPE). Without --calibrate it is the grid of the "
                         "calibration that meta-training itself runs and stores")
    ap.add_argument("--lr-decay", type=float, default=0.0,
                    help="test-time inverse-time decay for every init that --calibrate does not "
                         "set (with --lr: one fixed schedule, e.g. a candidate chosen elsewhere)")
    ap.add_argument("--calibrate-tasks", type=int, default=6,
                    help="validation tasks the calibration adapts (the first 6 are early "
                         "stopping's; 6 could not separate candidates 0.3 points apart on SmolLM2)")
    ap.add_argument("--calibrate-factors", default="2,1,0.5,0.2",
                    help="lr factors (x the method's default lr) tried in the calibration")
    ap.add_argument("--calibrate-horizons", default="",
                    help="steps at which the calibration also makes a choice of its own, by the "
                         "accuracy at that step (meta.stepsize horizons; e.g. 5,50)")
    ap.add_argument("--horizon", type=int, default=None,
                    help="each calibrated init adapts at its calibration's choice for a run of "
                         "this many steps (schedule_for_steps, as adapt --steps N does; "
                         "default: the overall choice)")
    ap.add_argument("--inits", default=None,
                    help="comma-separated subset of fresh,meta,multitask to adapt (default all)")
    ap.add_argument("--calibrate-inits", default="meta,multitask",
                    help="which inits this process calibrates when DIR lacks them (two "
                         "processes can split the work)")
    ap.add_argument("--baselines", default="ncm,logreg,icl",
                    help="training-free arms per task: ncm (nearest class mean), logreg "
                         "(logistic regression on frozen features), icl (the support set as "
                         "in-context demonstrations)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--resume", action="store_true",
                    help="keep the per-task records already in --json (same inits and settings) "
                         "and run only the missing tasks, e.g. to grow a 40-task run to 200")
    args = ap.parse_args()
    if args.no_calibrate and args.calibrate:
        ap.error("--no-calibrate and --calibrate exclude each other")
    from metapeft.cli._common import parse_numbers
    from metapeft.errors import UserError

    try:
        cal_decays = parse_numbers(args.calibrate_decays, "calibrate_decays", positive=False)
        cal_factors = parse_numbers(args.calibrate_factors, "calibrate_factors", positive=True)
        cal_horizons = [int(h) for h in parse_numbers(args.calibrate_horizons or None,
                                                      "calibrate_horizons", positive=True) or []]
    except UserError as e:
        ap.error(str(e))
    if args.merge:
        return merge(args.merge, args.json)
    if args.compare:
        return compare(*args.compare)
    require(Path(args.model), "the model")
    if args.meta_start == "multitask" and not args.meta_weights:
        if not args.multitask_weights:
            ap.error("--meta-start multitask needs --multitask-weights FILE")
        if not Path(args.multitask_weights).exists():
            ap.error(f"--meta-start multitask: no multitask init at {args.multitask_weights} "
                     "(--inits multitask --tasks 0 --multitask-weights FILE builds it)")
    data_dir = require(Path(args.data), "the task data")
    held_out = args.held_out.split(",")
    from metapeft import api
    from metapeft.adapters import get_adapter_class
    from metapeft.data.episodes import EpisodeSource
    from metapeft.models import load_base_model

    base = load_base_model(args.model)
    lr = get_adapter_class(args.method).default_lr if args.lr is None else args.lr
    import yaml

    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.options)}
    sources = api.build_meta_sources(str(data_dir / "train.jsonl"), exclude_domains=held_out,
                                     ways=5, shots=5, query=5, val_fraction=0.15, seed=0,
                                     val_domains=args.val_domains.split(",")
                                     if args.val_domains else None)
    train_src, _, spec, _ = sources
    test_src = EpisodeSource(clinc_pool("test", domains=held_out, root=data_dir), ways=5,
                             shots=5, query=10, name=f"{data_dir.name}-test-{'-'.join(held_out)}")
    overlap = set(spec["train_classes"]) & set(test_src.classes)
    assert not overlap, overlap
    print(f"meta-train classes {len(spec['train_classes'])}, validation classes "
          f"{len(spec['val_classes'])}, meta-test classes {len(test_src.classes)} (disjoint)",
          flush=True)

    t0 = time.perf_counter()
    from metapeft.artifacts import json_field, load_safetensors

    wanted_inits = set(args.inits.split(",")) if args.inits else {"fresh", "meta", "multitask"}
    meta, arrays = {}, None
    val_steps = val_accs = best_step = None
    meta_seconds = 0.0
    if "meta" not in wanted_inits and not args.meta_weights:
        pass  # e.g. a process that only trains the multitask init, beside one that meta-trains
    elif args.meta_weights:
        arrays, meta = load_safetensors(args.meta_weights)
        val_steps, val_accs = json_field(meta, "val_steps"), json_field(meta, "val_accuracy")
        best_step = json_field(meta, "best_step")
        meta_seconds = float(json_field(meta, "duration_seconds", 0.0))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if args.processes > 1:
                res = launched_meta_train(args, args.registry or tmp)
            else:
                res = api.meta_train(model=args.model, method=args.method,
                                     algorithm=args.algorithm,
                                     config=options,
                                     name="bench", registry=args.registry or tmp,
                                     meta_steps=args.meta_steps, meta_batch=args.meta_batch,
                                     inner_steps=args.inner_steps, inner_lr=args.inner_lr,
                                     outer_lr=args.outer_lr, eval_every=args.eval_every,
                                     eval_episodes=6,
                                     sources=sources, vectorise=args.vectorise,
                                     # with --calibrate the step size is chosen below, on the
                                     # grid given there (--calibrate-factors/-decays)
                                     calibrate_lr=not (args.calibrate or args.no_calibrate),
                                     calibrate_decays=cal_decays,
                                     start_from=(args.multitask_weights
                                                 if args.meta_start == "multitask" else None),
                                     on_step=lambda t, l, a, v: print(
                                         f"  meta-step {t}: loss {l:.3f} acc {a:.2f}"
                                         + ("" if v is None else f" val {v:.3f}"), flush=True))
            arrays, meta = load_safetensors(res.path)
        val_steps, val_accs, best_step = res.val_steps, res.val_accuracies, res.best_step
        meta_seconds = time.perf_counter() - t0
    adapter = get_adapter_class(args.method).attach(base, options)
    inits = {"fresh": adapter.init_params(0)}
    if arrays is not None:
        inits["meta"] = adapter.unflat(arrays)
    mt_steps = args.multitask_steps or args.meta_steps * args.meta_batch * args.inner_steps // 2
    t1 = time.perf_counter()
    from metapeft.artifacts import save_safetensors
    from metapeft.meta.pretrain import multitask_pretrain

    mt_file = Path(args.multitask_weights) if args.multitask_weights else None
    mt_seconds = 0.0
    if "multitask" not in wanted_inits:
        pass
    elif mt_file is not None and mt_file.exists():
        mt_arrays, mt_meta = load_safetensors(mt_file)
        inits["multitask"] = adapter.unflat(mt_arrays)
        mt_steps = int(mt_meta["multitask_steps"])
        mt_seconds = float(mt_meta.get("seconds", "nan"))  # older files lack it
    else:
        inits["multitask"] = multitask_pretrain(adapter, train_src, mt_steps, lr)
        mt_seconds = time.perf_counter() - t1
        if mt_file is not None:
            save_safetensors(mt_file, dict(tree_flatten(inits["multitask"])),
                             {"multitask_steps": str(mt_steps), "lr": str(lr),
                              "seconds": str(mt_seconds)})
    print(f"meta-train {meta_seconds:.0f} s (best val step {best_step}: {val_accs}); "
          f"multitask {mt_steps} steps {mt_seconds:.0f} s", flush=True)
    lrs = {name: lr for name in inits}  # the test-time Adam lr of each init
    decays = {name: args.lr_decay for name in inits}  # and its inverse-time decay (lr_schedule)
    calibration = {}
    if args.calibrate:
        import json

        from metapeft.meta.run import validation_tasks
        from metapeft.meta.stepsize import calibrate_adapt_lr, describe_lead

        cal_dir = Path(args.calibrate)
        cal_dir.mkdir(parents=True, exist_ok=True)
        wanted = set(args.calibrate_inits.split(","))
        if meta.get("adapt_lr_calibration"):
            calibration["meta"] = json.loads(meta["adapt_lr_calibration"])
        for name in ("meta", "multitask"):
            f = cal_dir / f"{name}.json"
            if name in calibration or name not in inits:
                continue
            digest = _params_digest(inits[name])
            if f.exists():
                calibration[name] = json.loads(f.read_text())
                if calibration[name].get("init_digest", digest) != digest:  # older files lack it
                    bad_input(f"{f}: calibrated for other {name} weights than these; give this "
                              "init its own --calibrate DIR")
                if calibration[name].get("val_classes", spec["val_classes"]) != spec["val_classes"]:
                    bad_input(f"{f}: calibrated on other validation classes than this run's "
                              "(--val-domains); give it its own --calibrate DIR")
                missing = {str(h) for h in cal_horizons} - set(calibration[name].get("horizons",
                                                                                     {}))
                if missing:
                    bad_input(f"{f}: has no choice for horizon(s) {', '.join(sorted(missing))} "
                              "(--calibrate-horizons); give it its own --calibrate DIR")
            elif name in wanted:
                tc = time.perf_counter()
                cal = calibrate_adapt_lr(
                    adapter, inits[name],
                    validation_tasks(sources.validation, 0, args.calibrate_tasks), lr,
                    decays=cal_decays,
                    factors=cal_factors, horizons=cal_horizons,
                    on_trial=lambda fct, row, n=name: print(f"  {n} lr x{fct}: {row}", flush=True))
                cal["seconds"] = round(time.perf_counter() - tc, 1)
                cal["init_digest"] = digest
                cal["val_classes"] = spec["val_classes"]
                write_json(str(f), cal)
                calibration[name] = cal
                lead = describe_lead(cal)
                if lead is not None:  # can the validation tasks tell the top two apart?
                    print(f"  {name}: x{cal['factor']} decay {cal['adapt_lr_decay']} leads by "
                          f"{lead}", flush=True)
        from metapeft.meta.stepsize import schedule_for_steps

        for name, cal in calibration.items():
            if name not in inits:
                continue
            chosen = (schedule_for_steps(cal, args.horizon) if args.horizon
                      else {"adapt_lr": cal["adapt_lr"],
                            "adapt_lr_decay": cal.get("adapt_lr_decay", 0.0)})
            lrs[name] = chosen["adapt_lr"]
            decays[name] = chosen["adapt_lr_decay"]
        print(f"test-time lr per init: {lrs}; inverse-time decay per init: {decays}", flush=True)
    if args.tasks == 0:  # inits only (meta-weights in --registry, --multitask-weights)
        return

    from metapeft.train import encode_task, train

    run_inits = [k for k in inits if not args.inits or k in args.inits.split(",")]
    header = {"args": vars(args), "spec": spec, "meta_seconds": meta_seconds,
              "val_steps": val_steps, "val_accuracy": val_accs, "best_step": best_step,
              "multitask_steps": mt_steps, "multitask_seconds": mt_seconds,
              "inits": run_inits, "lr": lrs, "lr_decay": decays, "calibration": calibration}
    # by default every step to 10: steps-to-accuracy at step resolution
    # every task runs to the last of --marks (at most 10; e.g. 0,1,2,5 for a 5-step horizon)
    marks_short = sorted({0} | {int(m) for m in args.marks.split(",") if int(m) <= 10})
    marks_long = marks_short + ([int(m) for m in args.long_marks.split(",")]
                                if args.long_tasks > 0 else [])
    shard, num_shards = (int(x) for x in args.shard.split("/"))
    records = []  # one per test task: its index, the training-free baseline, accuracy per init
    mine = [i for i in range(args.tasks) if i % num_shards == shard]
    if args.resume and args.json and Path(args.json).exists():
        wanted = set(mine)
        records = [r for r in _load_run(args.json)["records"] if r["i"] in wanted]
        done = {r["i"] for r in records}
        mine = [i for i in mine if i not in done]
        print(f"resuming: {len(done)} tasks already in {args.json}, {len(mine)} to run", flush=True)
    for n_done, i in enumerate(mine, 1):
        task = test_src.sample(30_000 + i)
        data = encode_task(task, base.tokenizer)
        rec = {"i": i, "acc": {}, "seconds": {}}
        free = {"ncm": lambda: nearest_class_mean_accuracy(base, data),
                "logreg": lambda: logistic_regression_accuracy(base, data),
                "icl": lambda: in_context_accuracy(base, task, seed=i)}
        for name in filter(None, args.baselines.split(",")):
            tb = time.perf_counter()
            rec[name] = free[name]()
            rec["seconds"][name] = round(time.perf_counter() - tb, 2)
        marks = marks_long if i < args.long_tasks else marks_short
        for name in run_inits:
            init = inits[name]
            tb = time.perf_counter()
            r = train(adapter, init, data, steps=marks[-1], lr=lrs[name], eval_at=set(marks),
                      lr_decay=decays[name])
            rec["acc"][name] = dict(zip(r.extra["eval_steps"], r.accuracies))
            rec["seconds"][name] = round(time.perf_counter() - tb, 2)
        records.append(rec)
        if n_done % 10 == 0:
            print(f"  {n_done}/{len(mine)} tasks: " + "  ".join(
                f"{k} @{marks_short[-1]} "
                f"{np.mean([r['acc'][k][marks_short[-1]] for r in records]):.3f}"
                for k in run_inits),
                flush=True)
        if n_done < len(mine):  # every task on disk, so a stopped run resumes where it was
            report(header, records, args.json, quiet=n_done % 10 != 0)
    report(header, records, args.json)


def report(header: dict, records: list[dict], json_path: str | None, quiet: bool = False) -> None:
    """Print the tables and write the JSON (header + per-task records) for the tasks done so far;
    called after every task (``quiet``: write only), so a stopped run leaves all it measured."""
    if quiet:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            return _report(header, records, json_path)
    return _report(header, records, json_path)


def _report(header: dict, records: list[dict], json_path: str | None) -> None:
    args = header["args"]
    records = sorted(records, key=lambda r: r["i"])  # long tasks (lowest indices) first
    inits = header["inits"]
    marks_long = sorted({int(m) for r in records for m in r["acc"][inits[0]]})
    acc = {k: {m: [r["acc"][k][m] for r in records if m in r["acc"][k]] for m in marks_long}
           for k in inits}
    free_names = {"ncm": "nearest class mean (training-free)",
                  "logreg": "logistic regression on frozen features (training-free)",
                  "icl": "in-context learning, support set as demonstrations (training-free)"}
    free = {k: [r[k] for r in records if k in r] for k in free_names}
    free = {k: v for k, v in free.items() if v}
    ncm = free.get("ncm", [])
    n_long = sum(1 for r in records if max(r["acc"][inits[0]]) > 10)

    def steps_to(name, level, first_n=None):
        """First mark whose mean accuracy (over the first ``first_n`` tasks, else every task run
        to that mark) reaches ``level``."""
        for m in marks_long:
            v = acc[name][m][:first_n]
            if v and np.mean(v) >= level:
                return m
        return None

    model = Path(args.get("model") or "stories260K").name
    print(f"\n## meta_clinc: {args['method']}/{args['algorithm']} on {model}; meta-test "
          f"{len(records)} tasks (5-way 5-shot, query 10/class) from the "
          f"{Path(args.get('data') or CLINC).name} test split of "
          f"{', '.join((args.get('held_out') or ','.join(HELD_OUT_DOMAINS)).split(','))}; "
          f"steps past 10 on the first {n_long}\n")
    shown = [m for m in marks_long if m in (0, 1, 2, 3, 5, 10, 20, 50)]
    print("| init | " + " | ".join(f"acc@{m}" for m in shown) + " | steps to 80% (mean curve) |")
    print("|---|" + "---|" * (len(shown) + 1))
    for name in inits:
        cells = [fmt(acc[name][m]) if acc[name][m] else "-" for m in shown]
        print(f"| {name} | " + " | ".join(cells) + f" | {steps_to(name, 0.8)} |")
    for k, v in free.items():
        print(f"| {free_names[k]} | {fmt(v)} |" + " - |" * len(shown))
    secs = {k: [r["seconds"][k] for r in records if k in r.get("seconds", {})]
            for k in list(inits) + list(free)}
    if any(secs.values()):
        print("\nwall-clock seconds per task (adapt to the last mark incl. its evaluations, or "
              "the training-free fit + predict): " + ", ".join(
                  f"{k} {fmt(v, pct=False)}" for k, v in secs.items() if v))
    if header.get("lr"):
        print(f"test-time Adam lr per init: {header['lr']}")
    # speed-up: the steps fresh init needs for a level, over the steps each init needs for it
    # (first mark whose mean accuracy, over the tasks run to that mark, reaches the level)
    if "fresh" in inits:
        speedups = _speedups(inits, acc, steps_to)
    else:
        speedups = {}
    paired = {} if "meta" not in inits else _paired(inits, records, acc, shown, free)
    write_json(json_path, {**header, "nearest_class_mean": mean_ci(ncm) + (len(ncm),),
                           "training_free": {k: mean_ci(v) + (len(v),) for k, v in free.items()},
                           "steps_to_fresh_level": speedups, "paired_meta_minus": paired,
                           "accuracy": {k: {m: mean_ci(v) + (len(v),) for m, v in d.items() if v}
                                        for k, d in acc.items()},
                           "records": records})


def _speedups(inits, acc, steps_to) -> dict:
    """The steps fresh init needs for a level over the steps each init needs for it."""
    print("\n| fresh init's level | " + " | ".join(f"{k} steps" for k in inits if k != "fresh")
          + " |\n|---|" + "---|" * (len(inits) - 1))
    speedups = {}
    for k in [m for m in (2, 3, 5, 10, 20, 50) if acc["fresh"].get(m)]:
        # levels past step 10 exist only on the long tasks: compare on that same subset
        n = len(acc["fresh"][k])
        level = float(np.mean(acc["fresh"][k]))
        cells = []
        for name in inits:
            if name == "fresh":
                continue
            s_ = steps_to(name, level, first_n=n)
            speedups[f"{name}@fresh{k}"] = s_
            cells.append("not reached" if s_ is None else
                         f"{s_} ({k / max(s_, 1):.1f}x speed-up)" if s_ > 0 else "0 (at init)")
        print(f"| {100 * level:.1f}% (fresh @ {k}, {n} tasks) | " + " | ".join(cells) + " |")
    last = max(m for m in acc["fresh"] if m <= 10 and acc["fresh"][m])
    ref = float(np.mean(acc["fresh"][last]))
    print(f"\nfresh init reaches {100 * ref:.1f}% at step {last}; " + ", ".join(
        f"{k} init reaches that at step {steps_to(k, ref)}" for k in inits if k != "fresh"),
          flush=True)
    return speedups


def _paired(inits, records, acc, shown, free) -> dict:
    """Meta minus every other init and training-free arm, per task."""
    # paired per-task differences: every init ran on the same tasks, so the task-to-task spread
    # cancels and the CI is tighter than the two unpaired ones side by side
    paired = {}
    full = [m for m in shown if len(acc["meta"][m]) == len(records)]
    print("\n| meta − init (paired, points) | " + " | ".join(f"@{m}" for m in full)
          + " |\n|---|" + "---|" * len(full))
    for name in (k for k in inits if k != "meta"):
        diffs = {m: [r["acc"]["meta"][m] - r["acc"][name][m] for r in records] for m in full}
        paired[name] = {m: mean_ci(d) for m, d in diffs.items()}
        print(f"| meta − {name} | " + " | ".join(
            "%+.1f ± %.1f" % tuple(100 * x for x in paired[name][m]) for m in full) + " |")
    for name in free:  # a training-free arm has one accuracy; meta at step m minus it
        rows = [r for r in records if name in r]
        diffs = {m: [r["acc"]["meta"][m] - r[name] for r in rows] for m in full}
        paired[name] = {m: mean_ci(d) for m, d in diffs.items()}
        print(f"| meta − {name} | " + " | ".join(
            "%+.1f ± %.1f" % tuple(100 * x for x in paired[name][m]) for m in full) + " |")
    return paired


def _load_run(path: str) -> dict:
    """A run's JSON (header + per-task records), with the records' step keys back as ints."""
    import json

    run = json.loads(Path(path).read_text())
    for r in run["records"]:  # JSON object keys are strings
        r["acc"] = {k: {int(m): a for m, a in v.items()} for k, v in r["acc"].items()}
    return run


def compare(new_path: str, old_path: str) -> None:
    """``--compare NEW OLD``: NEW's inits (as ``<init>*``) beside OLD's inits and training-free
    arms on the tasks both runs hold, with NEW minus each of them paired per task."""
    new, old = _load_run(new_path), _load_run(old_path)
    olds = {r["i"]: r for r in old["records"]}
    recs = [(r, olds[r["i"]]) for r in sorted(new["records"], key=lambda r: r["i"])
            if r["i"] in olds]
    marks = sorted(set.intersection(*(set(r["acc"][k]) for r, _ in recs for k in r["acc"])))
    free = [k for k in ("ncm", "logreg", "icl") if all(k in o for _, o in recs)]
    arms = {**{f"{k}*": [r["acc"][k] for r, _ in recs] for k in new["inits"]},
            **{k: [o["acc"][k] for _, o in recs] for k in old["inits"]}}
    long = sorted({m for r, o in recs for k in new["inits"] for m in r["acc"][k]
                   if m not in marks and all(m in o["acc"][j] for j in old["inits"])})
    n_long = sum(1 for r, _ in recs if long and long[0] in r["acc"][new["inits"][0]])
    print(f"\n{len(recs)} tasks in both {new_path} (*: {new['inits']}, lr {new.get('lr')}, "
          f"decay {new.get('lr_decay')}) and {old_path} (lr {old.get('lr')}, "
          f"decay {old.get('lr_decay')})\n")
    shown = marks + long
    print("| arm | " + " | ".join(f"acc@{m}" + (f" ({n_long} tasks)" if m in long else "")
                                 for m in shown) + " |\n|---|" + "---|" * len(shown))
    for name, curves in arms.items():
        print(f"| {name} | " + " | ".join(fmt([c[m] for c in curves if m in c]) for m in shown)
              + " |")
    for k in free:
        print(f"| {k} (training-free) | {fmt([o[k] for _, o in recs])} |" + " |" * (len(shown) - 1))
    print("\n| paired (points) | " + " | ".join(f"@{m}" for m in shown)
          + " |\n|---|" + "---|" * len(shown))
    for k in new["inits"]:
        mine = [r["acc"][k] for r, _ in recs]
        others = {**{j: [o["acc"][j] for _, o in recs] for j in old["inits"]},
                  **{j: [{m: o[j] for m in shown} for _, o in recs] for j in free}}
        for j, theirs in others.items():
            cells = []
            for m in shown:
                d = [a[m] - b[m] for a, b in zip(mine, theirs) if m in a and m in b]
                mu, ci = mean_ci(d)
                cells.append(f"{100 * mu:+.1f} ± {100 * ci:.1f}")
            print(f"| {k}* − {j} | " + " | ".join(cells) + " |")


def merge(paths: list[str], json_path: str | None) -> None:
    """Report over the per-task records of several sharded runs (same inits and settings)."""
    runs = [_load_run(p) for p in paths]
    records = [r for run in runs for r in run["records"]]
    assert len({r["i"] for r in records}) == len(records), "shards overlap"
    report(runs[0], records, json_path)

if __name__ == "__main__":
    main()

"""Sequential domains (issue 17): continual meta-training on CLINC150, with each forgetting control,
against meta-training on every domain at once.

The 8 CLINC150 meta-train domains (banking and travel are held out and never touched) are split
into a first group A and a second group B of 4 domains each. v1 is meta-trained (Reptile, LoRA)
on A; it is then continued on B with ``api.meta_train(..., init="seq@1", forgetting=ARM)`` for
each ARM in none / ewc / replay / both (each a new version whose parent is v1). The upper bound,
"joint", is meta-trained on A ∪ B at once for as many meta-steps as v1 and a continuation
together.

Classes. Each group's meta-train split keeps ``--val-fraction`` of its intents aside as
validation classes (``build_meta_sources``: 9 of 60 per group), disjoint from the classes any run
meta-trains on: v1 trains on A's train classes, the continuations on B's (plus replayed A train
classes), and joint on both train-class sets, early-stopping on A's and B's validation classes
together. Evaluation tasks are 5-way 5-shot episodes over A's (resp. B's) validation classes drawn
from the CLINC150 *test* split, so their examples are not the ones early stopping and the lr
calibration saw. ``--synthetic`` runs the same protocol on data not in ../shared: the embedded
synthetic families on the random tiny model, topic first and intent second, evaluation
sentences generated afresh (another seed) for the validation classes.

Every version is adapted at its own calibrated ``adapt_lr`` (as ``adapt --init`` would) on the
same tasks; accuracy at steps 1 and 5, mean ± 95% CI over the tasks, and paired per-task
differences: forgetting on A (v1 − arm, relative to v1; and arm − joint) and gain on B (arm − v1;
and arm − joint).

    flock /tmp/heavy.lock uv run python benchmarks/continual_clinc.py --json out.json
    uv run python benchmarks/continual_clinc.py --synthetic   # synthetic families, tiny model
    uv run python benchmarks/continual_clinc.py --smol ...   # SmolLM2-135M (slow on CPU)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import CLINC, HELD_OUT_DOMAINS, SMOL, STORIES, clinc_pool, mean_ci, require, write_json

import numpy as np

FIRST = ["auto_and_commute", "credit_cards", "home", "kitchen_and_dining"]
SECOND = ["meta", "small_talk", "utility", "work"]
MARKS = (1, 5)
# per data set: groups, episode shape and the default recipe. CLINC150 on stories260K (or
# SmolLM2); --synthetic: the embedded synthetic families on the random tiny model (no ../shared),
# the topic family first, intent second, as benchmarks/continual_tiny.py.
SETTINGS = {
    "clinc": dict(first=FIRST, second=SECOND, ways=5, shots=5, query=5, meta_steps=8,
                  inner_steps=10, eval_every=4, eval_episodes=6, val_fraction=0.15, tasks=25),
    "synthetic": dict(first=["topic"], second=["intent"], ways=3, shots=3, query=3,
                      meta_steps=20, inner_steps=5, eval_every=5, eval_episodes=8,
                      val_fraction=0.34, tasks=60),
}


def pool(kind: str, domains, split: str):
    """The rows of ``domains``: CLINC150's ``split``, or the synthetic families (``train``: the
    pool meta-train uses, seed 0; ``test``: freshly generated sentences, seed 1, same labels)."""
    if kind == "clinc":
        return clinc_pool(split, domains=domains)
    from metapeft.data.synthetic import generate_pool

    return [e for fam in domains for e in generate_pool(fam, 0 if split == "train" else 1, 40)]


def joint_sources(kind, data, first, second, domains, *, ways, shots, query, val_fraction):
    """Meta-train on A's and B's train classes at once, validate on A's and B's validation
    classes: the same class split as the sequential runs (each group split on its own)."""
    from metapeft.data import EpisodeSource
    from metapeft.meta.sources import MetaSources

    train_classes, val_classes = [], []
    for s in (first, second):
        train_classes += s.spec["train_classes"]
        val_classes += s.spec["val_classes"]
    rows = pool(kind, domains, "train")
    spec = {"data": data, "ways": ways, "shots": shots, "query": query,
            "domains": domains, "val_fraction": val_fraction,
            "split": "each group's own class split", "train_classes": sorted(train_classes),
            "val_classes": sorted(val_classes), "num_train_classes": len(train_classes)}
    tr = EpisodeSource(rows, train_classes, ways=ways, shots=shots, query=query, name=data)
    va = EpisodeSource(rows, val_classes, ways=ways, shots=shots, query=query,
                       name=f"{data} (validation classes of both groups)")
    return MetaSources(tr, va, spec, None)


def load_version(path, adapter, default_lr):
    from metapeft.artifacts import load_safetensors
    from metapeft.drift import stored_lr
    from metapeft.meta.continual import split_fisher

    arrays, meta = load_safetensors(path)
    params, _ = split_fisher(arrays)
    return adapter.unflat(params), stored_lr(meta) or default_lr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="mlx-lm model directory (default stories260K)")
    ap.add_argument("--smol", action="store_true", help="SmolLM2-135M-Instruct (slow on CPU)")
    ap.add_argument("--synthetic", action="store_true",
                    help="the synthetic families (topic, then intent) on the tiny model instead "
                         "of CLINC150: data not in ../shared")
    ap.add_argument("--first", default=None, help="group A domains (comma-separated)")
    ap.add_argument("--second", default=None, help="group B domains")
    ap.add_argument("--arms", default="none,ewc,replay,both")
    ap.add_argument("--meta-steps", type=int, default=None,
                    help="per stage (v1, each continuation); joint gets twice as many "
                         "(default 8 on CLINC150, 20 synthetic)")
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=None, help="default 10 / 5 synthetic")
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--eval-episodes", type=int, default=None,
                    help="validation episodes (early stopping, lr calibration, Fisher, the "
                         "library's own forgetting/gain record); default 6 / 8 synthetic")
    ap.add_argument("--val-fraction", type=float, default=None, help="default 0.15 / 0.34")
    ap.add_argument("--tasks", type=int, default=None,
                    help="evaluation tasks per group (default 25 / 60 synthetic)")
    ap.add_argument("--no-fresh", action="store_true", help="skip the fresh-init reference row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--registry", default=None, help="keep the versions here (default: temp)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--report", default=None, metavar="JSON",
                    help="print the tables of an earlier run's --json and exit")
    args = ap.parse_args()
    if args.report:
        return rereport(args.report)
    kind = "synthetic" if args.synthetic else "clinc"
    for k, v in SETTINGS[kind].items():
        if k in ("first", "second"):
            given = getattr(args, k)
            setattr(args, k, given.split(",") if given else v)
        elif getattr(args, k, None) is None:
            setattr(args, k, v)
    if kind == "synthetic":
        model = args.model or "tiny"
    else:
        model = args.model or str(SMOL if args.smol else STORIES)
        require(Path(model), "the model")
        require(CLINC, "CLINC150")
    first, second = args.first, args.second
    ways, shots, query = args.ways, args.shots, args.query
    assert not set(first) & set(second) and not (set(first) | set(second)) & set(HELD_OUT_DOMAINS)
    arms = [a for a in args.arms.split(",") if a]
    print(f"load: {os.getloadavg()}", flush=True)

    from metapeft import api
    from metapeft.adapters import get_adapter_class
    from metapeft.data.episodes import EpisodeSource
    from metapeft.models import load_base_model
    from metapeft.train import encode_task, train

    data = "synthetic" if kind == "synthetic" else str(CLINC / "train.jsonl")
    common = dict(model=model, method="lora", algorithm="reptile", ways=ways, shots=shots,
                  query=query,
                  meta_batch=args.meta_batch, inner_steps=args.inner_steps,
                  eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                  val_fraction=args.val_fraction, seed=args.seed)
    src = {g: api.build_meta_sources(data, domains=d, ways=ways, shots=shots, query=query,
                                     val_fraction=args.val_fraction, seed=args.seed)
           for g, d in (("A", first), ("B", second))}
    for g in src:
        sp = src[g].spec
        print(f"group {g}: {len(sp['train_classes'])} meta-train classes, "
              f"{len(sp['val_classes'])} validation classes {sp['val_classes']}", flush=True)
    trained = set(src["A"].spec["train_classes"]) | set(src["B"].spec["train_classes"])
    val = {g: src[g].spec["val_classes"] for g in src}
    assert not trained & (set(val["A"]) | set(val["B"])), "validation classes were meta-trained"

    runs, versions = {}, {}

    def on_step(tag):
        return lambda t, l, a, v: print(f"  {tag} meta-step {t}: loss {l:.3f} acc {a:.2f}"
                                        + ("" if v is None else f" val {v:.3f}"), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.registry or tmp
        t0 = time.perf_counter()
        rep = api.meta_train(data, name="seq", registry=root, domains=first,
                             meta_steps=args.meta_steps, on_step=on_step("v1"), **common)
        versions["v1"] = rep.path
        runs["v1"] = {"seconds": round(time.perf_counter() - t0, 1), "best_step": rep.result.best_step,
                      "adapt_lr": rep.result.extra.get("adapt_lr", {}).get("adapt_lr")}
        print(f"v1 on A: {runs['v1']}", flush=True)
        for arm in arms:
            t0 = time.perf_counter()
            rep = api.meta_train(data, name="seq", registry=root, domains=second, init="seq@1",
                                 forgetting=arm, meta_steps=args.meta_steps,
                                 on_step=on_step(arm), **common)
            versions[arm] = rep.path
            c = rep.result.extra["continual"]
            runs[arm] = {"seconds": round(time.perf_counter() - t0, 1),
                         "best_step": rep.result.best_step,
                         "adapt_lr": rep.result.extra.get("adapt_lr", {}).get("adapt_lr"),
                         "recorded_forgetting": c["forgetting"], "recorded_gain": c["gain"],
                         "distance_to_v1": c["distance_to_parent"], "notes": c.get("notes")}
            print(f"{arm} on B from v1: {runs[arm]}", flush=True)
        t0 = time.perf_counter()
        rep = api.meta_train(data, name="joint", registry=root,
                             sources=joint_sources(kind, data, src["A"], src["B"], first + second,
                                                   ways=ways, shots=shots, query=query,
                                                   val_fraction=args.val_fraction),
                             meta_steps=2 * args.meta_steps, on_step=on_step("joint"), **common)
        versions["joint"] = rep.path
        runs["joint"] = {"seconds": round(time.perf_counter() - t0, 1),
                         "best_step": rep.result.best_step,
                         "adapt_lr": rep.result.extra.get("adapt_lr", {}).get("adapt_lr")}
        print(f"joint on A+B: {runs['joint']}", flush=True)
        print(f"load: {os.getloadavg()}", flush=True)

        base = load_base_model(model)
        cls = get_adapter_class("lora")
        adapter = cls.attach(base, {})
        inits = {} if args.no_fresh else {"fresh": (adapter.init_params(args.seed), cls.default_lr)}
        for k, p in versions.items():
            inits[k] = load_version(p, adapter, cls.default_lr)
    test = pool(kind, first + second, "test")
    tasks = {g: [EpisodeSource(test, val[g], ways=min(ways, len(val[g])), shots=shots, query=10,
                               name=f"{kind}-test-{g}-validation-classes").sample(50_000 + i)
                 for i in range(args.tasks)] for g in ("A", "B")}
    acc = {k: {g: {m: [] for m in MARKS} for g in tasks} for k in inits}
    t0 = time.perf_counter()
    for g, ts in tasks.items():
        for i, task in enumerate(ts):
            enc = encode_task(task, base.tokenizer)
            for k, (theta, lr) in inits.items():
                r = train(adapter, theta, enc, steps=max(MARKS), lr=lr, eval_at=set(MARKS))
                for m, a in zip(r.extra["eval_steps"], r.accuracies):
                    acc[k][g][m].append(a)
            if (i + 1) % 10 == 0:
                print(f"  group {g}: {i + 1}/{len(ts)} tasks, " + "  ".join(
                    f"{k} @5 {np.mean(acc[k][g][5]):.3f}" for k in inits), flush=True)
    eval_seconds = round(time.perf_counter() - t0, 1)
    print(f"evaluation {eval_seconds} s; load: {os.getloadavg()}", flush=True)
    report(args, runs, {k: lr for k, (_, lr) in inits.items()}, acc, eval_seconds)


def _pair(a, b):
    m, c = mean_ci(np.asarray(a) - np.asarray(b))
    return m, c


def _verdict(ok_mean: bool, ok_ci: bool) -> str:
    return "yes" if ok_ci else "mean only" if ok_mean else "no"


def report(args, runs, lrs, acc, eval_seconds) -> None:
    n = args.tasks
    order = ["fresh", "v1", "none", "ewc", "replay", "both", "joint"]
    acc = {k: acc[k] for k in sorted(acc, key=lambda k: order.index(k) if k in order else 99)}
    runs = {k: runs[k] for k in acc if k in runs}
    data = "synthetic families, tiny model" if args.synthetic else "CLINC150"
    print(f"\n## continual_clinc ({data}; A = {','.join(args.first)}, B = "
          f"{','.join(args.second)}): LoRA/Reptile, {args.meta_steps} meta-steps per stage "
          f"(joint {2 * args.meta_steps}) x {args.meta_batch} tasks x {args.inner_steps} inner "
          f"steps; {n} held-out tasks per group ({args.ways}-way {args.shots}-shot at most, 10 "
          f"query/class) over each group's validation classes\n")
    print("| version | test-time lr | A (first group) @1 | A @5 | B (second group) @1 | B @5 |")
    print("|---|---|---|---|---|---|")
    for k in acc:
        print(f"| {k} | {lrs[k]:.2g} | " + " | ".join(
            "%.1f ± %.1f" % tuple(100 * x for x in mean_ci(acc[k][g][m]))
            for g in ("A", "B") for m in (1, 5)) + " |")
    summary = {}
    print("\nPaired per-task differences, mean ± 95% CI. Goals: forgetting < 5% relative; B "
          "within 2 points of joint (yes: the 95% CI bound clears it; mean only: the mean does, "
          "the CI does not)\n")
    print("| arm | forgetting on A vs v1, relative @1 / @5 | A: arm − joint @1 / @5 (points) "
          "| gain on B: arm − v1 @1 / @5 | B: arm − joint @1 / @5 | forgetting < 5% @1 / @5 "
          "| B ≥ joint − 2 @1 / @5 |")
    print("|---|---|---|---|---|---|---|")

    def pct(t):
        return "%+.1f%% ± %.1f" % (100 * t[0], 100 * t[1])

    def pts(t):
        return "%+.1f ± %.1f" % (100 * t[0], 100 * t[1])

    for k in (x for x in acc if x not in ("fresh", "v1", "joint")):
        s, goal = {}, {}
        for m in (1, 5):
            v1 = float(np.mean(acc["v1"]["A"][m]))
            d, c = _pair(acc["v1"]["A"][m], acc[k]["A"][m])
            s[f"forgetting_rel@{m}"] = (d / v1, c / v1)  # the CI treats v1's mean as fixed
            s[f"A_minus_joint@{m}"] = _pair(acc[k]["A"][m], acc["joint"]["A"][m])
            s[f"gain@{m}"] = _pair(acc[k]["B"][m], acc["v1"]["B"][m])
            s[f"B_minus_joint@{m}"] = bj = _pair(acc[k]["B"][m], acc["joint"]["B"][m])
            f = s[f"forgetting_rel@{m}"]
            goal[f"forgetting_under_5pct@{m}"] = _verdict(f[0] < 0.05, f[0] + f[1] < 0.05)
            goal[f"gain_within_2_points@{m}"] = _verdict(bj[0] >= -0.02, bj[0] - bj[1] >= -0.02)
        s["goal"] = goal
        summary[k] = s
        print(f"| {k} | {pct(s['forgetting_rel@1'])} / {pct(s['forgetting_rel@5'])} | "
              f"{pts(s['A_minus_joint@1'])} / {pts(s['A_minus_joint@5'])} | "
              f"{pts(s['gain@1'])} / {pts(s['gain@5'])} | "
              f"{pts(s['B_minus_joint@1'])} / {pts(s['B_minus_joint@5'])} | "
              f"{goal['forgetting_under_5pct@1']} / {goal['forgetting_under_5pct@5']} | "
              f"{goal['gain_within_2_points@1']} / {goal['gain_within_2_points@5']} |")
    print("\nruns: " + "; ".join(f"{k} {v['seconds']} s (best step {v['best_step']}, adapt_lr "
                                 f"{v.get('adapt_lr')})" for k, v in runs.items())
          + f"; evaluation {eval_seconds} s")
    if args.json:
        write_json(args.json, {
            "args": vars(args), "runs": runs, "lr": lrs, "summary": summary,
            "accuracy": {k: {g: {m: mean_ci(v) + (len(v),) for m, v in d.items()}
                             for g, d in gs.items()} for k, gs in acc.items()},
            "per_task": acc, "eval_seconds": eval_seconds})


def rereport(path: str) -> None:
    """Print the tables again from a run's JSON (e.g. after changing the report)."""
    import json
    from types import SimpleNamespace

    run = json.loads(Path(path).read_text())
    given = {k: v for k, v in run["args"].items() if v is not None}
    kind = "synthetic" if given.get("synthetic") else "clinc"
    args = SimpleNamespace(**{"synthetic": False, **SETTINGS[kind], **given, "json": None})
    for k in ("first", "second"):  # older runs kept the comma-separated strings
        if isinstance(getattr(args, k), str):
            setattr(args, k, getattr(args, k).split(","))
    acc = {k: {g: {int(m): v for m, v in d.items()} for g, d in gs.items()}
           for k, gs in run["per_task"].items()}
    report(args, run["runs"], run["lr"], acc, run["eval_seconds"])


if __name__ == "__main__":
    main()

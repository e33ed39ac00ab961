"""Shared vs per-layer inner learning rates (MAML++'s LSLR, ``meta-train --inner-lr-mode``) on
held-out CLINC150 domains.

``--setup clinc`` (default; stories260K unless ``--model``): meta-train: CLINC150 train split minus banking and travel (15% of
its intents kept aside for validation: early stopping and the test-time lr calibration).
Meta-test: 5-way 5-shot episodes (10 query per class) from the *test* split of banking + travel,
classes disjoint from every meta-train and validation class. Both inits are trained with the same
algorithm, settings and task stream; they differ only in ``inner_lr_mode``. Each is adapted
exactly as ``adapt --init`` would: Adam at the version's calibrated ``adapt_lr``, the per-layer
version with its stored multipliers applied. Also reported: the per-layer θ without its
multipliers (same lr) and fresh LoRA at the method's lr. Query accuracy at the marks, mean ±
95% CI over tasks, and the paired difference per-layer − shared.

``--setup topic`` (the tiny model unless ``--model``): the quickstart's split of the synthetic
``topic`` family: meta-train on 18 of its 24 topics (20% of them for validation), meta-test on
4-way 4-shot tasks (8 query per class) of the 6 topics never seen.

    uv run python benchmarks/lslr.py --algorithm fomaml --tasks 30
    uv run python benchmarks/lslr.py --setup topic --algorithm fomaml --tasks 60
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import STORIES, fmt, meta_split, mean_ci, write_json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", choices=("clinc", "topic"), default="clinc")
    ap.add_argument("--model", default=None, help="default: stories260K (clinc), tiny (topic)")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--algorithm", default="fomaml")
    ap.add_argument("--meta-steps", type=int, default=30)
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--inner-lr", type=float, default=None)
    ap.add_argument("--outer-lr", type=float, default=None)
    ap.add_argument("--inner-lr-meta-lr", type=float, default=None)
    ap.add_argument("--eval-episodes", type=int, default=6)
    ap.add_argument("--eval-every", type=int, default=10,
                    help="validate every N meta-steps and publish the best (0: publish the last "
                         "θ; the validation tasks still calibrate the lr)")
    ap.add_argument("--tasks", type=int, default=30)
    ap.add_argument("--marks", default="0,1,5,10,20")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from metapeft import api
    from metapeft.adapter_io import init_adapt_lr, init_lr_scales, resolve_init
    from metapeft.adapters import get_adapter_class
    from metapeft.models import load_base_model
    from metapeft.train import encode_task, train

    marks = [int(m) for m in args.marks.split(",")]
    args.model = args.model or (str(STORIES) if args.setup == "clinc" else "tiny")
    base = load_base_model(args.model)
    cls = get_adapter_class(args.method)
    ways, shots, sources, test_src = meta_split(args.setup)
    out = {"args": vars(args), "versions": {}}
    adapter = cls.attach(base, {})
    inits = {"fresh": (adapter.init_params(0), cls.default_lr, None)}
    with tempfile.TemporaryDirectory() as reg:
        for mode in ("shared", "per-layer"):
            t0 = time.perf_counter()
            rep = api.meta_train(model=args.model, method=args.method, algorithm=args.algorithm,
                                 name=mode, registry=reg, meta_steps=args.meta_steps,
                                 ways=ways, shots=shots, inner_lr=args.inner_lr,
                                 meta_batch=args.meta_batch, inner_steps=args.inner_steps,
                                 outer_lr=args.outer_lr, eval_every=args.eval_every,
                                 eval_episodes=args.eval_episodes, sources=sources,
                                 inner_lr_mode=mode, inner_lr_meta_lr=args.inner_lr_meta_lr)
            seconds = time.perf_counter() - t0
            lr = init_adapt_lr(rep.path)
            scales = init_lr_scales(rep.path)
            theta = resolve_init(rep.path, adapter)
            res = rep.result
            out["versions"][mode] = {
                "seconds": round(seconds, 1), "adapt_lr": lr, "best_step": res.best_step,
                "val_steps": res.val_steps, "val_accuracy": res.val_accuracies,
                "calibration": res.extra.get("adapt_lr", {}).get("table"),
                "multipliers": None if scales is None else {
                    "min": min(scales.values()), "median": float(np.median(list(scales.values()))),
                    "max": max(scales.values())}}
            best = f" ({max(res.val_accuracies):.1%})" if res.val_accuracies else ""
            print(f"{mode}: meta-trained in {seconds:.0f} s, published step {res.best_step}"
                  f"{best}, adapt_lr {lr:g}"
                  + ("" if scales is None else
                     f", multipliers {min(scales.values()):.2f}..{max(scales.values()):.2f} "
                     f"(median {np.median(list(scales.values())):.2f})"), flush=True)
            if scales is None:
                inits["meta, shared lr"] = (theta, lr, None)
            else:
                inits["meta, per-layer lrs"] = (theta, lr, scales)
                inits["per-layer θ, multipliers off"] = (theta, lr, None)

    acc = {name: [] for name in inits}
    t1 = time.perf_counter()
    for i in range(args.tasks):
        data = encode_task(test_src.sample(30_000 + i), base.tokenizer)
        for name, (theta, lr, scales) in inits.items():
            r = train(adapter, theta, data, steps=marks[-1], lr=lr, eval_at=set(marks),
                      lr_scales=scales)
            acc[name].append(r.accuracies)
    out["eval_seconds"] = round(time.perf_counter() - t1, 1)
    out["accuracy"] = {k: v for k, v in acc.items()}
    print(f"\n{args.tasks} held-out tasks ({test_src.name}), {args.model}, {args.method}/"
          f"{args.algorithm}, {args.meta_steps} meta-steps x {args.meta_batch} tasks x "
          f"{args.inner_steps} inner steps; eval {out['eval_seconds']:.0f} s")
    print("| arm | lr | " + " | ".join(f"acc@{m}" for m in marks) + " |")
    print("|---|---|" + "---|" * len(marks))
    for name, (_, lr, _) in inits.items():
        a = np.array(acc[name])
        print(f"| {name} | {lr:g} | " + " | ".join(fmt(a[:, j]) for j in range(len(marks))) + " |")
    d = np.array(acc["meta, per-layer lrs"]) - np.array(acc["meta, shared lr"])
    print("| per-layer − shared (paired) | | "
          + " | ".join("{:+.1f} ± {:.1f}".format(*(100 * x for x in mean_ci(d[:, j])))
                       for j in range(len(marks))) + " |")
    write_json(args.json, out)


if __name__ == "__main__":
    main()

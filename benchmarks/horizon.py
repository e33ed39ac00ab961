"""A step size per run length (``meta-train --calibrate-horizons``) against the one overall choice,
on held-out tasks.

The calibration picks the test-time lr and decay for a learned init on validation tasks by the
mean accuracy over steps 1/2/5/10 (``meta.stepsize``). A user who runs ``adapt --steps 50`` wants
the accuracy at step 50 instead; with horizons the same calibration runs also choose, per
horizon h, the candidate with the best validation accuracy at step h, and ``adapt --steps N``
takes the choice for N (``stepsize.schedule_for_steps``). This script meta-trains one Reptile
init with horizons, then adapts every held-out task from it with each distinct schedule the
calibration chose (to the last mark), and with fresh LoRA. The "horizon-aware" row is what
``adapt --steps N`` gives at step N: the reading at N of the schedule chosen for N. Paired
differences per task against the overall choice and against fresh; mean ± 95% CI.

``--setup topic`` (default; the tiny model): the quickstart's split of the synthetic ``topic``
family, meta-train on 18 of its 24 topics (20% of them for validation), meta-test on 4-way
4-shot tasks (8 query per class) of the 6 topics never seen. ``--setup clinc`` (stories260K
unless ``--model``): CLINC150 train split minus banking and travel (15% of its intents for
validation); meta-test 5-way 5-shot episodes (10 query per class) of the banking + travel
*test* split.

    uv run python benchmarks/horizon.py --tasks 60
    uv run python benchmarks/horizon.py --setup clinc --tasks 40 --json h.json
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import STORIES, fmt, meta_split, mean_ci, write_json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", choices=("topic", "clinc"), default="topic")
    ap.add_argument("--model", default=None, help="default: tiny (topic), stories260K (clinc)")
    ap.add_argument("--algorithm", default="reptile")
    ap.add_argument("--meta-steps", type=int, default=30)
    ap.add_argument("--horizons", default="5,20,50",
                    help="the calibration's horizons (steps); the last is how far tasks run")
    ap.add_argument("--tasks", type=int, default=60)
    ap.add_argument("--marks", default="0,1,2,5,10,20,50",
                    help="steps read on every run (each horizon is added)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from metapeft import api
    from metapeft.adapter_io import resolve_init
    from metapeft.adapters import get_adapter_class
    from metapeft.meta.stepsize import schedule_for_steps
    from metapeft.models import load_base_model
    from metapeft.train import encode_task, train

    horizons = sorted({int(h) for h in args.horizons.split(",")})
    marks = sorted({int(m) for m in args.marks.split(",")} | set(horizons))
    args.model = args.model or ("tiny" if args.setup == "topic" else str(STORIES))
    base = load_base_model(args.model)
    cls = get_adapter_class("lora")
    # meta-test classes are disjoint from every class meta-training or the calibration saw
    ways, shots, sources, test_src = meta_split(args.setup)
    adapter = cls.attach(base, {})
    with tempfile.TemporaryDirectory() as reg:
        t0 = time.perf_counter()
        rep = api.meta_train(model=args.model, method="lora", algorithm=args.algorithm,
                             name="h", registry=reg, meta_steps=args.meta_steps, ways=ways,
                             shots=shots, sources=sources, calibrate_horizons=horizons)
        meta_seconds = time.perf_counter() - t0
        theta = resolve_init(rep.path, adapter)
    cal = rep.result.extra["adapt_lr"]
    # every distinct schedule the calibration chose: the overall one and one per horizon
    chosen = {"overall": (cal["adapt_lr"], cal["adapt_lr_decay"])}
    for h in horizons:
        c = cal["horizons"][str(h)]
        chosen[f"{h}-step"] = (c["adapt_lr"], c["adapt_lr_decay"])
    distinct = sorted(set(chosen.values()))
    print(f"meta-trained in {meta_seconds:.0f} s (published step {rep.result.best_step}); "
          "calibrated schedules: " + ", ".join(f"{k} lr {lr:g} decay {d:g}"
                                              for k, (lr, d) in chosen.items()), flush=True)

    curves = {s: [] for s in distinct}
    fresh = []
    t1 = time.perf_counter()
    for i in range(args.tasks):
        data = encode_task(test_src.sample(30_000 + i), base.tokenizer)
        for s in distinct:
            r = train(adapter, theta, data, steps=marks[-1], lr=s[0], lr_decay=s[1],
                      eval_at=set(marks))
            curves[s].append(r.accuracies)
        r = train(adapter, adapter.init_params(0), data, steps=marks[-1], lr=cls.default_lr,
                  eval_at=set(marks))
        fresh.append(r.accuracies)
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{args.tasks} tasks", flush=True)
    eval_seconds = time.perf_counter() - t1
    acc = {s: np.array(v) for s, v in curves.items()}
    fresh_acc = np.array(fresh)
    col = {m: j for j, m in enumerate(marks)}
    overall = acc[chosen["overall"]]

    def aware(m: int) -> np.ndarray:  # what adapt --steps m gives at step m
        s = schedule_for_steps(cal, m)
        return acc[(s["adapt_lr"], s["adapt_lr_decay"])][:, col[m]]

    def diff(a: np.ndarray, b: np.ndarray) -> str:
        if np.array_equal(a, b):
            return "same runs"
        mean, ci = mean_ci(a - b)
        return f"{100 * mean:+.1f} ± {100 * ci:.1f}"

    print(f"\n{args.tasks} held-out tasks ({test_src.name}), {args.model}, LoRA/{args.algorithm} "
          f"{args.meta_steps} meta-steps; calibration on {cal['num_tasks']} validation tasks; "
          f"meta-train {meta_seconds:.0f} s, eval {eval_seconds:.0f} s")
    print("| arm | lr, decay | " + " | ".join(f"acc@{m}" for m in marks) + " |")
    print("|---|---|" + "---|" * len(marks))
    for name, s in chosen.items():
        print(f"| meta, {name} choice | {s[0]:g}, {s[1]:g} | "
              + " | ".join(fmt(acc[s][:, col[m]]) for m in marks) + " |")
    print(f"| fresh LoRA | {cls.default_lr:g}, 0 | "
          + " | ".join(fmt(fresh_acc[:, col[m]]) for m in marks) + " |")
    print("| meta, horizon-aware (adapt --steps N at N) | | "
          + " | ".join(fmt(aware(m)) for m in marks) + " |")
    print("| horizon-aware − overall (paired) | | "
          + " | ".join(diff(aware(m), overall[:, col[m]]) for m in marks) + " |")
    print("| horizon-aware − fresh (paired) | | "
          + " | ".join(diff(aware(m), fresh_acc[:, col[m]]) for m in marks) + " |")
    print("| overall − fresh (paired) | | "
          + " | ".join(diff(overall[:, col[m]], fresh_acc[:, col[m]]) for m in marks) + " |")
    write_json(args.json, {
        "args": vars(args), "marks": marks, "meta_seconds": round(meta_seconds, 1),
        "eval_seconds": round(eval_seconds, 1), "calibration": cal,
        "schedules": {k: list(v) for k, v in chosen.items()},
        "accuracy": {f"{lr:g}/{d:g}": v.tolist() for (lr, d), v in acc.items()},
        "fresh": fresh_acc.tolist()})


if __name__ == "__main__":
    main()

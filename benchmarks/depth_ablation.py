"""How many top blocks should LoRA adapt on a real model? (issue #14, item 3)

Fresh LoRA (the adapter's defaults, test-time Adam at its default lr) on the top k blocks of
SmolLM2-135M-Instruct, k in --depths, on 5-way 5-shot tasks (10 query examples per class) drawn
from the CLINC150 *train* split of the 8 meta-train domains only: the held-out banking/travel
domains, on which the headline results are measured, are never looked at here. Reports query
accuracy at steps 0/1/5/10 (mean ± 95% CI over tasks) and seconds per training step (the trunk
below the adapted blocks is cached once per task, see scoring.trunk_states). The same tasks are
used for every depth, so the differences are paired.

    uv run python benchmarks/depth_ablation.py --tasks 10 --depths 4,8,16,30 [--json out.json]
"""

from __future__ import annotations

import argparse
import time

from _common import fmt, mean_ci, real_model_run, write_json

import numpy as np

MARKS = (0, 1, 5, 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--depths", default="4,8,16,30")
    args, base, src = real_model_run(ap)
    from metapeft.adapters import get_adapter_class
    from metapeft.train import encode_task, train

    depths = [int(d) for d in args.depths.split(",")]
    cls = get_adapter_class("lora")
    acc = {k: {m: [] for m in MARKS} for k in depths}
    sec = {k: [] for k in depths}
    t0 = time.perf_counter()
    for i in range(args.tasks):
        data = encode_task(src.sample(50_000 + args.seed * 1000 + i), base.tokenizer)
        for k in depths:
            ad = cls.attach(base, {"num_layers": -1 if k >= base.num_layers else k})
            r = train(ad, ad.init_params(0), data, steps=MARKS[-1], lr=cls.default_lr,
                      eval_at=set(MARKS))
            for m, a in zip(r.extra["eval_steps"], r.accuracies):
                acc[k][m].append(a)
            sec[k].append(r.train_seconds / MARKS[-1])
        print(f"  task {i + 1}/{args.tasks} ({time.perf_counter() - t0:.0f} s): " + "  ".join(
            f"k={k} @5 {np.mean(acc[k][5]):.3f} @10 {np.mean(acc[k][10]):.3f}" for k in depths),
            flush=True)
    print(f"\n{args.tasks} tasks from {src.name}, {base.model_id}")
    print("| top k blocks | " + " | ".join(f"acc@{m}" for m in MARKS) + " | s / step |")
    print("|---|" + "---|" * (len(MARKS) + 1))
    for k in depths:
        m_s, c_s = mean_ci(sec[k])
        print(f"| {k} | " + " | ".join(fmt(acc[k][m]) for m in MARKS) + f" | {m_s:.2f} ± {c_s:.2f} |")
    write_json(args.json, {"model": base.model_id, "tasks": args.tasks, "depths": depths,
                           "accuracy": {str(k): {str(m): v for m, v in acc[k].items()}
                                        for k in depths},
                           "seconds_per_step": {str(k): v for k, v in sec.items()}})


if __name__ == "__main__":
    main()

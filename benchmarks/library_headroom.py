"""How much room is left for a library start over INIT, from committed per-task records.

#19 asks a library start (compose, merge, generate) to beat the single meta-init at step 1 by a
paired CI that excludes 0. This reads ``library_clinc.py`` records of the same tasks (one file
with the ``meta`` arm, INIT run through ``adapt``, and one or more files with library arms,
paired by task index) and reports, per step:

- each library arm − INIT, paired (mean ± 95% CI, tasks above/below);
- the **oracle gate**: per task the best of INIT and every library arm given, minus INIT. It reads
  the query labels, so no real gate reaches it; it bounds what any rule that picks one of these
  starts per task could gain. Part of it is only picking noise: the **null oracle** is the same
  maximum after each arm's differences are shifted to a mean of 0 (arms level with INIT, with
  the same per-task spread). Oracle − null oracle is the room beyond the scatter; the rest a
  rule reaches only by predicting the scatter's sign task by task;
- one query example's worth in points (100 / query size), the resolution of a task's accuracy;
- how well what is known before training (support only) predicts a task's step-1 difference:
  the Pearson correlation, on each half of the tasks (even, odd indices) separately, of the step-1
  difference with the search's support-loss reduction (objective at INIT alone − at the found
  weights), with Σ|wᵢ| and with INIT's support objective. A usable gate needs a correlation that
  holds on both halves.

    uv run python benchmarks/library_headroom.py \\
        --init benchmarks/results/smol_library/merge_meta_bound_in_domain.json \\
        --arms merge_meta_bound_in_domain.json:merge-meta=merge,merge_meta_bound_lr_in_domain.json:merge-meta=merge-lr
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
from _common import bad_input, mean_ci, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "smol_library"


def ci(x) -> str:
    m, half = mean_ci(x)
    return f"{m:+.1f} ± {half:.1f}"


@functools.cache  # INIT's file is read for its rows and its marks, and may hold an arm too
def load(path: str) -> dict:
    p = Path(path)
    p = p if p.exists() else RESULTS / p
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        bad_input(f"error: {path}: {e}")


def arm_rows(path: str, arm: str) -> dict[int, dict]:
    return {r["i"]: r[arm] for r in load(path)["results"] if arm in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", required=True, help="records with the meta (INIT) arm")
    ap.add_argument("--arms", required=True,
                    help="FILE:ARM=NAME,... library arms paired with INIT by task index "
                         "(FILE relative to benchmarks/results/smol_library/ unless it exists)")
    ap.add_argument("--query", type=int, default=50, help="query examples per task")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    init = {i: r["acc"] for i, r in arm_rows(args.init, "meta").items()}
    arms = {}
    for spec in args.arms.split(","):
        path, _, rest = spec.partition(":")
        arm, _, name = rest.partition("=")
        arms[name or arm] = arm_rows(path, arm)
        if not arms[name or arm]:
            bad_input(f"error: {path}: no records with the arm {arm!r} (--arms FILE:ARM=NAME)")
    tasks = sorted(set(init).intersection(*arms.values()))
    if len(tasks) < 4:
        bad_input(f"error: only {len(tasks)} tasks in common; need at least 4")
    marks = load(args.init)["args"].get("steps") or list(range(len(init[tasks[0]])))
    base = np.array([init[i] for i in tasks]) * 100
    accs = {n: np.array([a[i]["acc"] for i in tasks]) * 100 for n, a in arms.items()}
    out = {"tasks": len(tasks), "marks": marks, "one_query_example": 100 / args.query,
           "arms": {}, "oracle": {}, "gate_features": {}}
    print(f"{len(tasks)} tasks paired; one query example = {100 / args.query:.1f} points\n")
    print("| paired (points) | " + " | ".join(f"@{m}" for m in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for n, a in accs.items():
        d = a - base
        out["arms"][n] = [ci(d[:, j]) for j in range(len(marks))]
        print(f"| {n} − INIT | " + " | ".join(out["arms"][n]) + " |")
    best = np.max(np.stack([base] + list(accs.values())), axis=0)
    out["oracle"] = [ci(best[:, j] - base[:, j]) for j in range(len(marks))]
    print("| oracle gate (best of INIT and " + ", ".join(accs) + ") − INIT | "
          + " | ".join(out["oracle"]) + " |")
    level = [a - base - (a - base).mean(axis=0) for a in accs.values()]
    null = np.max(np.stack([np.zeros_like(base)] + level), axis=0)
    out["null_oracle"] = [ci(null[:, j]) for j in range(len(marks))]
    print("| null oracle (every arm shifted level with INIT) | "
          + " | ".join(out["null_oracle"]) + " |")
    step1 = marks.index(1) if 1 in marks else 1
    print(f"\nstep {marks[step1]}, per arm: tasks above / level / below INIT")
    for n, a in accs.items():
        d = a[:, step1] - base[:, step1]
        print(f"  {n}: {(d > 0).sum()} / {(d == 0).sum()} / {(d < 0).sum()}; "
              f"median |difference| {np.median(np.abs(d)):.1f} points")
    # halves by position in the paired task list (even / odd task indices when they are 0..N-1)
    print("\nsupport-only features against the step-1 difference (Pearson r, even / odd tasks)")
    for n, rows in arms.items():
        d = accs[n][:, step1] - base[:, step1]
        feats = {
            "support-loss reduction": [rows[i]["objective_init"] - rows[i]["objective"]
                                       for i in tasks],
            "Σ|w|": [sum(abs(w) for w in rows[i]["weights"]) for i in tasks],
            "INIT's support objective": [rows[i]["objective_init"] for i in tasks]}
        out["gate_features"][n] = {}
        for f, v in feats.items():
            v = np.asarray(v, dtype=float)
            r = [float(np.corrcoef(v[h::2], d[h::2])[0, 1]) for h in (0, 1)]
            out["gate_features"][n][f] = [round(x, 3) for x in r]
            print(f"  {n}, {f}: {r[0]:+.2f} / {r[1]:+.2f}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()

"""``adapt --switch auto`` against no switch at the same total step budget (issue 17).

Prompt tuning on stories260K is the case the switch is for: it plateaus low. Each task is adapted
three ways, all with ``--steps S`` in total:

* ``prompt``: prompt tuning for S steps (no switch);
* ``prompt, switch auto``: prompt tuning until its query curve plateaus (the defaults:
  no gain above 1% over 3 steps), then the selector's next method (the priors rank LoRA first)
  trained on top of the frozen prompt for the remaining steps;
* ``lora``: LoRA for S steps, for reference (what choosing the other method up front gives).

Reported per data set: query accuracy at steps 5/10/S (mean ± 95% CI over tasks, with the task
count), the paired difference switch − no switch, the share of tasks that switched and at which
step, the accuracy change at the switch (the rule: never more than the noise below), and the wall
time of each arm. The plateau is read off the query curve (as ``--stop-at-target`` is), so the
switch arm's accuracy carries that selection; the window and tolerance are the defaults, set
before any of these runs and not tuned here.

Two data sets: held-out CLINC150 tasks (test split of banking and travel, 5-way 5-shot, 10 query
per class) and synthetic tasks the project generates (``metapeft.data.synthetic``, the families with at
least 5 labels, 5-way 5-shot), so the result is not CLINC150's alone.

    uv run python benchmarks/switching.py [--tasks 30] [--steps 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import HELD_OUT_DOMAINS, STORIES, clinc_pool, fmt, mean_ci, require, write_json


def tasks_for(data: str, n: int):
    if data == "clinc":
        from metapeft.data.episodes import EpisodeSource

        src = EpisodeSource(clinc_pool("test", domains=HELD_OUT_DOMAINS), ways=5, shots=5,
                            query=10, name="clinc150-test-heldout")
        return [src.sample(30_000 + i) for i in range(n)]
    from metapeft.data.synthetic import FAMILIES, family_labels, generate_task

    fams = [f for f in FAMILIES if len(family_labels(f)) >= 5]  # 5-way needs 5 labels
    return [generate_task(40_000 + i, family=fams[i % len(fams)], ways=5, shots=5, query=10)
            for i in range(n)]


def run_arm(tasks, model: str, method: str, steps: int, switch: str) -> dict:
    from metapeft import api

    curves, switches, seconds = [], [], []
    for task in tasks:
        t0 = time.perf_counter()
        r = api.adapt(task, model=model, method=method, steps=steps, seed=0, switch=switch,
                      target=None)
        seconds.append(time.perf_counter() - t0)
        curves.append(r.accuracies)
        switches.append((r.extra.get("switches") or [None])[0])
    return {"curves": curves, "switches": switches, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=30)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data", default="clinc,synthetic")
    ap.add_argument("--model", default=str(STORIES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    require(STORIES, "stories260K")
    marks = sorted({5, 10, args.steps})
    arms = [("prompt", "prompt", "off"), ("prompt, switch auto", "prompt", "auto"),
            ("lora", "lora", "off")]
    out = {"model": args.model, "steps": args.steps, "tasks": args.tasks, "data": {}}
    for data in args.data.split(","):
        tasks = tasks_for(data, args.tasks)
        res = {name: run_arm(tasks, args.model, method, args.steps, switch)
               for name, method, switch in arms}
        acc = {name: np.array(r["curves"]) for name, r in res.items()}
        sw = [s for s in res["prompt, switch auto"]["switches"] if s and s.get("to")]
        change = [s["accuracy_after"] - s["accuracy_before"] for s in sw]
        diff = acc["prompt, switch auto"] - acc["prompt"]
        summary = {
            "arms": {name: {"accuracy": {m: mean_ci(a[:, m]) for m in marks},
                            "seconds_per_task": mean_ci(res[name]["seconds"])}
                     for name, a in acc.items()},
            "switch_minus_no_switch": {m: mean_ci(diff[:, m]) for m in marks},
            "switched": len(sw), "switch_steps": [s["step"] for s in sw],
            "switched_to": sorted({s["to"] for s in sw}),
            "accuracy_change_at_switch": {"mean": mean_ci(change) if change else None,
                                          "min": min(change) if change else None},
            "curves": {name: r["curves"] for name, r in res.items()},
            "switches": res["prompt, switch auto"]["switches"]}
        out["data"][data] = summary
        print(f"\n## {data}: stories260K, {len(tasks)} tasks, 5-way 5-shot, {args.steps} steps\n")
        print("| arm | " + " | ".join(f"@{m}" for m in marks) + " | s / task |")
        print("|---|" + "---|" * (len(marks) + 1))
        for name, a in acc.items():
            print(f"| {name} | " + " | ".join(fmt(a[:, m]) for m in marks)
                  + f" | {fmt(res[name]['seconds'], pct=False)} |")
        print("| switch − no switch (paired) | " + " | ".join(fmt(diff[:, m]) for m in marks)
              + " | |")
        steps_ = [s["step"] for s in sw]
        print(f"\nswitched on {len(sw)}/{len(tasks)} tasks, to {', '.join(summary['switched_to'])}"
              + (f", at step {np.median(steps_):.0f} (median; {min(steps_)}-{max(steps_)})"
                 if sw else "")
              + (f"; accuracy change at the switch {fmt(change)} (lowest "
                 f"{100 * min(change):+.1f})" if change else ""), flush=True)
        write_json(args.json, out)  # after each data set: a later failure loses nothing


if __name__ == "__main__":
    main()

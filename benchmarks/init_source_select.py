"""Does the experience store learn which init source wins for which kind of task? (issue 19 item 5)

Tiny model, synthetic tasks. A library of LoRAs is built from tasks of some families only
(``--library-families``) and a generator trained on it. Then every evaluation task (all synthetic
families in turn, fresh seeds) is adapted ``--steps`` steps from every available init source
(fresh, compose, generate, route; no meta-init is published here), as ``sweep --init-sources``
does, and each run becomes an experience record. Leave-one-out: each task's source is chosen by
``init_sources.rank`` from the records of the *other* tasks only, and scored by that source's
measured accuracy on the task. Compared with every fixed source, the prior's choice (no
experience) and the oracle (the best source per task, in hindsight). Accuracy in %, mean ± 95% CI
over tasks; paired differences per task.

    uv run python benchmarks/init_source_select.py --tasks 30 --steps 5 --json out.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter

import numpy as np

from _common import fmt, mean_ci, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--library-families", default="topic,sentiment")
    ap.add_argument("--per-family", type=int, default=3)
    ap.add_argument("--build-steps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ["METAPEFT_HOME"] = tempfile.mkdtemp(prefix="metapeft-initsrc-")
    os.environ["METAPEFT_EXPERIENCE"] = "off"

    from metapeft import api
    from metapeft.adapters import DEFAULT_METHOD, get_adapter_class
    from metapeft.data.synthetic import FAMILIES, generate_task
    from metapeft.experience import ExperienceRecord
    from metapeft.generate import train_generator
    from metapeft.init_sources import available, rank
    from metapeft.models import load_base_model
    from metapeft.select.features import feature_vector, task_features

    method = DEFAULT_METHOD
    base = load_base_model("tiny")
    t0 = time.perf_counter()
    for fam in args.library_families.split(","):
        for j in range(args.per_family):
            task = generate_task(1000 + 10 * j + FAMILIES.index(fam), family=fam, ways=3,
                                 shots=5, query=5)
            api.adapt(task, model="tiny", method=method, steps=args.build_steps, keep=True,
                      target=None, seed=j)
    train_generator(get_adapter_class(method).attach(base), epochs=200)
    build_s = time.perf_counter() - t0
    offered, missing = available(method, base)
    sources = [o["source"] for o in offered]
    print(f"library + generator built in {build_s:.1f} s; sources {sources}; not: "
          + ", ".join(m["source"] for m in missing), flush=True)

    rows, records, seconds = [], [], {s: [] for s in sources}
    for i in range(args.tasks):
        fam = FAMILIES[i % len(FAMILIES)]
        task = generate_task(5000 + i, family=fam, ways=3, shots=4, query=10)
        feats = task_features(task, base)
        acc = {}
        for o in offered:
            t = time.perf_counter()
            rep = api.adapt(task, model="tiny", method=method, steps=args.steps, init=o["init"],
                            route=o["route"], target=None, eval_at={args.steps}, seed=i)
            seconds[o["source"]].append(time.perf_counter() - t)
            acc[o["source"]] = rep.final_accuracy
            records.append(ExperienceRecord(
                task=task.name, domain=fam, method=method, features=feature_vector(feats),
                final_accuracy=rep.final_accuracy, source="sweep",
                run={"init": o["init"], "init_source": o["source"]}))
        rows.append({"task": task.name, "family": fam, "features": feats, "accuracy": acc})
        print(f"task {i + 1}/{args.tasks} {fam}: "
              + " ".join(f"{s} {a:.2f}" for s, a in acc.items()), flush=True)

    prior = rank(rows[0]["features"], offered, [], method, steps=args.steps)["chosen"]
    for r in rows:  # leave-one-out: the task's own runs are not evidence for it
        others = [x for x in records if x.task != r["task"]]
        r["learned"] = rank(r["features"], offered, others, method, domain=r["family"],
                            steps=args.steps)["chosen"]
    arms = {s: [r["accuracy"][s] for r in rows] for s in sources}
    arms["learned choice"] = [r["accuracy"][r["learned"]] for r in rows]
    arms[f"prior choice ({prior})"] = [r["accuracy"][prior] for r in rows]
    arms["oracle"] = [max(r["accuracy"].values()) for r in rows]
    best_fixed = max(sources, key=lambda s: np.mean(arms[s]))
    print(f"\n| arm | accuracy at step {args.steps} |\n|---|---:|")
    for name, v in arms.items():
        print(f"| {name} | {fmt(v)} |")
    diffs = {f"learned - {best_fixed} (best fixed)":
             np.subtract(arms["learned choice"], arms[best_fixed]),
             f"learned - prior ({prior})":
             np.subtract(arms["learned choice"], arms[f"prior choice ({prior})"]),
             "oracle - learned": np.subtract(arms["oracle"], arms["learned choice"])}
    print("\n| paired difference (points) | mean ± 95% CI |\n|---|---:|")
    for name, v in diffs.items():
        m, c = mean_ci(v)
        print(f"| {name} | {100 * m:+.1f} ± {100 * c:.1f} |")
    by_family = {f: dict(Counter(r["learned"] for r in rows if r["family"] == f))
                 for f in FAMILIES}
    wins = {f: dict(Counter(max(r["accuracy"], key=r["accuracy"].get) for r in rows
                            if r["family"] == f)) for f in FAMILIES}
    print("\nlearned choice by family:", by_family)
    print("best source by family (hindsight):", wins)
    print("seconds per run:", {s: round(float(np.mean(v)), 3) for s, v in seconds.items()})
    write_json(args.json, {
        "args": vars(args), "build_seconds": build_s, "sources": sources, "prior": prior,
        "arms": {k: mean_ci(v) for k, v in arms.items()},
        "diffs": {k: mean_ci(v) for k, v in diffs.items()}, "learned_by_family": by_family,
        "best_by_family": wins, "rows": [{k: r[k] for k in ("task", "family", "accuracy",
                                                            "learned")} for r in rows]})


if __name__ == "__main__":
    main()

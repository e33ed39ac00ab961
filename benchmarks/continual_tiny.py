"""Continual meta-training on the tiny model (issue 17 item 1): v1 meta-trained on the synthetic
``topic`` family, then continued on ``intent`` with each forgetting control. Prints, per arm,
forgetting (accuracy drop at step 5 on v1's validation tasks, v1 vs the new version, each at its
own adapt_lr) and gain (accuracy at step 5 on intent's validation tasks, new minus v1), and
‖θ − θ_v1‖. Small: a handful of validation tasks, a random tiny model.

    uv run python benchmarks/continual_tiny.py [--episodes 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from metapeft import api

ARMS = [("none", {}), ("ewc", {}), ("ewc", {"ewc_lambda": 100.0}), ("replay", {}),
        ("both", {})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--meta-steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    kw = dict(model="tiny", ways=3, shots=3, query=3, meta_steps=a.meta_steps, meta_batch=4,
              inner_steps=5, eval_every=5, eval_episodes=a.episodes, val_fraction=0.34)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        t0 = time.time()
        api.meta_train("synthetic", name="c", registry=root, domains=["topic"], **kw)
        print(f"v1 on topic: {time.time() - t0:.0f} s", flush=True)
        for mode, extra in ARMS:
            t0 = time.time()
            rep = api.meta_train("synthetic", name="c", registry=root, domains=["intent"],
                                 init="c@1", forgetting=mode, **extra, **kw)
            c = rep.result.extra["continual"]
            f, g = c["forgetting"], c["gain"]
            row = {"arm": mode + (f" λ={extra['ewc_lambda']:g}" if extra else ""),
                   "forgetting": f["drop"], "parent_on_old": f["accuracy_parent"],
                   "new_on_old": f["accuracy_new"], "gain": g["gain"],
                   "parent_on_new": g["accuracy_parent"], "new_on_new": g["accuracy_new"],
                   "distance": c["distance_to_parent"], "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| arm | old tasks: v1 → new (forgetting) | new tasks: v1 → new (gain) | ‖θ − θ_v1‖ |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['parent_on_old']:.1%} → {r['new_on_old']:.1%} "
              f"({r['forgetting']:+.1%}) | {r['parent_on_new']:.1%} → {r['new_on_new']:.1%} "
              f"({r['gain']:+.1%}) | {r['distance']:.3f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()

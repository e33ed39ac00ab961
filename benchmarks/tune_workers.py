"""Parallel tuning: wall-clock time to N trials with ``metapeft tune --workers 2`` against one
worker, and the best trial's quality at that equal trial count, on the same episode and seed.

    uv run python benchmarks/tune_workers.py                    # stories260K, 10 trials, seed 0
    uv run python benchmarks/tune_workers.py --seeds 0,1,2      # three episodes/seeds

Each run is the command a user types, timed from start to exit (process start, model load and
the optimiser included): ``metapeft tune CLINC150/train.jsonl --shots 5 --ways 5 --query 5
--model M --methods lora --trials N --seed S [--workers W]`` with the default objectives
(accuracy, seconds, memory; ParEGO), no warm start and no experience records, so the two runs
see the same study from the same empty start. One worker runs in one process; with
``--workers 2`` the command starts two ranks of MLX's ring backend itself (as ``meta-train
--processes`` does, no ``mlx.launch``), which ask skopt for batches of 2 (constant liar). The episode is drawn from the CLINC150 train split by the seed. The machine's
load average is printed around every run: on a shared machine read the speed-up with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import CLINC, STORIES, require, write_json


def run(workers: int, seed: int, args, registry: Path) -> dict:
    cmd = [sys.executable, "-m", "metapeft.cli", "tune", str(CLINC / "train.jsonl"),
           "--shots", "5", "--ways", "5", "--query", "5", "--model", args.model,
           "--methods", args.methods, "--trials", str(args.trials), "--steps", str(args.steps),
           "--seed", str(seed), "--name", f"s{seed}w{workers}", "--registry", str(registry),
           "--no-warm-start", "--no-record", "--json"]
    if workers != 1:
        cmd += ["--workers", str(workers)]
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "METAPEFT_RUNS": "off"})
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{workers} worker(s), seed {seed} failed:\n{p.stderr[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    ok = [t for t in out["trials"] if t["status"] == "ok"]
    best = max(ok, key=lambda t: t["accuracy"]) if ok else None
    rec = out["recommended"]
    return {"workers": workers, "seed": seed, "wall": wall, "load_before": load0,
            "load_after": os.getloadavg()[0], "trials": len(out["trials"]),
            "failed": len(out["trials"]) - len(ok),
            "best_accuracy": best["accuracy"] if best else None,
            "best_trial": best["index"] if best else None,
            "recommended": {k: rec.get(k) for k in ("index", "accuracy", "seconds")} if rec
            else None,
            "mean_trial_seconds": sum(t["seconds"] for t in ok) / max(len(ok), 1),
            "sources": [t["source"] for t in out["trials"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(STORIES))
    ap.add_argument("--methods", default="lora")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20, help="training steps per trial")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--json")
    args = ap.parse_args()
    require(Path(args.model), "the model")
    require(CLINC, "CLINC150")
    print(f"{os.cpu_count()} cores; load average now {os.getloadavg()[0]:.2f}\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="metapeft-tune-bench-") as d:
        for seed in (int(s) for s in args.seeds.split(",")):
            pair = [run(w, seed, args, Path(d)) for w in (1, args.workers)]
            for r in pair:
                print(f"seed {seed}, {r['workers']} worker(s): {r['wall']:.1f} s wall, best "
                      f"accuracy {r['best_accuracy']:.3f} (trial {r['best_trial']}), mean "
                      f"trial {r['mean_trial_seconds']:.2f} s, load {r['load_before']:.2f} -> "
                      f"{r['load_after']:.2f}", flush=True)
            rows.append(pair)
    print(f"\n{Path(args.model).name}, {args.methods}, {args.trials} trials of {args.steps} "
          f"steps, CLINC150 train 5-way 5-shot (5 query/class) episode per seed\n")
    print(f"| seed | load (1 min) | wall s, 1 worker | {args.workers} workers | speed-up | "
          f"best acc, 1 worker | {args.workers} workers | mean trial s, 1 | {args.workers} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for one, many in rows:
        load = [one["load_before"], one["load_after"], many["load_after"]]
        print(f"| {one['seed']} | {min(load):.1f}-{max(load):.1f} | {one['wall']:.1f} | "
              f"{many['wall']:.1f} | {one['wall'] / many['wall']:.2f}x | "
              f"{one['best_accuracy']:.3f} | {many['best_accuracy']:.3f} | "
              f"{one['mean_trial_seconds']:.2f} | {many['mean_trial_seconds']:.2f} |")
    write_json(args.json, {"args": vars(args), "runs": rows})


if __name__ == "__main__":
    main()

"""Data-parallel meta-training: meta-steps/s with 1 and with N processes (mx.distributed, ring
backend, mlx.launch on localhost) in the same run, on the same tasks, with the speed-up, the
largest |θ_N − θ_1| of the published weights, and the bytes all-reduced per meta-step.

    uv run python benchmarks/meta_distributed.py                      # stories260K, 1 vs 2
    uv run python benchmarks/meta_distributed.py --smol               # and SmolLM2-135M

Both runs go through ``mlx.launch`` (the 1-process one with ``-n 1``), so the launcher's own
CPU use (it polls its children's pipes) weighs on both. Each run is ``api.meta_train`` on the
CLINC150 train split of the meta-train domains (banking and travel left out), 5-way 5-shot,
5 query per class, LoRA (its defaults: rank 8, every linear layer of the top 16 blocks), Reptile,
no validation and no lr calibration: meta-steps only (4 meta-steps × 4 tasks × 2 inner steps by
default; a stories260K CLINC150 meta-step at the recipe's 10 inner steps takes about a minute on
one of our cores). The rate is taken over the steps after the
first ``--warmup`` (which include tracing the vmapped step). The machine's load average is
printed before and after: on a shared machine, read the speed-up with it.
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

from _common import CLINC, HELD_OUT_DOMAINS, SMOL, STORIES, require, write_json


def worker(args) -> None:
    """One rank of a run (started by mlx.launch): meta-train, rank 0 writes the timings."""
    from metapeft import api
    from metapeft.meta.distributed import world

    group = world()
    stamps = []
    data = str(CLINC / "train.jsonl") if CLINC.exists() else "synthetic"
    rep = api.meta_train(data, model=args.model, method="lora", algorithm=args.algorithm,
                         name="bench", registry=args.registry, ways=5, shots=5, query=5,
                         meta_steps=args.meta_steps, meta_batch=args.meta_batch,
                         inner_steps=args.inner_steps, eval_every=0, calibrate_lr=False,
                         exclude_domains=HELD_OUT_DOMAINS if data != "synthetic" else None,
                         on_step=lambda *a: stamps.append(time.perf_counter()))
    if group.rank() == 0:
        params = sum(v.size for v in rep.adapter.flat(rep.result.best_theta).values())
        write_json(args.out, {"processes": group.size(), "stamps": stamps, "path": rep.path,
                              "seconds": rep.result.seconds, "theta_params": int(params),
                              "data": data})


def launch(n: int, args, model: str, work: Path) -> dict:
    from metapeft.cli.launch import ring_command

    out = work / f"n{n}.json"
    cmd = ring_command(n, [sys.executable, __file__, "--worker", "--model", model,
                           "--registry", str(work / f"reg{n}"), "--out", str(out),
                           "--meta-steps", str(args.meta_steps),
                           "--meta-batch", str(args.meta_batch),
                           "--inner-steps", str(args.inner_steps), "--algorithm", args.algorithm])
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    if not out.exists():
        sys.exit(f"the {n}-process run wrote no result (see its output above)")
    res = json.loads(out.read_text())
    res["wall"] = time.perf_counter() - t
    s = res["stamps"]
    w = min(args.warmup, len(s) - 1)
    res["steps_per_s"] = (len(s) - w) / (s[-1] - s[w - 1]) if w else len(s) / res["seconds"]
    return res


def max_diff(a: str, b: str) -> float:
    from metapeft.artifacts import load_safetensors

    import numpy as np

    x, y = load_safetensors(a)[0], load_safetensors(b)[0]
    return max(float(np.abs(np.array(x[k]) - np.array(y[k])).max()) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--registry", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=str(STORIES))
    ap.add_argument("--smol", action="store_true", help="also run SmolLM2-135M-Instruct")
    ap.add_argument("--smol-meta-steps", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--meta-steps", type=int, default=4)
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=2,
                    help="inner Adam steps per task (the recipe's 10 gives the processes more "
                         "to do per all-reduce; 2 keeps the run to a few minutes)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--algorithm", default="reptile")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    require(Path(args.model), "the model")
    runs = [(args.model, args.meta_steps)]
    if args.smol:
        runs.append((str(require(SMOL, "SmolLM2-135M-Instruct")), args.smol_meta_steps))
    load0 = os.getloadavg()
    print(f"load average before: {load0[0]:.2f} (1 min) on {os.cpu_count()} cores\n")
    rows, report = [], {"load_before": load0, "cpus": os.cpu_count(), "runs": []}
    for model, steps in runs:
        args.meta_steps = steps
        with tempfile.TemporaryDirectory(prefix="metapeft-dist-bench-") as d:
            one = launch(1, args, model, Path(d))
            many = launch(args.processes, args, model, Path(d))
            diff = max_diff(one["path"], many["path"])
        name = Path(model).name
        nbytes = 4 * (one["theta_params"] + 3)  # θ's float32 leaves + loss, accuracy, count
        speedup = many["steps_per_s"] / one["steps_per_s"]
        rows.append(f"| {name} | {one['steps_per_s']:.3f} | {many['steps_per_s']:.3f} | "
                    f"{speedup:.2f}x | {diff:.1e} | {one['theta_params']:,} | {nbytes / 1e3:,.1f} |")
        report["runs"].append({"model": model, "meta_steps": steps, "one": one, "many": many,
                               "speedup": speedup, "max_abs_theta_diff": diff,
                               "allreduce_bytes": nbytes})
    load1 = os.getloadavg()
    report["load_after"] = load1
    print(f"\n{args.algorithm}, meta-batch {args.meta_batch}, {args.inner_steps} inner steps, "
          f"rate over meta-steps after the first {args.warmup}:\n")
    print(f"| model | meta-steps/s, 1 process | {args.processes} processes | speed-up | "
          f"max abs θ diff | θ params | KB all-reduced / meta-step |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nload average after: {load1[0]:.2f} (1 min)")
    write_json(args.json, report)


if __name__ == "__main__":
    main()

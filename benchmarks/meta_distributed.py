"""Data-parallel meta-training: meta-steps/s with 1 and with N processes (mx.distributed, ring
backend, on localhost) in the same run, on the same tasks, with the speed-up, the largest
|θ_N − θ_1| of the published weights, the bytes all-reduced per meta-step, and where each
rank's time goes.

    uv run python benchmarks/meta_distributed.py                      # stories260K, 1 vs 2
    uv run python benchmarks/meta_distributed.py --smol               # and SmolLM2-135M
    uv run python benchmarks/meta_distributed.py --launcher mlx.launch  # both arms under mlx.launch

By default the ranks are started directly, as ``meta-train --processes N`` does
(``cli.launch.run_local_ring``: ``MLX_RANK`` and a ring hostfile on 127.0.0.1, a 10 Hz wait);
the 1-process arm is the same worker started as a plain subprocess (what ``meta-train
--processes 1`` runs; a ring of one cannot initialise). ``--launcher mlx.launch`` runs both arms under MLX's launcher instead (the
1-process arm with ``-n 1``), whose busy polling costs a share of a core here.

Each run is ``api.meta_train`` on the CLINC150 train split of the meta-train domains (banking and
travel left out), 5-way 5-shot, 5 query per class, LoRA (its defaults: rank 8, every linear
layer of the top 16 blocks), Reptile, no validation and no lr calibration: meta-steps only
(4 meta-steps × 4 tasks × 2 inner steps by default; SmolLM2 ``--smol-meta-steps``, default 3).
The rate is taken over the steps after the first ``--warmup`` (which include tracing the
vmapped step).

Where the time goes: every rank stamps each meta-step's end, the moment its own tasks are done
and it enters the all-reduce, and the moment the all-reduce returns (``all_sum_tree`` wrapped),
with its CPU seconds. Per rank and meta-step (after the warm-up): *compute* (previous step's end
to entering the all-reduce: its share of the tasks), *wait* (inside the all-reduce: the transfer
plus waiting for the slower rank; the rank that arrives last waits for the transfer only), and
the CPU cores it kept busy (CPU seconds / wall seconds). The 1-process arm's compute is the
whole step. After training, the ranks time one all-reduce of θ's size with both ready (after a
barrier; the median of 10): the transfer alone. The machine's load average is printed before and after every arm: on a shared
machine, read the speed-up with it.
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
    """One rank of a run: meta-train; every rank writes its timings, rank 0 the run's result."""
    from metapeft import api
    from metapeft.meta import distributed as dist
    from metapeft.meta.distributed import world

    group = world()
    stamps, cpu, enter, leave = [], [], [], []
    reduce = dist.all_sum_tree

    def timed_all_sum_tree(tree, grp, *scalars):  # the learner's one all-reduce per meta-step
        import mlx.core as mx
        from mlx.utils import tree_flatten

        # finish this rank's own work first (a no-op where the learner evaluated it already),
        # so the wait below is the all-reduce alone
        mx.eval([v for _, v in tree_flatten(tree)], [x for x in scalars
                                                      if isinstance(x, mx.array)])
        enter.append(time.perf_counter())
        out = reduce(tree, grp, *scalars)
        leave.append(time.perf_counter())
        return out

    dist.all_sum_tree = timed_all_sum_tree

    def on_step(*_):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())

    data = str(CLINC / "train.jsonl") if CLINC.exists() else "synthetic"
    rep = api.meta_train(data, model=args.model, method="lora", algorithm=args.algorithm,
                         name="bench", registry=args.registry, ways=5, shots=5, query=5,
                         meta_steps=args.meta_steps, meta_batch=args.meta_batch,
                         inner_steps=args.inner_steps, eval_every=0, calibrate_lr=False,
                         exclude_domains=HELD_OUT_DOMAINS if data != "synthetic" else None,
                         on_step=on_step)
    rank = group.rank()
    write_json(f"{args.out}.rank{rank}", {"rank": rank, "stamps": stamps, "cpu": cpu,
                                          "enter": enter, "leave": leave,
                                          "allreduce_s": allreduce_alone(rep, group)})
    if rank == 0:
        params = sum(v.size for v in rep.adapter.flat(rep.result.best_theta).values())
        write_json(args.out, {"processes": group.size(), "stamps": stamps, "path": rep.path,
                              "seconds": rep.result.seconds, "theta_params": int(params),
                              "data": data})


def allreduce_alone(rep, group, repeats: int = 10) -> float | None:
    """Median seconds of one all-reduce of θ's size (float32, plus the 3 scalars) with both
    ranks idle and ready: the transfer itself, without waiting for a slower rank."""
    if group.size() == 1:
        return None
    import mlx.core as mx

    from metapeft.meta import distributed as dist

    n = sum(v.size for v in rep.adapter.flat(rep.result.best_theta).values()) + 3
    x = mx.ones((n,))
    times = []
    for _ in range(repeats + 1):
        dist.barrier(group)
        t = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=group))
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[repeats // 2]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def breakdown(n: int, out: Path, warmup: int) -> list[dict]:
    """Per rank, means over the meta-steps after ``warmup``: step, compute and all-reduce wait
    seconds, and the CPU cores kept busy."""
    rows = []
    for r in range(n):
        d = json.loads(Path(f"{out}.rank{r}").read_text())
        s, c, e, l = d["stamps"], d["cpu"], d["enter"], d["leave"]
        steps = range(max(warmup, 1), len(s))  # step k runs from s[k-1] to s[k]
        if not steps:
            continue
        wall = [s[k] - s[k - 1] for k in steps]
        busy = [(c[k] - c[k - 1]) / (s[k] - s[k - 1]) for k in steps]
        if e:
            comp = [e[k] - s[k - 1] for k in steps]
            wait = [l[k] - e[k] for k in steps]
        else:  # one process: no all-reduce, the whole step is compute
            comp, wait = wall, [0.0] * len(wall)
        rows.append({"rank": r, "step_s": _mean(wall), "compute_s": _mean(comp),
                     "wait_s": _mean(wait), "cores_busy": _mean(busy),
                     "allreduce_alone_s": d.get("allreduce_s"),
                     "per_step": {"step": wall, "compute": comp, "wait": wait, "busy": busy}})
    return rows


def launch(n: int, args, model: str, work: Path) -> dict:
    from metapeft.cli.launch import ring_command, run_local_ring

    out = work / f"n{n}.json"
    cmd = [sys.executable, __file__, "--worker", "--model", model,
           "--registry", str(work / f"reg{n}"), "--out", str(out),
           "--meta-steps", str(args.meta_steps), "--meta-batch", str(args.meta_batch),
           "--inner-steps", str(args.inner_steps), "--algorithm", args.algorithm]
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    if args.launcher == "mlx.launch":
        subprocess.run(ring_command(n, cmd), check=True)
    elif n == 1:  # what meta-train --processes 1 does: the command itself (a ring of one
        # cannot init: it connects to itself)
        subprocess.run(cmd, check=True)
    else:
        folder = work / f"ring{n}"
        folder.mkdir()
        bad = run_local_ring(n, cmd, {}, folder)
        if bad:
            sys.exit(f"the {n}-process run failed: (rank, exit status) {bad}")
    if not out.exists():
        sys.exit(f"the {n}-process run wrote no result (see its output above)")
    res = json.loads(out.read_text())
    res["wall"] = time.perf_counter() - t
    res["load"] = [load0, os.getloadavg()[0]]
    s = res["stamps"]
    w = min(args.warmup, len(s) - 1)
    res["steps_per_s"] = (len(s) - w) / (s[-1] - s[w - 1]) if w else len(s) / res["seconds"]
    res["ranks"] = breakdown(n, out, w)
    for r in res["ranks"]:
        print(f"  {Path(model).name}, {n} process(es), rank {r['rank']}: step "
              f"{r['step_s']:.2f} s = compute {r['compute_s']:.2f} s + all-reduce wait "
              f"{r['wait_s']:.3f} s (+ update), {r['cores_busy']:.2f} cores busy"
              + (f"; one all-reduce of θ's size with both ranks ready: "
                 f"{1000 * r['allreduce_alone_s']:.1f} ms" if r["allreduce_alone_s"] else ""),
              flush=True)
    if n > 1 and len(res["ranks"]) == n:  # per meta-step across the ranks
        steps = list(zip(*(r["per_step"]["compute"] for r in res["ranks"])))
        waits = list(zip(*(r["per_step"]["wait"] for r in res["ranks"])))
        res["split"] = {"slowest_compute_s": _mean([max(c) for c in steps]),
                        "mean_compute_s": _mean([_mean(c) for c in steps]),
                        "transfer_s": _mean([min(w) for w in waits]),
                        "step_s": _mean([_mean(r["per_step"]["step"]) for r in res["ranks"]])}
        sp = res["split"]
        print(f"  {Path(model).name}, {n} processes, per meta-step: {sp['step_s']:.2f} s = the "
              f"slowest rank's compute {sp['slowest_compute_s']:.2f} s (mean rank "
              f"{sp['mean_compute_s']:.2f} s) + the all-reduce once both are in "
              f"{1000 * sp['transfer_s']:.1f} ms (the last rank's wait) + the update",
              flush=True)
    print(f"  {Path(model).name}, {n} process(es): {res['steps_per_s']:.4f} meta-steps/s, "
          f"{res['wall']:.0f} s wall, load {load0:.2f} -> {res['load'][1]:.2f}", flush=True)
    return res


def max_diff(a: str, b: str) -> float:
    import numpy as np

    from metapeft.artifacts import load_safetensors

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
    ap.add_argument("--smol-only", action="store_true", help="run SmolLM2-135M-Instruct only")
    ap.add_argument("--smol-meta-steps", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--launcher", choices=("direct", "mlx.launch"), default="direct",
                    help="start the ranks directly (as meta-train --processes does; default) "
                         "or under mlx.launch")
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
    runs = [] if args.smol_only else [(str(require(Path(args.model), "the model")),
                                       args.meta_steps)]
    if args.smol or args.smol_only:
        runs.append((str(require(SMOL, "SmolLM2-135M-Instruct")), args.smol_meta_steps))
    load0 = os.getloadavg()
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (1/5/15 min) on "
          f"{os.cpu_count()} cores; ranks started by {args.launcher}\n", flush=True)
    rows, detail, split = [], [], []
    report = {"load_before": load0, "cpus": os.cpu_count(), "launcher": args.launcher,
              "settings": {k: getattr(args, k) for k in ("meta_batch", "inner_steps", "warmup",
                                                          "algorithm", "processes")},
              "runs": []}
    for model, steps in runs:
        args.meta_steps = steps
        with tempfile.TemporaryDirectory(prefix="metapeft-dist-bench-") as d:
            one = launch(1, args, model, Path(d))
            many = launch(args.processes, args, model, Path(d))
            diff = max_diff(one["path"], many["path"])
        name = Path(model).name
        nbytes = 4 * (one["theta_params"] + 3)  # θ's float32 leaves + loss, accuracy, count
        speedup = many["steps_per_s"] / one["steps_per_s"]
        load = one["load"] + many["load"]
        rows.append(f"| {name} | {steps} | {min(load):.2f}-{max(load):.2f} | "
                    f"{one['steps_per_s']:.4f} | {many['steps_per_s']:.4f} | {speedup:.2f}x | "
                    f"{diff:.1e} | {one['theta_params']:,} | {nbytes / 1e3:,.1f} |")
        o = one["ranks"][0]
        detail.append(f"| {name} | 1 | all | {o['step_s']:.2f} | {o['compute_s']:.2f} | - | "
                      f"{o['cores_busy']:.2f} | - |")
        for r in many["ranks"]:
            alone = r["allreduce_alone_s"]
            detail.append(f"| {name} | {args.processes} | {r['rank']} | {r['step_s']:.2f} | "
                          f"{r['compute_s']:.2f} | {r['wait_s']:.3f} | {r['cores_busy']:.2f} | "
                          f"{'-' if alone is None else f'{1000 * alone:.1f}'} |")
        if "split" in many:
            sp, c1 = many["split"], one["ranks"][0]["compute_s"]
            split.append(f"| {name} | {c1:.2f} | {c1 / args.processes:.2f} | "
                         f"{sp['mean_compute_s']:.2f} | {sp['slowest_compute_s']:.2f} | "
                         f"{1000 * sp['transfer_s']:.1f} | {sp['step_s']:.2f} |")
        report["runs"].append({"model": model, "meta_steps": steps, "one": one, "many": many,
                               "speedup": speedup, "max_abs_theta_diff": diff,
                               "allreduce_bytes": nbytes})
    load1 = os.getloadavg()
    report["load_after"] = load1
    print(f"\n{args.algorithm}, meta-batch {args.meta_batch}, {args.inner_steps} inner steps, "
          f"rate over meta-steps after the first {args.warmup}, ranks started by "
          f"{args.launcher}:\n")
    print(f"| model | meta-steps | load (1 min) | meta-steps/s, 1 process | {args.processes} "
          f"processes | speed-up | max abs θ diff | θ params | KB all-reduced / meta-step |\n"
          f"|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nper rank, mean seconds per meta-step after the warm-up:\n")
    print("| model | processes | rank | step s | compute s | all-reduce wait s | cores busy | "
          "all-reduce alone ms |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(detail))
    print(f"\nwhere a {args.processes}-process meta-step's time goes (means over the meta-steps "
          f"after the warm-up; per meta-step, the slowest rank's compute plus the all-reduce "
          f"once every rank is in, i.e. the last rank's wait, make the step, with the update):\n")
    print(f"| model | 1 process: compute s | ideal per rank (1 / {args.processes}) | "
          f"{args.processes} processes: mean rank compute s | slowest rank compute s | "
          f"all-reduce ms | step s |\n|---|---|---|---|---|---|---|")
    print("\n".join(split))
    print(f"\nload average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} (1/5/15 min)")
    write_json(args.json, report)


if __name__ == "__main__":
    main()

"""HPO benchmark: BO (skopt GP + ParEGO) vs random search vs configs/ defaults, warm vs cold BO.

Tasks: N-way K-shot episodes drawn from the held-out CLINC150 domains (banking, travel; never
used to pick defaults or to meta-train), alternating domains, on stories260K.

For every task, at an equal budget of T trials:
- ``default``: each searched method's defaults, what ``metapeft adapt`` runs without options and
  the study's own default seed point (``SearchSpace.default_params``; 1 trial/method);
- ``random``: T configurations drawn uniformly from configs/search_spaces.yaml;
- ``bo-cold``: ``metapeft tune`` without experience (defaults first, then LHS, then GP/EI), on
  the objectives accuracy + training seconds (ParEGO);
- ``bo-warm``: the same, warm-started from the experience store, which holds every trial of the
  earlier tasks of this run (so task 0 is effectively cold).

Each task also holds a *test* set (``--test`` examples per class) that no arm ever sees while
searching: the search optimises query (validation) accuracy, and each arm's chosen configuration
(its best trial by query accuracy) is then retrained and scored on the test set, so the headline
gain is not an artefact of selecting on the split that is reported.

Reported (mean over tasks with a 95% t-interval): best query accuracy after t trials, the
hypervolume of the accuracy/seconds front (reference: accuracy 0 and 1.1 x the slowest trial of
that task over all arms, so arms are comparable per task), the relative gain of the best
accuracy over the defaults, and trials needed to reach 95% of the task's best accuracy over all
arms (T + 1 when never reached).

Smoke run (minutes):     uv run python benchmarks/hpo_eval.py
Full size (hours, CPU):  uv run python benchmarks/hpo_eval.py --tasks 20 --trials 20 --steps 20
Over 2 processes:        uv run python benchmarks/hpo_eval.py --processes 2 --out hpo.json

``--processes N`` runs the tasks over MLX's distributed engine (``benchmarks/_ranks.py``): N
ranks of the ring backend on this machine, started as ``meta-train --processes`` starts its own;
rank r runs every arm of the tasks i with i % N == r (each rank's ``tune`` studies run as one
process), one gather brings the rows to rank 0, which writes ``--out`` and prints the report.
The ranks share one ``--registry`` (a fresh temporary one unless given), so, as with ``--shard``,
bo-warm's experience store holds the trials of the tasks every rank has finished by then (which
can include a later task of another rank, and depends on timing); the other arms are the same as
in one process. With ``--out``, each rank also keeps ``OUT.rankR`` (its rows, rewritten after
every task, removed once rank 0 wrote ``--out``): after an interrupted run, ``--merge`` them.
``--shard K/N`` still selects a subset of the tasks (split over the processes in turn).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import metapeft  # noqa: F401  (OpenBLAS before mlx)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def clinc_tasks(path: Path, n: int, ways: int, shots: int, query: int, seed: int,
                test: int = 0, domains=("banking", "travel")):
    """``n`` (search task, held-out test task) pairs: the same support set, disjoint query
    (validation) and test examples, drawn by the library's episode sampler."""
    from metapeft.data.episodes import choose_classes, draw_examples, group_by_label
    from metapeft.data.tasks import Task, read_rows

    pool = read_rows(path)
    by_dom = {d: group_by_label(e for e in pool if e.extra.get("domain") == d) for d in domains}
    tasks = []
    for i in range(n):
        dom = domains[i % len(domains)]
        rng = random.Random(f"hpo:{seed}:{i}")
        labels = choose_classes(rng, sorted(by_dom[dom]), ways)
        # only the support set is shuffled: query and test stay in class order
        sup, qry, tst = draw_examples(rng, by_dom[dom], labels, (shots, query, test),
                                      shuffle=(True, False, False))
        name = f"clinc-{dom}-{i}"
        tasks.append((Task(name=name, support=sup, query=qry, labels=labels,
                           meta={"domain": dom}),
                      Task(name=name + "-test", support=sup, query=tst, labels=labels,
                           meta={"domain": dom})))
    return tasks


def best_trial(trials: list[dict]) -> dict | None:
    ok = [t for t in trials if t.get("status") == "ok" and t.get("accuracy") is not None]
    return max(ok, key=lambda t: float(t["accuracy"])) if ok else None


def best_curve(trials: list[dict], T: int) -> list[float]:
    best, out = 0.0, []
    for t in trials[:T]:
        if t.get("status") == "ok" and t.get("accuracy") is not None:
            best = max(best, float(t["accuracy"]))
        out.append(best)
    while len(out) < T:
        out.append(out[-1] if out else 0.0)
    return out


def hv(trials: list[dict], ref_s: float) -> float:
    from metapeft.tune.pareto import hypervolume_2d

    pts = [[t["accuracy"], t["seconds"]] for t in trials if t.get("status") == "ok"]
    return hypervolume_2d(pts, ["max", "min"], [0.0, ref_s]) if pts else 0.0


def ci(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    from scipy import stats

    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, float(stats.t.ppf(0.975, len(xs) - 1)) * sd / math.sqrt(len(xs))


def fmt(xs, pct=False, digits=3):
    m, h = ci(xs)
    if math.isnan(m):
        return "n/a"
    if pct:
        return f"{100 * m:.1f}% ± {100 * h:.1f}" if math.isfinite(h) else f"{100 * m:.1f}%"
    return f"{m:.{digits}g} ± {h:.2g}" if math.isfinite(h) else f"{m:.{digits}g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    ap.add_argument("--data", default=str(SHARED / "data" / "clinc150" / "test.jsonl"))
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--methods", default="lora")
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--query", type=int, default=6)
    ap.add_argument("--test", type=int, default=10,
                    help="held-out test examples per class, never seen by any search")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="Write the raw per-task results here (JSON, rewritten after every task, "
                         "so a stopped run keeps what it measured).")
    ap.add_argument("--shard", default="0/1",
                    help="K/N: run only tasks i with i %% N == K (run N processes, one per core, "
                         "with the same --registry, then --merge their --out files)")
    ap.add_argument("--registry", default=None,
                    help="experience store + studies (default: a fresh temp dir). Shards share "
                         "it, so bo-warm sees the trials of earlier tasks of every shard.")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="report from these --out files instead of running")
    ap.add_argument("--processes", type=int, default=1,
                    help="run the tasks over N processes (MLX ring backend on this machine; "
                         "rank 0 gathers the rows, writes --out and reports)")
    args = ap.parse_args(argv)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = sorted((r for run in runs for r in run["rows"]), key=lambda r: r["index"])
        settings = runs[0]["settings"]
        report(rows, settings, wall=sum(run.get("wall_seconds", 0.0) for run in runs),
               wall_label=f"Wall time summed over {len(runs)} shard(s)")
        return 0

    if not Path(args.data).exists() or not (args.model == "tiny"
                                             or (Path(args.model) / "config.json").exists()):
        print(f"missing data or model ({args.data}, {args.model})", file=sys.stderr)
        return 2
    import _ranks

    if args.processes > 1 and not _ranks.in_rank():  # start the ranks, sharing one registry
        reg = args.registry or tempfile.mkdtemp(prefix="hpo_eval_")
        return _ranks.launch(args.processes,
                             [] if args.registry else ["--registry", reg])
    from metapeft.artifacts import atomic_write_text
    from metapeft.tune.space import load_space

    shard_k, shard_n = (int(v) for v in args.shard.split("/"))
    reg = (Path(args.registry) if args.registry
           else Path(tempfile.mkdtemp(prefix="hpo_eval_")))  # a private experience store
    reg.mkdir(parents=True, exist_ok=True)
    tasks = clinc_tasks(Path(args.data), args.tasks, args.ways, args.shots, args.query,
                        args.seed, test=args.test)
    settings = {k: getattr(args, k) for k in ("model", "methods", "trials", "steps", "ways",
                                               "shots", "query", "test", "seed", "tasks")}
    space = load_space(None, args.methods)
    grp = _ranks.group()  # size 1 unless --processes started this process
    rank, size = grp.rank(), grp.size()
    out = args.out if size == 1 or not args.out else f"{args.out}.rank{rank}"
    mine = _ranks.share([i for i in range(len(tasks)) if i % shard_n == shard_k], grp)
    t_start = time.perf_counter()
    with _ranks.alone():  # each rank's studies run as one process
        rows = run_tasks(tasks, mine, args, space, reg, settings, out, t_start)
    if size > 1:  # every rank's rows to rank 0, which writes --out and reports
        rows = sorted((r for part in _ranks.gather(rows, grp) for r in part),
                      key=lambda r: r["index"])
        if rank != 0:
            return 0
        if args.out:
            atomic_write_text(args.out, json.dumps(
                {"settings": settings, "rows": rows, "processes": size,
                 "wall_seconds": time.perf_counter() - t_start}, default=str, indent=1))
            for r in range(size):
                Path(f"{args.out}.rank{r}").unlink(missing_ok=True)
    report(rows, settings, wall=time.perf_counter() - t_start,
           wall_label="Wall time" + (f" ({size} processes)" if size > 1 else ""))
    return 0


def run_tasks(tasks, mine, args, space, reg, settings, out, t_start) -> list[dict]:
    """Every arm of the tasks ``mine``; the rows so far are rewritten to ``out`` after each."""
    from metapeft.artifacts import atomic_write_text
    from metapeft.tune.search import adapt_evaluator, tune

    T = args.trials
    rows = []
    for i in mine:
        task, test_task = tasks[i]
        res: dict = {"task": task.name, "index": i}
        ev = adapt_evaluator(task, model=args.model, steps=args.steps, seed=args.seed)
        ev_test = adapt_evaluator(test_task, model=args.model, steps=args.steps, seed=args.seed)
        # defaults (one trial per method; the best one is "the defaults")
        dtrials = []
        for m in space.methods:
            p = space.default_params(m)
            dtrials.append({"status": "ok", "method": m, "params": p, **ev(m, p)})
        res["default"] = dtrials
        # random search
        rtrials = []
        for x in space.random_points(T, seed=args.seed * 7919 + i):
            m, p = space.decode(x)
            try:
                rtrials.append({"status": "ok", "method": m, "params": p, **ev(m, p)})
            except Exception as e:  # same failure policy as the study
                rtrials.append({"status": "failed", "reason": str(e)})
        res["random"] = rtrials
        for arm, warm in (("bo-warm", True), ("bo-cold", False)):
            r = tune(task, model=args.model, methods=args.methods, trials=T, steps=args.steps,
                     objectives="accuracy,seconds", name=f"{arm}-{i}", registry=reg,
                     seed=args.seed, warm_start=warm, record=True)
            res[arm] = r.study.trials
            res[arm + "_warm_points"] = r.warm_points
        # the honest figure: each arm's chosen configuration, retrained, on the unseen test set
        res["test"] = {}
        for arm in ("default", "random", "bo-cold", "bo-warm"):
            bt = best_trial(res[arm])
            res["test"][arm] = (float(ev_test(bt["method"], bt["params"])["accuracy"])
                                if bt is not None else None)
        # JSON-clean (default=str for the trial dicts' non-JSON values): the rows travel
        # between ranks as JSON
        rows.append(json.loads(json.dumps(res, default=str)))
        el = time.perf_counter() - t_start
        if out:  # the project's atomic writer (temp file, fsync, rename)
            atomic_write_text(out, json.dumps({"settings": settings, "rows": rows,
                                               "wall_seconds": el}, default=str, indent=1))
        print(f"[{i + 1}/{len(tasks)}] {task.name}: default "
              f"{max(t['accuracy'] for t in dtrials):.3f} random "
              f"{best_curve(rtrials, T)[-1]:.3f} bo-cold {best_curve(res['bo-cold'], T)[-1]:.3f} "
              f"bo-warm {best_curve(res['bo-warm'], T)[-1]:.3f} ({el:.0f} s)", file=sys.stderr)
    return rows


def report(rows: list[dict], settings: dict, wall: float, wall_label: str = "Wall time") -> None:
    T = int(settings["trials"])
    if not rows:
        print("no tasks measured")
        return
    arms = ["random", "bo-cold", "bo-warm"]
    stats: dict = {a: {"best": [], "hv": [], "gain": [], "t95": [], "curve": []} for a in arms}
    stats["default"] = {"best": [], "hv": []}
    for a in ["default"] + arms:
        stats[a]["test"] = [r["test"][a] for r in rows]
        stats[a]["test_gain"] = [(r["test"][a] - r["test"]["default"]) / r["test"]["default"]
                                 if r["test"][a] is not None and r["test"]["default"] else None
                                 for r in rows]
    for res in rows:
        all_ok = [t for a in arms + ["default"] for t in res[a] if t.get("status") == "ok"]
        ref_s = 1.1 * max(t["seconds"] for t in all_ok)
        target = 0.95 * max(t["accuracy"] for t in all_ok)
        d_best = max(t["accuracy"] for t in res["default"])
        stats["default"]["best"].append(d_best)
        stats["default"]["hv"].append(hv(res["default"], ref_s))
        for a in arms:
            curve = best_curve(res[a], T)
            s = stats[a]
            s["curve"].append(curve)
            s["best"].append(curve[-1])
            s["hv"].append(hv(res[a], ref_s))
            s["gain"].append((curve[-1] - d_best) / d_best if d_best > 0 else math.nan)
            s["t95"].append(next((k + 1 for k, v in enumerate(curve) if v >= target), T + 1))

    n = len(rows)
    print(f"\n## HPO benchmark: {n} held-out CLINC150 tasks (banking/travel, {settings['ways']}-way "
          f"{settings['shots']}-shot, {settings['query']} query/class), "
          f"{settings['model'].split('/')[-1]}, methods {settings['methods']}, {T} trials x "
          f"{settings['steps']} steps, mean ± 95% CI (t)\n")
    print("| arm | tasks | best accuracy | gain over defaults | hypervolume acc×s | "
          "trials to 95% of best |")
    print("|---|---|---|---|---|---|")
    print(f"| defaults | {n} | {fmt(stats['default']['best'], pct=True)} | - | "
          f"{fmt(stats['default']['hv'])} | - |")
    for a in arms:
        s = stats[a]
        print(f"| {a} | {n} | {fmt(s['best'], pct=True)} | {fmt(s['gain'], pct=True)} | "
              f"{fmt(s['hv'])} | {fmt(s['t95'])} |")
    print(f"\nheld-out test accuracy ({settings['test']}/class, never searched on) of each arm's "
          f"chosen configuration, retrained:\n")
    print("| arm | test accuracy | gain over defaults (test) |\n|---|---|---|")
    for a in ["default"] + arms:
        gain = "-" if a == "default" else fmt(stats[a]["test_gain"], pct=True)
        print(f"| {a} | {fmt(stats[a]['test'], pct=True)} | {gain} |")
    marks = sorted({1, 2, 3, 5, 10, 20, T} & set(range(1, T + 1)))
    print("\nbest accuracy after t trials (mean over tasks):\n")
    print("| arm | " + " | ".join(f"t={k}" for k in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for a in arms:
        cur = stats[a]["curve"]
        print(f"| {a} | " + " | ".join(f"{100 * sum(c[k - 1] for c in cur) / n:.1f}%"
                                       for k in marks) + " |")
    wins = sum(b > r for b, r in zip(stats["bo-cold"]["best"], stats["random"]["best"]))
    ties = sum(b == r for b, r in zip(stats["bo-cold"]["best"], stats["random"]["best"]))
    print(f"\nbo-cold vs random per task: {wins} wins, {ties} ties, {n - wins - ties} losses. "
          f"Warm-start points used (bo-warm): "
          f"{[r['bo-warm_warm_points'] for r in rows]}. {wall_label} {wall:.0f} s.")


if __name__ == "__main__":
    sys.exit(main())

"""Leave-one-domain-out evaluation of `metapeft select` (a script, not a test).

    uv run python benchmarks/select_eval.py                      # small defaults
    uv run python benchmarks/select_eval.py --per-domain 6 --steps 10 --groups synthetic
    uv run python benchmarks/select_eval.py --processes 2      # the oracle runs over 2 processes

1. Oracle experience. For each group -- ``synthetic`` (the synthetic families on the embedded tiny
   model) and ``clinc`` (CLINC150's 10 domains on stories260K, when ../shared has both) -- sample
   ``--per-domain`` tasks per domain/family with the sweep's distribution (1-50 shots
   log-uniform, 2-20 ways capped by the labels available, 5 query examples per class) and run
   every method on every task with ``api.adapt`` (``--steps`` steps, per-method default
   configs). Results are cached as experience stores under ``--cache``, so a rerun only
   re-evaluates.
2. Leave-one-domain-out. For every domain of a group: train the embedder + selector on the other
   domains' tasks, then rank the methods for each held-out task.
3. Metrics over all held-out tasks of a group (95% bootstrap CIs over tasks):
   - top-1: the chosen method reaches the oracle's accuracy (ties count as agreement);
   - regret: oracle accuracy minus the chosen method's accuracy;
   - the same for "always LoRA", "random method" (its expectation) and "most frequent winner in
     the training domains";
   - ECE of the confidence (P(best) of the chosen method vs top-1 hit, 10 bins);
   - retrieval: the rate at which a held-out task's nearest neighbour (embedding space, among the
     training tasks and the other held-out tasks of its fold) is from the same domain. The
     embedder never saw the held-out domain, so this asks whether it groups an unseen domain's
     tasks together. "retrieval (in-domain)" repeats it leave-one-task-out with an embedder
     trained on every task of the group.

``--processes N`` runs step 1 over MLX's distributed engine (``benchmarks/_ranks.py``): N ranks
of the ring backend on this machine, started as ``meta-train --processes`` starts its own; rank
r runs every method on the tasks i with i % N == r of the group's list of tasks still to run
(all domains), appending to the same cached store (appends are locked); after a barrier rank 0
evaluates and reports. The store's records are put in the one-process order (domain, then the
sampled task order) before evaluating, so the report is the one a single process gives. An
interrupted run keeps what its ranks recorded: rerun it (with any --processes) to finish.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import metapeft  # noqa: F401  (preloads OpenBLAS before mlx)
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CLINC = SHARED / "data" / "clinc150" / "train.jsonl"
STORIES = SHARED / "models" / "stories260K"


def build_group(name: str, args, grp=None) -> list:
    """Every record of a group's oracle experience (cached). With a distributed ``grp`` each
    rank runs its share of the tasks; every rank returns the records once all are done."""
    import _ranks

    from metapeft.adapters import METHODS
    from metapeft.data.episodes import sample_sweep_tasks
    from metapeft.experience import ExperienceStore
    from metapeft.sweep import run_sweep

    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    if name == "synthetic":
        from metapeft.data.synthetic import FAMILIES

        data, model, domains = "synthetic", "tiny", list(FAMILIES)
    else:
        from metapeft.data.tasks import read_rows

        data, model = str(CLINC), str(args.clinc_model)
        domains = sorted({str(e.extra.get("domain")) for e in read_rows(CLINC)})
    cache = Path(args.cache).expanduser()
    # one store per model: another model's oracle is other experience (stories260K keeps the
    # name it always had, so existing caches stay valid)
    tag = "" if name == "synthetic" or args.clinc_model.resolve() == STORIES.resolve() else \
        f"-{args.clinc_model.name}-shots{args.max_shots}-ways{args.max_ways}"
    store = ExperienceStore(cache / f"{name}{tag}-s{args.steps}-seed{args.seed}.safetensors")
    if args.eval_only:
        return store.load()
    have: dict[str, set] = {}
    for r in store.load():
        have.setdefault(r.domain, set()).add(r.task)
    t0 = time.time()
    order, todo = {}, []  # (domain, task) -> its place in the one-process order; what to run
    for di, dom in enumerate(domains):
        tasks = sample_sweep_tasks(data, args.per_domain, seed=args.seed * 1000 + di,
                                   domains=[dom], max_shots=args.max_shots,
                                   max_ways=args.max_ways, query=args.query)
        order.update({(dom, t.name): (di, ti) for ti, t in enumerate(tasks)})
        todo += [(dom, t) for t in tasks if t.name not in have.get(dom, set())]
    grp = grp or _ranks.group()
    mine = _ranks.share(todo, grp)
    with _ranks.alone():
        for k, (dom, t) in enumerate(mine):
            run_sweep([t], methods, model=model, steps=args.steps, seed=args.seed, store=store,
                      target=None, eval_every=0)
            if k + 1 == len(mine) or mine[k + 1][0] != dom:
                done = sum(d == dom for d, _ in mine)
                print(f"  [{name}] {dom}: ran {done} tasks x {len(methods)} methods"
                      f"{f' (rank {grp.rank()})' if grp.size() > 1 else ''} "
                      f"({time.time() - t0:.0f} s so far)", file=sys.stderr, flush=True)
    _ranks.gather(len(mine), grp)  # a barrier: every rank's records are in the store
    # the one-process order (domain, then sampled task; a task's records stay together), which
    # appends from several ranks interleave; records of other runs' tasks keep theirs, after
    recs = store.load()
    last = (len(domains), 0)
    return [r for _, r in sorted(enumerate(recs),
                                 key=lambda ir: (order.get((ir[1].domain, ir[1].task), last),
                                                 ir[0]))]


def bootstrap_ci(values, stat=np.mean, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = [stat(v[rng.integers(0, len(v), len(v))]) for _ in range(n)]
    return float(stat(v)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def ece(conf, hit, bins: int = 10) -> float:
    conf, hit = np.asarray(conf), np.asarray(hit, np.float64)
    total, err = len(conf), 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        m = (conf >= lo) & ((conf < hi) if b < bins - 1 else (conf <= hi))
        if m.any():
            err += m.sum() / total * abs(conf[m].mean() - hit[m].mean())
    return float(err)


def evaluate_group(name: str, records: list, args) -> dict:
    from metapeft.select.embedder import nearest, profile_matrix, task_table, train_embedder
    from metapeft.select import selector as _S
    from metapeft.select.selector import answer
    train_selector = _S.train_selector

    rows = task_table(records)
    methods = sorted({m for r in rows for m in r.accuracy})
    rows = [r for r in rows if len(r.accuracy) == len(methods)]  # complete oracle only
    domains = sorted({r.domain for r in rows})
    per = {k: [] for k in ("sel_hit", "sel_regret", "lora_hit", "lora_regret", "rand_hit",
                           "rand_regret", "freq_hit", "freq_regret", "conf", "nn_same",
                           "pick", "domain")}
    chosen_counts: dict[str, int] = {}
    for dom in domains:
        test = [r for r in rows if r.domain == dom]
        train = [r for r in rows if r.domain != dom]
        train_recs = [rec for rec in records if rec.domain != dom]
        sel = train_selector(train_recs, methods=methods, epochs=args.epochs, seed=args.seed,
                             domain_weight=args.domain_weight)
        wins: dict[str, int] = {}
        for r in train:
            wins[r.best_method] = wins.get(r.best_method, 0) + 1
        freq = max(sorted(wins), key=wins.get)
        test_emb = sel.embedder.embed(np.stack([r.features for r in test]))
        train_emb = sel.embedder.embed(np.stack([r.features for r in train]))
        pool = np.concatenate([train_emb, test_emb])
        pool_dom = [r.domain for r in train] + [r.domain for r in test]
        for i, r in enumerate(test):
            res = answer(sel, dict(zip(_names(), r.features)))
            pick, conf = res["ranking"][0]["method"], res["ranking"][0]["confidence"]
            chosen_counts[pick] = chosen_counts.get(pick, 0) + 1
            per["pick"].append(pick)
            per["domain"].append(dom)
            acc = r.accuracy
            best = max(acc.values())
            per["sel_hit"].append(acc[pick] >= best - 1e-9)
            per["sel_regret"].append(best - acc[pick])
            per["conf"].append(conf)
            per["lora_hit"].append(acc["lora"] >= best - 1e-9)
            per["lora_regret"].append(best - acc["lora"])
            per["rand_hit"].append(np.mean([a >= best - 1e-9 for a in acc.values()]))
            per["rand_regret"].append(np.mean([best - a for a in acc.values()]))
            per["freq_hit"].append(acc[freq] >= best - 1e-9)
            per["freq_regret"].append(best - acc[freq])
            nn = nearest(test_emb[i], pool, 1, exclude=len(train) + i)
            per["nn_same"].append(pool_dom[nn[0][0]] == dom)
    # in-domain retrieval: one embedder on every task, leave-one-task-out
    emb = train_embedder(rows, methods, seed=args.seed, domain_weight=args.domain_weight)
    e = emb.embed(np.stack([r.features for r in rows]))
    in_dom = [rows[nearest(e[i], e, 1, exclude=i)[0][0]].domain == rows[i].domain
              for i in range(len(rows))]
    acc_m, _ = profile_matrix(rows, methods)
    winners: dict[str, int] = {}
    for r in rows:
        winners[r.best_method] = winners.get(r.best_method, 0) + 1
    return {"group": name, "tasks": len(rows), "domains": len(domains), "methods": methods,
            "per": per, "in_domain_nn": in_dom,
            "mean_accuracy": dict(zip(methods, np.nanmean(acc_m, 0).round(4).tolist())),
            "winners": winners, "chosen": chosen_counts,
            "ece": ece(per["conf"], per["sel_hit"])}


def _names():
    from metapeft.select.features import FEATURE_NAMES

    return FEATURE_NAMES


def report(res: dict) -> str:
    p = res["per"]

    def ci(key, pct=True):
        m, lo, hi = bootstrap_ci(p[key])
        f = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:.3f}")
        return f"{f(m)} [{f(lo)}, {f(hi)}]"

    lines = [f"### {res['group']}: {res['tasks']} tasks, {res['domains']} held-out domains "
             f"(leave-one-domain-out), {len(res['methods'])} methods", "",
             "| strategy | top-1 agreement (95% CI) | mean regret (95% CI) |", "|---|---|---|"]
    for label, k in (("selector", "sel"), ("always LoRA", "lora"), ("random method", "rand"),
                     ("most frequent winner", "freq")):
        lines.append(f"| {label} | {ci(k + '_hit')} | {ci(k + '_regret', False)} |")
    nn = bootstrap_ci(p["nn_same"])
    ind = bootstrap_ci(res["in_domain_nn"])
    lines += ["",
              f"- ECE of the selector's confidence (P(best) of its pick, 10 bins): "
              f"{res['ece']:.3f} (mean confidence {np.mean(p['conf']):.1%}, "
              f"top-1 {np.mean(p['sel_hit']):.1%})",
              f"- nearest neighbour from the same domain, held-out domain (embedder never saw it): "
              f"{nn[0]:.1%} [{nn[1]:.1%}, {nn[2]:.1%}]",
              f"- nearest neighbour from the same domain, leave-one-task-out with all domains "
              f"seen: {ind[0]:.1%} [{ind[1]:.1%}, {ind[2]:.1%}]",
              f"- oracle winners: {res['winners']}; selector picks: {res['chosen']}",
              f"- mean accuracy per method: {res['mean_accuracy']}"]
    # where the selector's regret differs from always-LoRA's, and which picks caused it
    diff = np.asarray(p["sel_regret"]) - np.asarray(p["lora_regret"])
    d = bootstrap_ci(diff)
    by_pick = {m: round(float(diff[[q == m for q in p["pick"]]].sum() / len(diff)), 4)
               for m in sorted(set(p["pick"]))}
    lines.append(f"- paired regret difference selector - always LoRA: {d[0]:+.4f} "
                 f"[{d[1]:+.4f}, {d[2]:+.4f}] (tasks worse / better / equal: "
                 f"{int((diff > 0).sum())} / {int((diff < 0).sum())} / {int((diff == 0).sum())}); "
                 f"contribution by picked method: {by_pick}")
    sel = np.mean(p["sel_regret"])
    beaten = [lab for lab, k in (("always LoRA", "lora"), ("random", "rand"),
                                 ("most frequent winner", "freq"))
              if sel >= np.mean(p[k + "_regret"])]
    lines.append("- selector beats every baseline on mean regret" if not beaten else
                 f"- selector does NOT beat on mean regret: {', '.join(beaten)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", default="synthetic,clinc",
                    help="comma list of synthetic, clinc (clinc is skipped when CLINC150 or "
                         "--clinc-model is absent)")
    ap.add_argument("--clinc-model", type=Path, default=STORIES,
                    help="the model the clinc group's oracle adapts (default stories260K; e.g. "
                         "../shared/models/SmolLM2-135M-Instruct, with --max-shots/--max-ways "
                         "capped for time)")
    ap.add_argument("--per-domain", type=int, default=4, help="tasks per domain/family")
    ap.add_argument("--steps", type=int, default=8, help="adaptation steps per run")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--max-shots", type=int, default=50)
    ap.add_argument("--max-ways", type=int, default=20)
    ap.add_argument("--query", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=300, help="selector epochs per member")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--domain-weight", type=float, default=None,
                    help="embedder target: extra distance between domains (default: the "
                         "library's DOMAIN_WEIGHT)")
    ap.add_argument("--cache", default="~/.cache/metapeft/select_eval")
    ap.add_argument("--eval-only", action="store_true",
                    help="evaluate the cached experience only (run nothing)")
    ap.add_argument("--json-out", default=None, help="also write the raw results here")
    ap.add_argument("--processes", type=int, default=1,
                    help="run the oracle sweep over N processes (MLX ring backend on this "
                         "machine); rank 0 evaluates and reports")
    args = ap.parse_args(argv)
    import _ranks

    if args.processes > 1 and not _ranks.in_rank():
        return _ranks.launch(args.processes)
    grp = _ranks.group()  # size 1 unless --processes started this process
    random.seed(args.seed)
    out, raw = [], []
    for g in [x.strip() for x in args.groups.split(",") if x.strip()]:
        if g == "clinc" and not (CLINC.exists() and (args.clinc_model / "config.json").exists()):
            print(f"skipping clinc: {CLINC} or {args.clinc_model} is absent", file=sys.stderr)
            continue
        t0 = time.time()
        recs = build_group(g, args, grp)
        if grp.rank() != 0:  # rank 0 evaluates and reports
            continue
        res = evaluate_group(g, recs, args)
        res["seconds"] = round(time.time() - t0, 1)
        out.append(report(res))
        raw.append(res)
        print(out[-1] + "\n", flush=True)
    if grp.rank() != 0:
        return 0
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(raw, default=lambda o: o.tolist()
                                                  if hasattr(o, "tolist") else bool(o)))
    print(f"settings: per-domain {args.per_domain}, steps {args.steps}, shots 1-{args.max_shots}, "
          f"ways 2-{args.max_ways}, query {args.query}/class, seed {args.seed}, clinc model "
          f"{args.clinc_model.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

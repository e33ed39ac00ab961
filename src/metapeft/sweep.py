"""Sweeps: run every method on every task with ``adapt`` and record each run as experience.

The tasks come from ``data.episodes.sample_sweep_tasks``; the records go to an
``experience.ExperienceStore`` (source ``sweep``).
"""

from __future__ import annotations

from metapeft.errors import UserError
from metapeft.experience import ExperienceStore, hyperparameters_of, record_from_report
from metapeft.models import DEFAULT_MODEL


def run_sweep(tasks: list, methods: list[str], *, model: str = DEFAULT_MODEL,
              dequantize: str = "auto", steps: int = 10, seed: int = 0,
              target: float | None = 0.8, batch_size: int = 32,
              inits: dict[str, str] | None = None, store: ExperienceStore | None = None,
              eval_every: int | None = None, on_run=None, init_sources: list[str] | None = None,
              on_start=None) -> dict:
    """Run every method on every task with ``adapt`` (default config per method, and
    additionally from meta-weights ``inits[method]`` where given) and append one record per run
    (source ``sweep``) to ``store`` after each task. Returns a summary with per-task results.

    ``init_sources`` (``init_sources.parse_sources``): run each method from each of these
    sources that is available for it (``init_sources.available``, checked once) instead of
    fresh only; the summary's ``init_sources`` says what ran and why the others did not.
    ``on_start(num_tasks, num_runs)`` once the runs are planned.

    ``eval_every``: score the query set only every that many steps (0: only after the last step),
    which makes runs much cheaper; ``steps_to_target`` is then the first evaluated step that
    reached the target."""
    from metapeft.adapt import adapt
    from metapeft.models import load_base_model
    from metapeft.select.features import task_features

    base = load_base_model(model, dequantize=dequantize)
    eval_at = None
    if eval_every is not None:
        eval_at = ({steps} if eval_every <= 0
                   else set(range(0, steps + 1, eval_every)) | {steps})
    runs, plan = plan_runs(methods, base, inits, init_sources)
    if on_start is not None:
        on_start(len(tasks), len(tasks) * len(runs))
    results, n_records, failures = [], 0, []
    for ti, task in enumerate(tasks):
        feats = task_features(task, base)
        recs, accs = [], {}
        for m, init, route, key in runs:
            try:
                rep = adapt(task, model=model, method=m, steps=steps, target=target, seed=seed,
                            batch_size=batch_size, init=init, route=route, eval_at=eval_at)
            except UserError as e:
                failures.append({"task": task.name, "method": m, "error": e.one_line()})
                if on_run:
                    on_run(ti, key, None)
                continue
            hp = hyperparameters_of(rep)
            if init:
                hp["init"] = init
            recs.append(record_from_report(rep, task, feats, source="sweep", hyperparameters=hp))
            accs[key] = rep.final_accuracy
            if on_run:
                on_run(ti, key, rep.final_accuracy)
        if store is not None and recs:
            store.append(recs)
        n_records += len(recs)
        results.append({"task": task.name, "domain": recs[0].domain if recs else "unknown",
                        "features": feats, "accuracy": accs})
    return {"tasks": len(tasks), "records": n_records, "failures": failures, "results": results,
            **({} if plan is None else {"init_sources": plan})}


def plan_runs(methods: list[str], base, inits: dict[str, str] | None,
              init_sources: list[str] | None) -> tuple[list[tuple], dict | None]:
    """([(method, init, route, result key)], the init-source plan or None): each method fresh
    and from ``inits[method]``; with ``init_sources``, each method from each of those sources
    available for it (a one-line error when none is available for any method)."""
    if not init_sources:
        return ([(m, None, None, m) for m in methods]
                + [(m, i, None, f"{m}+init") for m, i in (inits or {}).items()
                   if m in methods]), None
    from metapeft.init_sources import available

    runs, plan = [], {}
    for m in methods:
        offered, missing = available(m, base)
        rows = [o for o in offered if o["source"] in init_sources]
        if m in (inits or {}) and "meta" in init_sources:  # the meta-init named by --init
            rows = [r for r in rows if r["source"] != "meta"] + [
                {"source": "meta", "init": inits[m], "route": None}]
            missing = [x for x in missing if x["source"] != "meta"]
        runs += [(m, r["init"], r["route"], m if r["source"] == "fresh"
                  else f"{m}+{r['source']}") for r in rows]
        plan[m] = {"ran": [r["source"] for r in rows],
                   "unavailable": [x for x in missing if x["source"] in init_sources]}
    if not runs:
        why = "; ".join(f"{m}: {x['source']} ({x['reason']})" for m, p in plan.items()
                        for x in p["unavailable"][:2])
        raise UserError(f"none of the init sources {', '.join(init_sources)} is available: "
                        f"{why}", field="init_sources")
    return runs, plan

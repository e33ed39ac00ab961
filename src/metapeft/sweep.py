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
              eval_every: int | None = None, on_run=None) -> dict:
    """Run every method on every task with ``adapt`` (default config per method, and
    additionally from meta-weights ``inits[method]`` where given) and append one record per run
    (source ``sweep``) to ``store`` after each task. Returns a summary with per-task results.

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
    results, n_records, failures = [], 0, []
    for ti, task in enumerate(tasks):
        feats = task_features(task, base)
        recs, accs = [], {}
        runs = [(m, None) for m in methods] + [(m, i) for m, i in (inits or {}).items()
                                               if m in methods]
        for m, init in runs:
            try:
                rep = adapt(task, model=model, method=m, steps=steps, target=target, seed=seed,
                            batch_size=batch_size, init=init, eval_at=eval_at)
            except UserError as e:
                failures.append({"task": task.name, "method": m, "error": e.one_line()})
                if on_run:
                    on_run(ti, m, None)
                continue
            hp = hyperparameters_of(rep)
            if init:
                hp["init"] = init
            recs.append(record_from_report(rep, task, feats, source="sweep", hyperparameters=hp))
            key = m if init is None else f"{m}+init"
            accs[key] = rep.final_accuracy
            if on_run:
                on_run(ti, m, rep.final_accuracy)
        if store is not None and recs:
            store.append(recs)
        n_records += len(recs)
        results.append({"task": task.name, "domain": recs[0].domain if recs else "unknown",
                        "features": feats, "accuracy": accs})
    return {"tasks": len(tasks), "records": n_records, "failures": failures, "results": results}

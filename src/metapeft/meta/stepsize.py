"""The test-time step size that goes with a learned init, chosen on validation tasks.

A meta-learned (or multitask) init already sits near a good solution for the task family, so the
learning rate that suits a random init overshoots from it: on SmolLM2-135M the Reptile init scored
94% after one Adam step at LoRA's default lr and then *fell* to 91.5% by step 5. The published
meta-weights therefore carry the lr that ``adapt`` should use from them, picked by measurement on
the run's validation tasks (held-out classes of the meta-train domains, never the test split).

Selection: adapt every validation task from the init with Adam at ``base_lr × f`` for each factor
f, exactly as ``adapt`` would (``train.train``), and keep the factor with the highest mean query
accuracy over the marks (steps 1, 2, 5, 10 by default: the area under the early curve, the regime
a "handful of steps" user lives in). Ties go to the factor closest to 1. The whole table is stored,
so ``weights show`` can say why.

In a distributed run (``meta.distributed``) each rank adapts its share of the tasks for every
factor and the curves are gathered exactly, so every rank chooses the same lr as one process.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_FACTORS = (2.0, 1.0, 0.5, 0.2)
DEFAULT_MARKS = (1, 2, 5, 10)


def calibrate_adapt_lr(adapter, params: dict, tasks, base_lr: float, *,
                       factors=DEFAULT_FACTORS, marks=DEFAULT_MARKS, optimizer: str = "adam",
                       on_trial=None, group=None, lr_scales: dict | None = None) -> dict:
    """Choose the test-time lr for ``params`` on validation ``tasks`` (``Task`` objects).
    ``lr_scales``: the per-leaf multipliers the init carries (per-layer inner lrs), applied as
    ``adapt`` applies them, so the lr is chosen for the steps ``adapt`` will take.

    Returns ``{"adapt_lr", "factor", "base_lr", "marks", "num_tasks", "table"}`` where ``table``
    maps each factor (as a string) to its mean accuracy at each mark and overall."""
    from metapeft.meta import distributed as dist
    from metapeft.train import encode_task, train

    if not tasks:
        raise ValueError("calibrate_adapt_lr needs at least one validation task")
    marks = sorted({int(m) for m in marks})
    encoded = [encode_task(t, adapter.base.tokenizer) for t in tasks]
    table = {}
    n, k = len(encoded), len(marks)
    for f in factors:
        slots = {}  # (task i, mark j) -> accuracy at slot i*k + j; slot n*k counts divergences
        try:
            for i in dist.mine(n, group):
                r = train(adapter, params, encoded[i], steps=marks[-1], lr=base_lr * f,
                          optimizer=optimizer, eval_at=set(marks), lr_scales=lr_scales)
                slots.update({i * k + j: a for j, a in enumerate(r.accuracies)})
        except FloatingPointError:  # this lr diverges from this init: never the one to use
            slots[n * k] = 1.0
        gathered = dist.gather_slots(slots, n * k + 1, group)
        if gathered[-1] > 0:
            table[f] = {"mean": float("-inf"), "diverged": True}
        else:
            curves = np.asarray(gathered[:-1], dtype=float).reshape(n, k)
            per_mark = np.mean(curves, axis=0)
            table[f] = {"mean": round(float(per_mark.mean()), 6),
                        **{str(m): round(float(a), 6) for m, a in zip(marks, per_mark)}}
        if on_trial is not None:
            on_trial(f, table[f])
    best = max(factors, key=lambda f: (table[f]["mean"], -abs(math.log(f))))
    if table[best].get("diverged"):
        raise FloatingPointError(f"every candidate lr diverged from this init (base {base_lr:g})")
    for row in table.values():  # JSON has no -inf
        if row.get("diverged"):
            row["mean"] = None
    return {"adapt_lr": base_lr * best, "factor": best, "base_lr": base_lr, "marks": marks,
            "num_tasks": len(tasks), "table": {str(f): v for f, v in table.items()}}

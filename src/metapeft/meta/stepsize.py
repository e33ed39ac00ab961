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

Schedule: with ``decays`` the candidates are every (factor, decay) pair, and step t runs at
``lr / (1 + decay · (t − 1))`` (``train.lr_schedule``): the full step first, smaller ones after,
for an init whose first step already lands near the task's solution (on SmolLM2 the Reptile init
dipped from 92.6% at step 1 to 90.6% at step 5 on the test split at a constant lr). Ties go to
the smaller decay (the plain constant lr first).

Horizons: the mean over steps 1-10 suits a user who takes a handful of steps, not one who runs 50
(on stories260K the Reptile init's curve flattened after step 10 at the constant lr chosen that
way, and fresh LoRA caught up by step 50). With ``horizons`` the same runs are also measured at
those steps, and each horizon h gets its own choice: the candidate with the highest mean accuracy
*at step h*, the accuracy of a user who stops there. The overall choice stands for the last mark
(10 by default). ``adapt --steps N`` uses the choice of the smallest such horizon >= N, or of the
largest when N is past them all (``schedule_for_steps``). A horizon never changes the overall
choice: the marks' mean stays its objective, and a horizon is one more reading of the same curves.

In a distributed run (``meta.distributed``) each rank adapts its share of the tasks for every
factor and the curves are gathered exactly, so every rank chooses the same lr as one process.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_FACTORS = (2.0, 1.0, 0.5, 0.2)
DEFAULT_MARKS = (1, 2, 5, 10)
DEFAULT_DECAYS = (0.0,)


def candidate_key(factor: float, decay: float) -> str:
    """A candidate's key in the stored table: ``"0.5"`` for a constant lr (as before schedules
    existed), ``"0.5/decay1.0"`` for a decaying one."""
    return str(factor) if decay == 0 else f"{factor}/decay{decay}"


def split_candidate_key(key: str) -> tuple[str, str]:
    """``candidate_key``'s inverse, as the stored strings: ``"0.5/decay1.0"`` -> ``("0.5", "1.0")``,
    ``"0.5"`` -> ``("0.5", "")`` (a constant lr)."""
    factor, _, decay = key.partition("/decay")
    return factor, decay


def describe_lead(cal: dict) -> str | None:
    """A calibration's ``margin`` in words, ``"+0.5 ± 1.7 points over x1.0 decay 3.0 (paired, 6
    tasks)"``; None when it has none (one candidate, a diverged runner-up, or an older file)."""
    margin = cal.get("margin")
    if not isinstance(margin, dict) or margin.get("mean") is None:
        return None
    factor, decay = split_candidate_key(margin["over"])
    ci = "" if margin.get("ci95") is None else f" ± {100 * margin['ci95']:.1f}"
    return (f"{100 * margin['mean']:+.1f}{ci} points over x{factor}"
            + (f" decay {decay}" if decay else "")
            + f" (paired, {cal.get('num_tasks', '?')} tasks)")


def calibrate_adapt_lr(adapter, params: dict, tasks, base_lr: float, *,
                       factors=DEFAULT_FACTORS, marks=DEFAULT_MARKS, optimizer: str = "adam",
                       on_trial=None, group=None, lr_scales: dict | None = None,
                       decays=DEFAULT_DECAYS, horizons=()) -> dict:
    """Choose the test-time lr for ``params`` on validation ``tasks`` (``Task`` objects).
    ``params`` is one tree for every task, or a list with each task's own start (an init built
    per task: ``compose.calibrate_step_size``'s library compositions).
    ``lr_scales``: the per-leaf multipliers the init carries (per-layer inner lrs), applied as
    ``adapt`` applies them, so the lr is chosen for the steps ``adapt`` will take.

    Returns ``{"adapt_lr", "factor", "adapt_lr_decay", "base_lr", "marks", "num_tasks", "margin",
    "table"}`` where ``table`` maps each candidate (``candidate_key``) to its mean accuracy at each
    mark and overall, and each task's mean over the marks (``tasks``); ``margin`` is the choice's
    paired lead over the runner-up (``{"over", "mean", "ci95"}``, ``ci95`` None for one task; None
    with a single candidate or a diverged runner-up; ``describe_lead`` words it).
    ``horizons``: steps at which a choice of its own is also made (by the mean accuracy at that
    step); they add ``"horizons": {h: {"adapt_lr", "factor", "adapt_lr_decay", "margin"}}``, and
    each row's accuracy at h with each task's (``tasks_at``). The runs go to the last of marks
    and horizons. ``on_trial(key, row)`` is called after each candidate."""
    from metapeft.meta import distributed as dist
    from metapeft.train import encode_task, train

    if not tasks:
        raise ValueError("calibrate_adapt_lr needs at least one validation task")
    starts = params if isinstance(params, list) else [params] * len(tasks)
    if len(starts) != len(tasks):
        raise ValueError(f"calibrate_adapt_lr: {len(starts)} starts for {len(tasks)} tasks")
    marks = sorted({int(m) for m in marks})
    horizons = sorted({int(h) for h in horizons})
    if any(h < 1 for h in horizons):
        raise ValueError(f"calibration horizons must be >= 1 step, got {horizons}")
    read = sorted(set(marks) | set(horizons))  # every step a curve is read at
    encoded = [encode_task(t, adapter.base.tokenizer) for t in tasks]
    table = {}
    n, k = len(encoded), len(read)
    in_mean = [j for j, m in enumerate(read) if m in marks]
    candidates = [(float(f), float(d)) for d in decays for f in factors]
    for f, d in candidates:
        slots = {}  # (task i, step j) -> accuracy at slot i*k + j; slot n*k counts divergences
        try:
            for i in dist.mine(n, group):
                r = train(adapter, starts[i], encoded[i], steps=read[-1], lr=base_lr * f,
                          optimizer=optimizer, eval_at=set(read), lr_scales=lr_scales,
                          lr_decay=d)
                slots.update({i * k + j: a for j, a in enumerate(r.accuracies)})
        except FloatingPointError:  # this lr diverges from this init: never the one to use
            slots[n * k] = 1.0
        gathered = dist.gather_slots(slots, n * k + 1, group)
        if gathered[-1] > 0:
            table[f, d] = {"mean": float("-inf"), "diverged": True}
        else:
            curves = np.asarray(gathered[:-1], dtype=float).reshape(n, k)
            per_step = np.mean(curves, axis=0)
            table[f, d] = {"mean": round(float(per_step[in_mean].mean()), 6),
                           **{str(m): round(float(a), 6) for m, a in zip(read, per_step)},
                           # each task's mean over the marks: what the paired margin is read from
                           "tasks": [round(float(a), 6) for a in curves[:, in_mean].mean(axis=1)]}
            if horizons:  # and each task's accuracy at each horizon, for that choice's margin
                table[f, d]["tasks_at"] = {
                    str(h): [round(float(a), 6) for a in curves[:, read.index(h)]]
                    for h in horizons}
        if on_trial is not None:
            on_trial(candidate_key(f, d), table[f, d])
    best_f, best_d, margin = _choose(table, candidates, lambda row: row["mean"],
                                     lambda row: row["tasks"])
    if best_f is None:
        raise FloatingPointError(f"every candidate lr diverged from this init (base {base_lr:g})")
    by_horizon = {}
    for h in horizons:
        hf, hd, hmargin = _choose(table, candidates, lambda row, h=h: row[str(h)],
                                  lambda row, h=h: row["tasks_at"][str(h)])
        by_horizon[str(h)] = {"adapt_lr": base_lr * hf, "factor": hf, "adapt_lr_decay": hd,
                              "margin": hmargin}
    for row in table.values():  # JSON has no -inf
        if row.get("diverged"):
            row["mean"] = None
    return {"adapt_lr": base_lr * best_f, "factor": best_f, "adapt_lr_decay": best_d,
            "base_lr": base_lr, "marks": marks, "num_tasks": len(tasks), "margin": margin,
            **({"horizons": by_horizon} if horizons else {}),
            "table": {candidate_key(f, d): v for (f, d), v in table.items()}}


def _choose(table: dict, candidates: list, score, per_task):
    """The best candidate by ``score(row)`` (ties: the smaller decay, then the factor closest to
    1) and its paired lead over the runner-up (``per_task(row)``, task by task); ``(None, None,
    None)`` when every candidate diverged."""
    def key(c):
        row = table[c]
        return (float("-inf") if row.get("diverged") else score(row), -c[1],
                -abs(math.log(c[0])))

    ranked = sorted(candidates, key=key, reverse=True)
    if table[ranked[0]].get("diverged"):
        return None, None, None
    margin = None
    if len(ranked) > 1 and not table[ranked[1]].get("diverged"):
        margin = paired_margin(per_task(table[ranked[0]]), per_task(table[ranked[1]]),
                               candidate_key(*ranked[1]))
    return ranked[0][0], ranked[0][1], margin


def paired_margin(chosen: list[float], runner_up: list[float], over: str) -> dict:
    """A calibration choice's paired lead over the runner-up ``over``, task by task:
    ``{"over", "mean", "ci95"}`` (``ci95`` None for one task). A CI that spans 0 says the
    validation tasks could not tell the two apart (more of them would)."""
    from metapeft.metrics import mean_ci

    ci = mean_ci(np.subtract(chosen, runner_up))
    return {"over": over, "mean": round(ci["mean"], 6),
            "ci95": None if ci["ci"] is None else round(ci["ci"], 6)}


def schedule_for_steps(cal: dict, steps: int) -> dict:
    """The calibrated step size for a run of ``steps`` steps: ``{"adapt_lr", "adapt_lr_decay",
    "horizon"}`` from the calibration's choice for the smallest horizon >= ``steps`` (the largest
    past them all), where the overall choice stands for its last mark; ``horizon`` is None when
    the overall choice is used. A calibration without horizons always gives the overall one."""
    overall = {"adapt_lr": cal["adapt_lr"], "adapt_lr_decay": cal.get("adapt_lr_decay") or 0.0,
               "horizon": None}
    stored = cal.get("horizons") or {}
    if not stored:
        return overall
    options = {int(h): {"adapt_lr": c["adapt_lr"], "adapt_lr_decay": c.get("adapt_lr_decay")
                        or 0.0, "horizon": int(h)} for h, c in stored.items()}
    last_mark = max(int(m) for m in cal.get("marks") or DEFAULT_MARKS)
    options.setdefault(last_mark, overall)
    fitting = [h for h in options if h >= steps]
    return options[min(fitting) if fitting else max(options)]

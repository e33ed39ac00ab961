"""``adapt --switch auto``: when the query curve stops rising, train the next method in the
selector's ranking on top of what the first one learned.

The run watches query accuracy after every step. A *plateau* is ``window`` steps with no gain
above ``tolerance`` over the accuracy just before them (counted from step 1), while the target
(if any) is not reached.
On a plateau the adapter trained so far is frozen and the next method in the ranking is trained
on top of it (``adapters.stacked``): a LoRA-family stage starts as a no-op, so the stack scores
exactly what the frozen stage scored, and nothing learned is lost. A candidate whose stack scores
worse at the switch than the frozen stage alone, by more than the noise (one binomial standard
error of the accuracy on the query set), is passed over, as is one that cannot stack; the reasons
are reported. One switch per run (a stack has two stages). The steps after the switch come out of
the same ``steps`` budget, with the new method's recommended learning rate and a fresh optimizer.

The plateau is read off the query curve, as ``--stop-at-target`` reads it: the switch decides
*when* to change method, never which parameters to keep, but like any early-stopping rule on
the scored set it is a (mild) use of that set; ``benchmarks/switching.py`` reports it as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

SWITCH_MODES = ("off", "auto")
DEFAULT_WINDOW = 3
DEFAULT_TOLERANCE = 0.01


def plateaued(accuracies: list[float], window: int, tolerance: float) -> bool:
    """True when the last ``window`` accuracies gained no more than ``tolerance`` over the one
    before them (the curve holds step 0 of the stage first)."""
    if len(accuracies) <= window:
        return False
    return max(accuracies[-window:]) <= accuracies[-window - 1] + tolerance


def noise(accuracy: float, n: int) -> float:
    """One binomial standard error of an accuracy measured on ``n`` examples (at least 1/n, so a
    perfect or zero score still allows one example's difference)."""
    return max(math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(n, 1)), 1.0 / max(n, 1))


@dataclass
class Candidate:
    """A method to switch to, with the learning rate and options recommended for it."""

    method: str
    lr: float | None = None
    options: dict = field(default_factory=dict)


def check_switch_options(switch: str, window: int, tolerance: float) -> None:
    from metapeft.errors import UserError

    if switch not in SWITCH_MODES:
        raise UserError(f"--switch must be one of {', '.join(SWITCH_MODES)}, got {switch!r}",
                        field="switch")
    if window < 1:
        raise UserError(f"--switch-window must be >= 1, got {window}", field="switch_window")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(f"--switch-tolerance must be >= 0, got {tolerance}",
                        field="switch_tolerance")


def ranking_candidates(ranking: list[dict], first: str) -> list[Candidate]:
    """The methods after ``first`` in a selector ranking (``select``'s rows or a decision's
    alternatives), with their recommended lr and options, training-free ones left out."""
    from metapeft.adapters import get_adapter_class

    out = []
    for row in ranking:
        cls = get_adapter_class(row["method"])
        if row["method"] == first or cls.training_free:
            continue
        hp = dict(row.get("hyperparameters") or {})
        known = cls.Config.defaults()
        out.append(Candidate(row["method"], hp.get("lr"),
                             {k: v for k, v in hp.items() if k in known}))
    return out


def train_with_switching(adapter, params, data, *, steps: int, lr: float,
                         candidates: Callable[[], list[Candidate]], window: int,
                         tolerance: float, target: float | None, seed: int = 0,
                         on_step=None, on_switch=None, stop=None, **train_kwargs):
    """``train`` that, on a plateau, moves to the first candidate that stacks on the adapter
    trained so far (``candidates()`` is asked once, at the first plateau: ranking a task costs a
    profile). Returns (the final adapter, the run's ``AdaptResult`` over all ``steps`` with one
    continuous curve, the switch records)."""
    from metapeft.adapters import get_adapter_class
    from metapeft.adapters.stacked import Stacked, can_stack
    from metapeft.train import evaluate, train

    switches: list[dict] = []
    stage_accs: list[float] = []
    plateau = [False]
    offset = [0]

    def watch(i, loss, acc):
        if acc is not None:
            stage_accs.append(acc)
        if on_step is not None:
            on_step(offset[0] + i, loss, acc)

    def stop_here(i):
        if stop is not None and stop(offset[0] + i):
            return True
        hit = target is not None and stage_accs and stage_accs[-1] >= target
        plateau[0] = not switches and not hit and plateaued(stage_accs, window, tolerance)
        return plateau[0]

    first = train(adapter, params, data, steps=steps, lr=lr, seed=seed, target=target,
                  on_step=watch, stop=stop_here, **train_kwargs)
    if not plateau[0]:
        return adapter, first, switches
    done = len(first.losses)
    before = first.accuracies[-1]
    n_query = data.num_query
    record = {"step": done, "from": adapter.method, "accuracy_before": before,
              "reason": f"no gain above {tolerance:.0%} over {window} steps "
                        f"({stage_accs[-window - 1]:.1%} -> {max(stage_accs[-window:]):.1%})",
              "passed_over": []}
    chosen = None
    for cand in candidates():
        cls = get_adapter_class(cand.method)
        why = can_stack(adapter, cls)
        if why is None:
            stack = Stacked(adapter, first.params, cls, cls.Config.from_dict(cand.options))
            new_params = stack.init_params(seed)
            after, _ = evaluate(stack, new_params, data.prepared(stack, "query"))
            if after < before - noise(before, n_query):
                why = (f"scored {after:.1%} at the switch against {before:.1%} before it "
                       "(more than the noise below)")
        if why is not None:
            record["passed_over"].append({"method": cand.method, "reason": why})
            continue
        chosen = (cand, stack, new_params, after)
        break
    offset[0] = done
    if chosen is None:  # nothing to switch to: keep training the first method where it stopped
        record.update(to=None, accuracy_after=None)
        switches.append(record)
        if on_switch is not None:
            on_switch(record)
        rest = train(adapter, first.params, data, steps=steps - done, lr=lr, seed=seed + 1,
                     target=target, on_step=watch, stop=stop, **_later(train_kwargs))
        return adapter, _joined(first, rest), switches
    cand, stack, new_params, after = chosen
    new_lr = cand.lr or get_adapter_class(cand.method).default_lr
    record.update(to=cand.method, accuracy_after=after, lr=new_lr)
    switches.append(record)
    if on_switch is not None:
        on_switch(record)
    rest = train(stack, new_params, data, steps=steps - done, lr=new_lr, seed=seed + 1,
                 target=target, on_step=watch, stop=stop, **_later(train_kwargs))
    return stack, _joined(first, rest), switches


def _later(kwargs: dict) -> dict:
    """Options of the stage after a switch: ``eval_at`` counts steps from the run's start."""
    return {k: v for k, v in kwargs.items() if k != "eval_at"}


def _joined(first, rest):
    """One ``AdaptResult`` for the two stages: the curve continues through the switch (the
    second stage's step 0 is the switch record's ``accuracy_after``, not a step of its own)."""
    from dataclasses import replace

    steps_to_target = first.steps_to_target
    if steps_to_target is None and rest.steps_to_target is not None and rest.steps_to_target > 0:
        steps_to_target = len(first.losses) + rest.steps_to_target
    train_seconds = first.train_seconds + rest.train_seconds
    tokens = (first.tokens_per_second * first.train_seconds
              + rest.tokens_per_second * rest.train_seconds)
    return replace(
        rest, losses=first.losses + rest.losses,
        accuracies=first.accuracies + rest.accuracies[1:], steps_to_target=steps_to_target,
        target_reached=steps_to_target is not None, seconds=first.seconds + rest.seconds,
        train_seconds=train_seconds,
        peak_memory_mb=max(first.peak_memory_mb, rest.peak_memory_mb),
        tokens_per_second=tokens / train_seconds if train_seconds > 0 else 0.0,
        extra={**rest.extra, "eval_steps": first.extra["eval_steps"] + [
            len(first.losses) + s for s in rest.extra["eval_steps"][1:]],
            "stopped_at": rest.extra["stopped_at"] if rest.extra["stopped_at"] is None
            else len(first.losses) + rest.extra["stopped_at"],
            "stopped_early_at": rest.extra["stopped_early_at"]
            if rest.extra["stopped_early_at"] is None
            else len(first.losses) + rest.extra["stopped_early_at"]})

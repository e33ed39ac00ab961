"""The meta-training run: sample meta-batches, step the meta-learner, validate on held-out
classes, checkpoint atomically, and publish versioned meta-weights.

Recovery: a checkpoint (θ, the outer optimizer state, the best-so-far θ, the curves and the step)
is written atomically every ``checkpoint_every`` meta-steps, so a run killed at any point resumes
from the last checkpoint with ``resume=True``; tasks are drawn from ``seed`` and the step number,
so a resumed run sees the same task stream. A NaN/inf meta-loss stops the run with a
``MetaDivergence`` and leaves the last good checkpoint in place.

Under ``mlx.launch`` the run is data parallel (``meta.distributed``): each rank adapts its share
of every meta-batch and of the validation episodes, the sums are all-reduced, and only rank 0
writes checkpoints. With one process nothing changes.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from metapeft import __version__
from metapeft.errors import UserError
from metapeft.meta import distributed as dist
from metapeft.meta.batch import encode_episode, group_by_signature, stack_episodes
from metapeft.meta.learner import MetaConfig, MetaLearner, query_accuracy, inner_adapt


class MetaDivergence(UserError):
    pass


@dataclass
class MetaTrainResult:
    theta: dict
    best_theta: dict
    best_step: int
    meta_losses: list[float]
    meta_accuracies: list[float]
    val_steps: list[int]
    val_accuracies: list[float]
    seconds: float
    steps_done: int
    version: int | None = None
    path: str | None = None
    fallback_reason: str | None = None
    extra: dict = field(default_factory=dict)
    # per-layer inner lrs (MetaConfig.inner_lr_mode): the log-multipliers s that go with
    # best_theta (θ's structure, one scalar per leaf); None in shared mode
    best_log_lr: dict | None = None


def _flat(prefix: str, tree) -> dict:
    return {f"{prefix}.{k}": v for k, v in tree_flatten(tree)}


def _unflat(prefix: str, arrays: dict):
    items = [(k[len(prefix) + 1:], v) for k, v in arrays.items() if k.startswith(prefix + ".")]
    return tree_unflatten(items) if items else None


def require_checkpoint(checkpoint: Path | None) -> None:
    """``resume=True`` needs a checkpoint: a one-line error naming it otherwise (``api.meta_train``
    calls this before the model loads, ``meta_train`` again for its direct callers)."""
    if checkpoint is None or not Path(checkpoint).exists():
        raise UserError("nothing to resume: no checkpoint", path=str(checkpoint), field="resume")


def validation_tasks(val_source, seed: int, count: int) -> list:
    """The fixed validation episodes of a run with ``seed`` (early stopping and the test-time lr
    calibration both use these)."""
    return [val_source.sample(10_000_019 * (seed + 1) + i) for i in range(count)]


def validate_theta(adapter, cfg: MetaConfig, theta: dict, episodes, group=None,
                   log_lr: dict | None = None) -> float:
    """Mean query accuracy after ``cfg.inner_steps`` inner steps from θ on fixed val episodes
    (per-layer mode: at the learned per-leaf lrs ``log_lr``).
    With a distributed ``group`` each rank adapts its share and every rank gets the same mean."""
    accs = {}
    for i in dist.mine(len(episodes), group):
        e = episodes[i]
        phi = inner_adapt(adapter, theta, e.support, cfg, log_lr)
        acc = query_accuracy(adapter, phi, e.query)
        mx.eval(acc)
        accs[i] = acc.item()
    accs = dist.gather_slots(accs, len(episodes), group)
    return float(np.mean(accs)) if accs else float("nan")


def meta_train(adapter, cfg: MetaConfig, train_source, *, val_source=None, meta_steps: int = 100,
               meta_batch: int = 4, seed: int = 0, eval_every: int = 10, eval_episodes: int = 8,
               checkpoint: Path | None = None, checkpoint_every: int = 5, resume: bool = False,
               vectorise: bool = True, compile: bool = False, spec: dict | None = None,
               init: dict | None = None, anchor=None, replay_source=None,
               replay_fraction: float = 0.0, validate_start: bool = False,
               on_step: Callable[[int, float, float, float | None], None] | None = None,
               group=None) -> MetaTrainResult:
    """``group``: the ``mx.distributed`` group to split the work over (default
    ``mx.distributed.init()``: this process alone unless started by ``mlx.launch``).

    Continual runs (``meta.continual``): ``init`` is the parent's θ, ``anchor`` its EWC pull
    (``MetaLearner.anchor``), and with a ``replay_source`` the last ``replay_tasks`` of each
    meta-batch's tasks come from it (the parent's meta-train source).

    ``validate_start``: also validate ``init`` itself, as meta-step 0, so that early stopping
    publishes the start unchanged when no meta-step beats it on the validation tasks (a
    pretrained start, ``meta-train --pretrain-steps``: meta-learning never leaves it worse there)."""
    from metapeft.artifacts import load_safetensors, save_safetensors

    if meta_steps < 1 or meta_batch < 1:
        raise UserError("meta-steps and meta-batch must be >= 1", field="meta_steps")
    t0 = time.perf_counter()
    tok = adapter.base.tokenizer
    group = dist.world() if group is None else group
    learner = MetaLearner(adapter, cfg, vectorise=vectorise, compile=compile, group=group)
    learner.anchor = anchor
    n_replay = (0 if replay_source is None or replay_fraction <= 0
                else min(meta_batch, max(1, int(round(replay_fraction * meta_batch)))))
    replay_labels: set = set()
    spec = dict(spec or {})
    ident = {"method": adapter.method, "base_model_hash": adapter.base.fingerprint,
             "algorithm": cfg.algorithm, "config": adapter.config.to_dict()}
    # what a resumed run must share with the checkpoint for it to be the same run: the number
    # of meta-steps sets Reptile's ε schedule, meta-batch and seed the task stream
    schedule = {"meta_steps": meta_steps, "meta_batch": meta_batch, "seed": seed,
                **{k: v for k, v in cfg.to_dict().items() if k != "algorithm"}}
    if n_replay:
        schedule["replay_tasks"] = n_replay
    theta = init if init is not None else adapter.init_params(seed)
    learner.init_outer(theta)
    best_theta, best_val, best_step = theta, -math.inf, 0
    best_log_lr = learner.log_lr  # per-layer mode's multipliers at the best step; else None
    losses, accs, val_steps, val_accs = [], [], [], []
    start = 0
    elapsed_before = 0.0
    if resume:
        require_checkpoint(checkpoint)
        arrays, meta = load_safetensors(checkpoint)
        saved = json.loads(meta.get("identity", "{}"))
        for k in ("method", "base_model_hash", "algorithm"):
            if saved.get(k) != ident[k]:
                raise UserError(f"checkpoint was made with {k}={saved.get(k)!r}, this run has "
                                f"{ident[k]!r}", path=str(checkpoint), field=k)
        was = json.loads(meta.get("schedule", "{}"))  # absent in older checkpoints
        changed = [k for k in schedule if k in was and was[k] != schedule[k]]
        if changed:
            flags = ", ".join(f"--{k.replace('_', '-')} {was[k]}" for k in changed)
            now = ", ".join(f"{schedule[k]}" for k in changed)
            raise UserError(f"the checkpoint was made with {flags}, this run has {now}; resume "
                            "with the same settings (they set the ε schedule and the task "
                            "stream), or start over without --resume", path=str(checkpoint),
                            field=changed[0])
        theta = _unflat("theta", arrays)
        best_theta = _unflat("best", arrays) or theta
        if learner.outer is not None or learner.per_layer:
            learner.init_outer(theta, _unflat("log_lr", arrays) if learner.per_layer else None)
        if learner.outer is not None:
            state = _unflat("outer", arrays)
            if state is not None:
                learner.outer.state = state
        if learner.per_layer:
            state = _unflat("lr_outer", arrays)
            if state is not None:
                learner.lr_outer.state = state
            best_log_lr = _unflat("best_log_lr", arrays) or learner.log_lr
        curves = json.loads(meta["curves"])
        losses, accs = curves["meta_loss"], curves["meta_accuracy"]
        val_steps, val_accs = curves["val_steps"], curves["val_accuracy"]
        best_val = -math.inf if curves["best_val"] is None else curves["best_val"]
        best_step = curves["best_step"]
        start = int(meta["step"])
        elapsed_before = float(meta.get("seconds", 0.0))
    if dist.size_of(group) > 1 and dist.barrier(group, start) != start * dist.size_of(group):
        raise dist.DistributedError(
            f"rank {dist.rank_of(group)} starts at meta-step {start} but not every rank does: "
            "each rank reads the checkpoint from its own registry, which must be the same one "
            "(share it, or copy the checkpoint)", path=str(checkpoint), field="resume")
    last_saved = start if resume else None

    val_eps = []
    if val_source is not None and eval_every > 0:
        val_eps = [encode_episode(task, tok, prepare=adapter.prepare)
                   for task in validation_tasks(val_source, seed, eval_episodes)]

    def save_checkpoint(step: int) -> None:
        if checkpoint is None or not dist.is_root(group):  # rank 0 writes for every rank
            return
        arrays = {**_flat("theta", theta), **_flat("best", best_theta)}
        if learner.outer is not None:
            arrays.update(_flat("outer", learner.outer.state))
        if learner.per_layer:
            arrays.update({**_flat("log_lr", learner.log_lr), **_flat("best_log_lr", best_log_lr),
                           **_flat("lr_outer", learner.lr_outer.state)})
        curves = {"meta_loss": losses, "meta_accuracy": accs, "val_steps": val_steps,
                  "val_accuracy": val_accs, "best_val": best_val if best_val > -math.inf else None,
                  "best_step": best_step}
        save_safetensors(checkpoint, arrays, {
            "kind": "meta-checkpoint", "step": str(step), "identity": ident,
            "schedule": schedule, "curves": curves,
            "spec": spec, "seconds": str(elapsed_before + time.perf_counter() - t0)})

    if validate_start and val_eps and start == 0:
        best_val = validate_theta(adapter, cfg, theta, val_eps, group, learner.log_lr)
        val_steps.append(0)
        val_accs.append(round(best_val, 6))

    t = start
    try:
        for t in range(start, meta_steps):
            # every rank draws the same task indices and adapts its share (one process: all)
            tasks = [(replay_source if i >= meta_batch - n_replay else train_source).sample(
                         seed * 1_000_003 + t * meta_batch + i)
                     for i in dist.mine(meta_batch, group)]
            for i, task in zip(dist.mine(meta_batch, group), tasks):
                if i >= meta_batch - n_replay:
                    replay_labels.update(task.labels)
            episodes = [encode_episode(task, tok) for task in tasks]
            if vectorise:
                groups = [stack_episodes(g, prepare=adapter.prepare)
                          for g in group_by_signature(episodes)]
            else:  # one task per group: no padding to the meta-batch's longest prompt
                groups = [stack_episodes([e], prepare=adapter.prepare) for e in episodes]
            new_theta, loss, acc = learner.step(theta, groups, t, meta_steps)
            if not (math.isfinite(loss) and all(bool(mx.all(mx.isfinite(v)).item())
                                                for _, v in tree_flatten(new_theta))):
                raise MetaDivergence(f"meta-loss became {loss} at meta-step {t + 1}; stopped. The "
                                     f"last good checkpoint is kept; lower --inner-lr/--outer-lr "
                                     f"and --resume", path=str(checkpoint) if checkpoint else None,
                                     field="meta_loss")
            theta = new_theta
            losses.append(round(loss, 6))
            accs.append(round(acc, 6))
            val = None
            if val_eps and ((t + 1) % eval_every == 0 or t + 1 == meta_steps):
                val = validate_theta(adapter, cfg, theta, val_eps, group, learner.log_lr)
                val_steps.append(t + 1)
                val_accs.append(round(val, 6))
                if val > best_val:
                    best_val, best_step, best_theta = val, t + 1, theta
                    best_log_lr = learner.log_lr
            if not val_eps:
                best_theta, best_step, best_log_lr = theta, t + 1, learner.log_lr
            if on_step is not None:
                on_step(t + 1, loss, acc, val)
            if checkpoint is not None and ((t + 1) % checkpoint_every == 0 or t + 1 == meta_steps):
                save_checkpoint(t + 1)
                last_saved = t + 1
    except dist.DistributedError as e:  # a peer died: say where the run can be picked up
        kept = (f"the last checkpoint (meta-step {last_saved}) is kept: rerun with --resume"
                if checkpoint is not None and last_saved else "no checkpoint was written yet")
        raise dist.DistributedError(f"{e.message} during meta-step {t + 1}; {kept}",
                                    path=str(checkpoint) if checkpoint else None) from None
    return MetaTrainResult(theta=theta, best_theta=best_theta, best_step=best_step,
                           meta_losses=losses, meta_accuracies=accs, val_steps=val_steps,
                           val_accuracies=val_accs,
                           seconds=elapsed_before + time.perf_counter() - t0,
                           steps_done=meta_steps, fallback_reason=learner.fallback_reason,
                           best_log_lr=best_log_lr,
                           extra={"processes": dist.size_of(group),
                                  **({"replay": {"tasks_per_step": n_replay,
                                                 "labels": sorted(replay_labels)}}
                                     if n_replay else {})})


def version_metadata(adapter, cfg: MetaConfig, result: MetaTrainResult, *, spec: dict,
                     meta_steps: int, meta_batch: int, hyper: dict) -> dict:
    return adapter.metadata(
        kind="meta-weights", algorithm=cfg.algorithm,
        hyperparameters={**cfg.to_dict(), "meta_steps": meta_steps, "meta_batch": meta_batch,
                         **hyper},
        data=spec, num_tasks=meta_steps * meta_batch,
        meta_loss=result.meta_losses, meta_accuracy=result.meta_accuracies,
        val_steps=result.val_steps, val_accuracy=result.val_accuracies,
        best_step=result.best_step, duration_seconds=round(result.seconds, 3),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        metapeft_version=__version__)

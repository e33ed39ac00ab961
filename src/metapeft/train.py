"""The training step and the inner loop: train an adapter's parameter tree on a support set, score
the query set.

Used by ``adapt``, by the tuner and sweeps, and (through ``batch_loss`` and the adapter's hook) by
the meta-learner's inner loops. It takes mlx-lm's trainer shape:

* one compiled step over (params, optimizer state, random state): the random state is part of the
  compiled state, as in ``mlx_lm.tuner.trainer``, so dropout draws a new mask every step instead of
  the one frozen at trace time;
* the support set is tokenised once (``TaskEncoder`` memoises prompts) and minibatches are sliced
  from it;
* scoring runs in eval mode (no dropout), training in train mode;
* one loss path, ``batch_loss``: classification loss over length buckets plus the regulariser;
* the adapter's optax-style hook, ``init_state`` / ``on_step``, runs after every step;
* batches pass through ``adapter.prepare`` once per task: an adapter on the top k blocks gets the
  frozen trunk's hidden states computed once, and every step starts at block L - k.

Nothing here branches on the method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from metapeft.adapters.base import Adapter
from metapeft.data.tasks import Example, Task
from metapeft.errors import UserError
from metapeft.scoring import Batch, TaskEncoder, classification_loss, total_weight

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}
BUCKET_SIZE = 32


def lr_schedule(lr: float, decay: float = 0.0):
    """The step size of optimizer update t (0-based): ``lr / (1 + decay · t)``, inverse-time decay;
    the constant ``lr`` for decay 0. A learned init sits near a solution already, so its first step
    wants the full lr and the later ones less (``meta.stepsize`` chooses ``decay`` on validation
    tasks). Inverse time rather than exponential: the sum of the steps keeps growing (like log t),
    so a long run still learns."""
    if decay < 0:
        raise UserError(f"--lr-decay must be >= 0 (got {decay:g})", field="lr_decay")
    if decay == 0:
        return lr
    return lambda t: lr / (1.0 + decay * t)


def make_optimizer(name: str, lr: float, decay: float = 0.0) -> optim.Optimizer:
    try:
        return OPTIMIZERS[name](learning_rate=lr_schedule(lr, decay))
    except KeyError:
        raise UserError(f"unknown optimizer '{name}'; choose from {sorted(OPTIMIZERS)}",
                        field="optimizer") from None


def batch_loss(adapter: Adapter, params: dict, batches: Batch | list[Batch],
               objective: str = "ce") -> mx.array:
    """The training loss: the weighted mean classification loss over every example of one batch
    or a list of length buckets, plus the adapter's regulariser. The only loss path: ``train``,
    the meta-learner's inner and outer losses all call it."""
    if isinstance(batches, Batch):
        batches = [batches]
    total = sum(classification_loss(adapter.scores(params, b), b, normalise=False,
                                    objective=objective) for b in batches)
    loss = total / mx.maximum(sum(total_weight(b) for b in batches), 1e-8)
    reg = adapter.regularizer(params)
    return loss if reg is None else loss + reg


def scored_hits(adapter: Adapter, params: dict, batch: Batch) -> tuple[mx.array, mx.array]:
    """(correct predictions, summed unnormalised loss) on one batch, in eval mode (no dropout)."""
    with adapter.scoring_mode():
        scores = adapter.scores(adapter.scoring_params(params), batch)
    valid = batch.labels >= 0
    hits = mx.logical_and(mx.argmax(scores, axis=-1) == batch.labels, valid).sum()
    return hits, classification_loss(scores, batch, normalise=False)


def evaluate(adapter: Adapter, params: dict, buckets: list[Batch]) -> tuple[float, float]:
    """Query (accuracy, mean loss) over length buckets."""
    hits, loss, n = [], [], 0
    for b in buckets:
        h, l_ = scored_hits(adapter, params, b)
        hits.append(h)
        loss.append(l_)
        n += b.size
    h, l_ = mx.sum(mx.stack(hits)), mx.sum(mx.stack(loss))
    mx.eval(h, l_)
    return h.item() / max(n, 1), l_.item() / max(n, 1)


# Trained adapter weights are O(1) (LoRA's B starts at 0; virtual tokens are embedding-sized);
# a value past this means the optimizer ran away, even when the loss stayed finite (a saturated
# softmax gives a constant loss of log C while the weights grow without bound).
DIVERGED = 1e4


def check_diverged(params: dict, steps: int, lr: float, optimizer: str) -> None:
    """Raise ``FloatingPointError`` when the trained parameters are non-finite or blew up."""
    leaves = [v for _, v in tree_flatten(params) if v.size]
    if not leaves:
        return
    biggest = mx.max(mx.stack([mx.max(mx.abs(v.astype(mx.float32))) for v in leaves]))
    big = biggest.item()
    if not np.isfinite(big) or big > DIVERGED:
        raise FloatingPointError(f"training diverged: the largest adapter weight is {big:.3g} "
                                 f"after {steps} steps; lower the learning rate (now {lr:g} "
                                 f"with {optimizer})")


@dataclass
class EncodedTask:
    """A task tokenised once: support and query as length buckets (see ``encode_buckets``)."""

    task: Task
    encoder: TaskEncoder
    support_examples: list[Example]
    support: list[Batch]
    query: list[Batch]
    _prepared: dict = field(default_factory=dict, repr=False)

    @property
    def num_support(self) -> int:
        return len(self.support_examples)

    def prepared(self, adapter: Adapter, which: str) -> list[Batch]:
        """``support`` or ``query`` through ``adapter.prepare``, computed once per base model and
        frozen depth: several inits adapted on the same task share one frozen-trunk pass."""
        # a stack (adapters.stacked) runs another model under its trained stage: its own key
        model_key = getattr(adapter, "trunk_key", adapter.base.fingerprint)
        key = (which, model_key, adapter.base.dequantized, adapter.frozen_blocks)
        if key not in self._prepared:
            self._prepared[key] = [adapter.prepare(b) for b in getattr(self, which)]
        return self._prepared[key]

    @property
    def num_query(self) -> int:
        return sum(b.size for b in self.query)


def encode_task(task: Task, tokenizer, template: str | None = None,
                bucket_size: int = BUCKET_SIZE,
                support_weights: list[float] | None = None) -> EncodedTask:
    enc = TaskEncoder(tokenizer, task.labels, **({"template": template} if template else {}))
    return EncodedTask(task=task, encoder=enc, support_examples=list(task.support),
                       support=enc.encode_buckets(task.support, support_weights, bucket_size),
                       query=enc.encode_buckets(task.query, None, bucket_size))


@dataclass
class AdaptResult:
    params: dict
    losses: list[float]  # support loss at each step, before the update
    accuracies: list[float]  # query accuracy at step 0 (init) and after every step
    steps_to_target: int | None
    target_reached: bool
    seconds: float
    train_seconds: float
    peak_memory_mb: float
    tokens_per_second: float  # processed tokens (prompts + all candidates' label tokens) / s
    extra: dict = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        return self.accuracies[-1] if self.accuracies else float("nan")


def _tokens(buckets: list[Batch]) -> int:
    """Tokens a step runs through the model: the padded prompts, plus every candidate's label
    continuation for every example (rank classification scores all C): unpadded when the
    continuations run in length groups, else padded to the longest label."""
    def continuations(b: Batch) -> int:
        if b.label_groups:
            return sum(int(g[1].size) for g in b.label_groups)
        return b.label_tokens.shape[0] * max(b.label_tokens.shape[1] - 1, 0)
    return sum(int(b.prompt.size) + b.prompt.shape[0] * continuations(b) for b in buckets)


class _Minibatches:
    """Support minibatches of a fixed size, re-bucketed by length, wrapping around the epoch. The
    encoder memoises each prompt's tokens, so slicing costs no tokenisation."""

    def __init__(self, data: EncodedTask, batch_size: int, seed: int):
        self.data, self.rng = data, np.random.default_rng(seed)
        self.n = data.num_support
        self.bs = min(batch_size, self.n)
        self.order, self.cursor = self.rng.permutation(self.n), 0

    def next(self, adapter: Adapter) -> list[Batch]:
        if self.bs == self.n:  # the whole support set: prepared once per task, reused every step
            return self.data.prepared(adapter, "support")
        if self.cursor + self.bs > self.n:
            self.order, self.cursor = self.rng.permutation(self.n), 0
        picked = [self.data.support_examples[j] for j in self.order[self.cursor:self.cursor + self.bs]]
        self.cursor += self.bs
        return [adapter.prepare(b)
                for b in self.data.encoder.encode_buckets(picked, None, BUCKET_SIZE)]


def train(adapter: Adapter, params: dict, data: EncodedTask, *, steps: int, evaluate_query: bool = True,
          lr: float = 3e-3, optimizer: str = "adam", batch_size: int = 64, seed: int = 0,
          target: float | None = None, compile: bool = True, objective: str = "ce",
          on_step: Callable[[int, float, float | None], None] | None = None,
          eval_at: set[int] | None = None, stop_at_target: bool = False,
          stop: Callable[[int], bool] | None = None,
          lr_scales: dict[str, float] | None = None, lr_decay: float = 0.0) -> AdaptResult:
    """Train for ``steps`` optimizer steps; evaluate the query set at step 0 and after each step
    (or only at the steps in ``eval_at``: then ``accuracies`` holds those, in order, and
    ``extra["eval_steps"]`` says which steps they are). ``stop_at_target``: stop after the first
    evaluation that reaches ``target`` (``extra["stopped_at"]`` is then that step, else None).
    ``stop(step)`` is asked before every optimizer step (1-based); True ends the run before it
    (``extra["stopped_early_at"]`` is then the last step run, else None): a time budget.
    ``lr_scales``: per-leaf multipliers of the step (parameter name -> factor; leaves not named
    keep 1), the inner lrs a per-layer meta-training run learned (``adapter_io.init_lr_scales``).
    Adam's update does not scale with the gradient, so the step itself is scaled, inside the
    compiled step: new = old + scale · (optimizer's new − old).
    ``lr_decay``: update t runs at ``lr / (1 + lr_decay · (t − 1))`` (``lr_schedule``)."""
    if steps < 0:
        raise UserError("--steps must be >= 0", field="steps")
    t0 = time.perf_counter()
    # mx.compile swaps the leaves of its captured state for tracers in place: train on a copy of
    # the tree so the caller's init stays intact (meta-learners reuse it).
    params = tree_map(lambda x: x, params)
    mx.eval(params)
    opt = make_optimizer(optimizer, lr, lr_decay)
    opt.init(params)
    mx.random.seed(seed)  # dropout masks: reproducible per run
    holder = {"params": params}
    state = [holder, opt.state, mx.random.state]
    value_and_grad = mx.value_and_grad(partial(batch_loss, adapter, objective=objective))
    scales = None
    if lr_scales and any(float(v) != 1.0 for v in lr_scales.values()):  # all 1: the plain step
        scales = tree_map_with_path(lambda k, _: mx.array(float(lr_scales.get(k, 1.0))), params)

    def step_fn(arrays):
        loss, grads = value_and_grad(holder["params"], [Batch(*a) for a in arrays])
        old = holder["params"]
        new = opt.apply_gradients(grads, old)
        if scales is not None:
            new = tree_map(lambda o, n, c: o + c * (n - o), old, new, scales)
        holder["params"] = new
        return loss, grads

    step = mx.compile(step_fn, inputs=state, outputs=state) if compile else step_fn
    hook_state = adapter.init_state(params)
    batches = _Minibatches(data, batch_size, seed)
    # the frozen trunk's states (when the adapter trains only the top blocks), once per task
    query = data.prepared(adapter, "query") if evaluate_query and data.query else None

    losses: list[float] = []
    accs: list[float] = []
    hit_at = None
    evaluated: list[int] = []

    def score(i: int) -> float | None:
        nonlocal hit_at
        if query is None or (eval_at is not None and i not in eval_at):
            return None
        evaluated.append(i)
        acc, _ = evaluate(adapter, holder["params"], query)
        accs.append(acc)
        if target is not None and hit_at is None and acc >= target:
            hit_at = i
        return acc

    score(0)
    if hasattr(mx, "reset_peak_memory"):
        mx.reset_peak_memory()
    train_time = 0.0
    tokens = 0
    adapter.set_training(True)
    stopped_at = stopped_early_at = None
    for i in range(1, steps + 1):
        if stop_at_target and hit_at is not None:
            stopped_at = hit_at
            break
        if stop is not None and stop(i):
            stopped_early_at = i - 1
            break
        buckets = batches.next(adapter)
        ts = time.perf_counter()
        loss, grads = step([tuple(b) for b in buckets])
        mx.eval(loss, state)
        new_params, hook_state = adapter.on_step(holder["params"], grads, hook_state, i, steps)
        if new_params is not holder["params"]:
            holder["params"] = new_params
            mx.eval(holder["params"])
        train_time += time.perf_counter() - ts
        tokens += _tokens(buckets)
        loss_v = loss.item()
        if not np.isfinite(loss_v):
            raise FloatingPointError(f"support loss became {loss_v} at step {i}; lower the "
                                     f"learning rate (now {lr})")
        losses.append(loss_v)
        acc = score(i)
        if on_step is not None:
            on_step(i, loss_v, acc)
    check_diverged(holder["params"], steps, lr, optimizer)
    peak = mx.get_peak_memory() / 2**20 if hasattr(mx, "get_peak_memory") else float("nan")
    return AdaptResult(params=holder["params"], losses=losses, accuracies=accs,
                       steps_to_target=hit_at, target_reached=hit_at is not None,
                       seconds=time.perf_counter() - t0, train_seconds=train_time,
                       peak_memory_mb=peak,
                       tokens_per_second=tokens / train_time if train_time > 0 else 0.0,
                       extra={"eval_steps": evaluated, "hook_state": hook_state,
                              "stopped_at": stopped_at, "stopped_early_at": stopped_early_at})

"""The inner loop: train an adapter's parameter tree on a support set, score the query set.

Used by ``adapt``, by the tuner and as the evaluation loop of meta-learning. One training step is a
compiled function of (params, optimizer state, batch); the adapter's own hooks (regulariser,
``on_step``) are the only method-specific parts, and the loop never branches on the method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_map
import mlx.optimizers as optim
import numpy as np

from metapeft.adapters.base import Adapter
from metapeft.errors import UserError
from metapeft.data.tasks import Example, Task
from metapeft.scoring import Batch, TaskEncoder, classification_loss, total_weight

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}


def make_optimizer(name: str, lr: float) -> optim.Optimizer:
    try:
        return OPTIMIZERS[name](learning_rate=lr)
    except KeyError:
        raise UserError(f"unknown optimizer '{name}'; choose from {sorted(OPTIMIZERS)}",
                        field="optimizer") from None


def loss_fn(adapter: Adapter, params: dict, buckets: list[Batch], objective: str = "ce") -> mx.array:
    """Mean loss over all examples of a list of length buckets, plus the adapter's regulariser."""
    total = sum(classification_loss(adapter.scores(params, b), b, normalise=False,
                                    objective=objective) for b in buckets)
    loss = total / mx.maximum(sum(total_weight(b) for b in buckets), 1e-8)
    reg = adapter.regularizer(params)
    return loss if reg is None else loss + reg


@dataclass
class EncodedTask:
    """A task tokenised once: support and query as length buckets (see ``encode_buckets``)."""

    task: Task
    encoder: TaskEncoder
    support_examples: list[Example]
    support: list[Batch]
    query: list[Batch]

    @property
    def num_support(self) -> int:
        return len(self.support_examples)

    @property
    def num_query(self) -> int:
        return sum(b.size for b in self.query)


def encode_task(task: Task, tokenizer, template: str | None = None,
                bucket_size: int = 32, support_weights: list[float] | None = None) -> EncodedTask:
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


def evaluate(adapter: Adapter, params: dict, buckets: list[Batch]) -> tuple[float, float]:
    """Query (accuracy, mean loss) over length buckets."""
    params = adapter.scoring_params(params)
    hits, loss, n = [], [], 0
    for b in buckets:
        scores = adapter.scores(params, b)
        valid = b.labels >= 0
        hits.append(mx.logical_and(mx.argmax(scores, axis=-1) == b.labels, valid).sum())
        loss.append(classification_loss(scores, b, normalise=False))
        n += b.size
    h, l_ = mx.sum(mx.stack(hits)), mx.sum(mx.stack(loss))
    mx.eval(h, l_)
    return h.item() / max(n, 1), l_.item() / max(n, 1)


def train(adapter: Adapter, params: dict, data: EncodedTask, *, steps: int, evaluate_query: bool = True,
          lr: float = 3e-3, optimizer: str = "adam", batch_size: int = 64, seed: int = 0,
          target: float | None = None, compile: bool = True, objective: str = "ce",
          on_step: Callable[[int, float, float | None], None] | None = None,
          eval_at: set[int] | None = None) -> AdaptResult:
    """Train for ``steps`` optimizer steps; evaluate the query set at step 0 and after each step
    (or only at the steps in ``eval_at``: then ``accuracies`` holds those, in order, and
    ``extra["eval_steps"]`` says which steps they are)."""
    if steps < 0:
        raise UserError("--steps must be >= 0", field="steps")
    t0 = time.perf_counter()
    # mx.compile swaps the leaves of its captured state for tracers in place: train on a copy of
    # the tree so the caller's init stays intact (meta-learners reuse it).
    params = tree_map(lambda x: x, params)
    mx.eval(params)
    opt = make_optimizer(optimizer, lr)
    opt.init(params)
    holder = {"params": params}
    state = [holder, opt.state]

    value_and_grad = mx.value_and_grad(partial(loss_fn, adapter, objective=objective))

    def step_fn(arrays):
        loss, grads = value_and_grad(holder["params"], [Batch(*a) for a in arrays])
        holder["params"] = opt.apply_gradients(grads, holder["params"])
        return loss, grads

    step = mx.compile(step_fn, inputs=state, outputs=state) if compile else step_fn

    rng = np.random.default_rng(seed)
    n = data.num_support
    bs = min(batch_size, n)
    order = rng.permutation(n)
    cursor = 0
    query = data.query if evaluate_query and data.query else None

    losses: list[float] = []
    accs: list[float] = []
    hit_at = None
    evaluated: list[int] = []
    if query is not None and (eval_at is None or 0 in eval_at):
        evaluated.append(0)
        acc0, _ = evaluate(adapter, holder["params"], query)
        accs.append(acc0)
        if target is not None and acc0 >= target:
            hit_at = 0
    if hasattr(mx, "reset_peak_memory"):
        mx.reset_peak_memory()
    train_time = 0.0
    tokens = 0
    for i in range(1, steps + 1):
        if bs == n:
            buckets = data.support
        else:  # minibatches of a fixed size, re-bucketed by length, wrapping around the epoch
            if cursor + bs > n:
                order = rng.permutation(n)
                cursor = 0
            picked = [data.support_examples[j] for j in order[cursor:cursor + bs]]
            buckets = data.encoder.encode_buckets(picked, None, 32)
            cursor += bs
        ts = time.perf_counter()
        loss, grads = step([tuple(b) for b in buckets])
        mx.eval(loss, state)
        new_params = adapter.on_step(holder["params"], grads, i, steps)
        if new_params is not holder["params"]:
            holder["params"] = new_params
            mx.eval(holder["params"])
        train_time += time.perf_counter() - ts
        # tokens the step actually runs through the model: the padded prompts, plus every
        # candidate's label continuation for every example (rank classification scores all C)
        tokens += sum(int(b.prompt.size) + b.prompt.shape[0] * b.label_tokens.shape[0]
                      * max(b.label_tokens.shape[1] - 1, 0) for b in buckets)
        loss_v = loss.item()
        if not np.isfinite(loss_v):
            raise FloatingPointError(f"support loss became {loss_v} at step {i}; lower the "
                                     f"learning rate (now {lr})")
        losses.append(loss_v)
        acc = None
        if query is not None and (eval_at is None or i in eval_at):
            evaluated.append(i)
            acc, _ = evaluate(adapter, holder["params"], query)
            accs.append(acc)
            if target is not None and hit_at is None and acc >= target:
                hit_at = i
        if on_step is not None:
            on_step(i, loss_v, acc)
    peak = mx.get_peak_memory() / 2**20 if hasattr(mx, "get_peak_memory") else float("nan")
    return AdaptResult(params=holder["params"], losses=losses, accuracies=accs,
                       steps_to_target=hit_at, target_reached=hit_at is not None,
                       seconds=time.perf_counter() - t0, train_seconds=train_time,
                       peak_memory_mb=peak,
                       tokens_per_second=tokens / train_time if train_time > 0 else 0.0,
                       extra={"eval_steps": evaluated})

"""Reptile, first-order MAML and second-order MAML, written once against the adapter protocol.

Everything here is a function of explicit parameter trees; the adapter is only asked for
``scores``, ``regularizer`` and its step hook (``init_state``/``on_step``), so no line branches on
the PEFT method.

    inner_adapt(θ, support)          k steps of SGD or Adam on the support loss -> φ
    reptile   contribution  φ − θ                      outer: θ ← θ + ε_t · mean_i(φ_i − θ),
                                                       ε_t = ε_0 · (1 − t/T)   (Nichol et al. 2018)
    fomaml    contribution  ∇_φ L_query(φ), φ = stop_gradient(inner_adapt(θ))
    maml      contribution  ∇_θ L_query(inner_adapt(θ))  (mx.grad through the unrolled inner
                                                       loop: second order, Finn et al. 2017)
    FOMAML/MAML outer step: an mlx.optimizers optimizer on mean_i(contribution_i).

A meta-batch runs either sequentially (a Python loop over tasks) or vectorised: the per-task
function under ``mx.vmap`` over stacked task batches (θ shared, ``in_axes=None``), optionally under
``mx.compile``. Both paths call the same ``task_contribution``. Nothing inside a transformed
function calls ``mx.eval``; the inner optimizer state is created inside the traced function.

Continual runs (``meta.continual``): ``MetaLearner.anchor`` adds EWC's pull toward a parent θ,
λ·Σ F̂·(θ − θ_parent)²: its gradient joins the FOMAML/MAML outer gradient; for Reptile the same
term is subtracted from the direction mean(φ − θ) (θ − φ being Reptile's gradient), the
per-coordinate pull ε_t·2λF̂ capped at 1.

Data parallel (``meta.distributed``): given an ``mx.distributed`` group, ``step`` receives only
this rank's tasks and adds every rank's sums (contributions, losses, accuracies, task counts)
with one ``all_sum`` before dividing by the total task count, whatever the algorithm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import mlx.core as mx
from mlx.utils import tree_map

from metapeft.errors import UserError
from metapeft.scoring import Batch
from metapeft.train import batch_loss, make_optimizer, scored_hits

ALGORITHMS = ("reptile", "fomaml", "maml")


@dataclass
class MetaConfig:
    algorithm: str = "reptile"
    inner_steps: int = 5
    inner_lr: float = 3e-3
    inner_optimizer: str = "adam"  # adam | sgd  (second-order MAML uses sgd, as in the paper)
    outer_lr: float = 1.0  # Reptile's ε_0; FOMAML/MAML: the outer Adam learning rate
    outer_optimizer: str = "adam"
    anneal: bool = True  # Reptile: ε decays linearly to 0 over the run
    objective: str = "ce"

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"unknown algorithm '{self.algorithm}'; choose one of "
                            f"{', '.join(ALGORITHMS)}", field="algorithm")
        if self.inner_steps < 1:
            raise UserError("inner steps must be >= 1", field="inner_steps")
        if self.inner_optimizer not in ("adam", "sgd"):
            raise UserError("inner optimizer must be adam or sgd", field="inner_optimizer")
        if self.inner_lr <= 0 or self.outer_lr <= 0:
            raise UserError("learning rates must be positive", field="inner_lr/outer_lr")
        from metapeft.scoring import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown loss '{self.objective}'; choose one of "
                            f"{', '.join(OBJECTIVES)}", field="objective")

    def to_dict(self) -> dict:
        return asdict(self)


def query_accuracy(adapter, params: dict, batch: Batch) -> mx.array:
    """Query accuracy in eval mode (the meta-learner's progress and validation metric)."""
    hits, _ = scored_hits(adapter, params, batch)
    return hits / mx.maximum((batch.labels >= 0).sum(), 1)


def _take(batch, i):
    """Task ``i`` of a stacked batch (a NamedTuple of arrays with a leading task axis; its
    empty fields, such as a meta-batch's ``label_groups``, stay as they are)."""
    return type(batch)(*[f[i] if isinstance(f, mx.array) else f for f in batch])


def inner_update(cfg: MetaConfig):
    """The inner optimizer as an optax-style pair ``(init(params), update(params, grads, state))``.

    Adam is written out because mlx.optimizers.Adam divides by ``sqrt(v) + eps``: at a fresh
    LoRA/DoRA/AdaLoRA init (B = 0) some gradients are exactly 0, and the derivative of ``sqrt(v)``
    at v = 0 is infinite, so second-order MAML through it returns NaN. Here ``eps`` sits inside the
    root, ``m / sqrt(v + eps**2)``, which is finite everywhere and equals mlx's update to within
    eps wherever v >> eps**2. Like mlx's Adam (its default), no bias correction.
    """
    lr = cfg.inner_lr
    if cfg.inner_optimizer == "sgd":
        return (lambda params: None,
                lambda params, grads, state: (tree_map(lambda p, g: p - lr * g, params, grads),
                                              None))
    b1, b2, eps2 = 0.9, 0.999, 1e-16

    def init(params):
        return tree_map(mx.zeros_like, params), tree_map(mx.zeros_like, params)

    def update(params, grads, state):
        m, v = state
        m = tree_map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, grads)
        v = tree_map(lambda v_, g: b2 * v_ + (1 - b2) * mx.square(g), v, grads)
        params = tree_map(lambda p, m_, v_: p - lr * m_ / mx.sqrt(v_ + eps2), params, m, v)
        return params, (m, v)

    return init, update


def inner_adapt(adapter, params: dict, support: Batch, cfg: MetaConfig) -> dict:
    """``cfg.inner_steps`` optimizer steps on the support loss, with the adapter's step hook after
    each (so AdaLoRA allocates ranks here as it does in ``adapt``); differentiable end to end and
    free of ``mx.eval``, so it runs under ``mx.vmap``, ``mx.grad`` and ``mx.compile``."""
    grad_fn = mx.grad(partial(batch_loss, adapter, batches=support, objective=cfg.objective))
    init, update = inner_update(cfg)
    opt_state, hook_state = init(params), adapter.init_state(params)
    for i in range(1, cfg.inner_steps + 1):
        grads = grad_fn(params)
        params, opt_state = update(params, grads, opt_state)
        params, hook_state = adapter.on_step(params, grads, hook_state, i, cfg.inner_steps)
    return params


def task_contribution(adapter, cfg: MetaConfig, theta: dict, support: Batch, query: Batch):
    """(query loss after adaptation, query accuracy after adaptation, contribution tree)."""
    query_loss = partial(batch_loss, adapter, batches=query, objective=cfg.objective)
    if cfg.algorithm == "maml":
        def outer_loss(th):
            phi = inner_adapt(adapter, th, support, cfg)
            return query_loss(phi), phi

        (loss, phi), grads = mx.value_and_grad(outer_loss)(theta)
        return loss, query_accuracy(adapter, tree_map(mx.stop_gradient, phi), query), grads
    phi = tree_map(mx.stop_gradient, inner_adapt(adapter, theta, support, cfg))
    if cfg.algorithm == "fomaml":
        loss, grads = mx.value_and_grad(query_loss)(phi)
        return loss, query_accuracy(adapter, phi, query), grads
    loss = query_loss(phi)
    return loss, query_accuracy(adapter, phi, query), tree_map(lambda a, b: a - b, phi, theta)


# Errors with which MLX refuses to vmap or compile a graph (e.g. the VJP of mlx-lm's compiled
# activations under vmap, or a gather it cannot batch): the meta-learner then runs sequentially.
TRANSFORM_ERRORS = (RuntimeError, IndexError, ValueError)


class MetaLearner:
    """Holds θ's outer optimizer and applies one meta-step per meta-batch.

    ``step(theta, groups, t, total)`` takes groups of stacked (support, query) Batches (each group
    shares shapes) and returns (new θ, mean query loss, mean query accuracy). With a distributed
    ``group`` of size > 1 the groups are this rank's share of the meta-batch (possibly none) and
    the means are over every rank's tasks, so all ranks return the same θ.
    """

    def __init__(self, adapter, cfg: MetaConfig, vectorise: bool = True, compile: bool = True,
                 group=None):
        cfg.validate()
        self.adapter = adapter
        self.cfg = cfg
        self.vectorise = vectorise
        self.compile = compile and vectorise
        self.outer = None
        self.fallback_reason: str | None = None
        self.group = group  # an mx.distributed group; None or size 1: this process alone
        self.vectorised_groups = 0  # meta-batch groups that really ran under vmap
        self.anchor = None  # meta.continual.Anchor: EWC's pull toward a parent θ, or None
        if cfg.algorithm != "reptile":
            self.outer = make_optimizer(cfg.outer_optimizer, cfg.outer_lr)
        per_task = partial(task_contribution, adapter, cfg)
        self._per_task = per_task
        vmapped = mx.vmap(per_task, in_axes=(None, 0, 0))

        def batched(theta, support, query):
            loss, acc, contrib = vmapped(theta, support, query)
            return loss.sum(), acc.sum(), tree_map(lambda c: c.sum(axis=0), contrib)

        self._batched = mx.compile(batched) if self.compile else batched

    def init_outer(self, theta: dict) -> None:
        if self.outer is not None:
            self.outer.init(theta)

    def _group_sums(self, theta, support: Batch, query: Batch):
        n = support[0].shape[0]
        if self.vectorise and n > 1:
            try:
                out = self._batched(theta, support, query)
                mx.eval(out)
                self.vectorised_groups += 1
                return (*out, n)
            except TRANSFORM_ERRORS as e:
                self.vectorise = False
                self.fallback_reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        loss_sum, acc_sum, total = 0.0, 0.0, None
        for i in range(n):
            s, q = _take(support, i), _take(query, i)
            loss, acc, contrib = self._per_task(theta, s, q)
            mx.eval(loss, acc, contrib)  # sequential path: bound memory per task
            loss_sum, acc_sum = loss_sum + loss, acc_sum + acc
            total = contrib if total is None else tree_map(lambda a, b: a + b, total, contrib)
        return loss_sum, acc_sum, total, n

    def step(self, theta: dict, groups: list[tuple[Batch, Batch]], t: int, total_steps: int):
        loss_sum, acc_sum, contrib_sum, n = 0.0, 0.0, None, 0
        for support, query in groups:
            ls, ac, cs, k = self._group_sums(theta, support, query)
            loss_sum, acc_sum, n = loss_sum + ls, acc_sum + ac, n + k
            contrib_sum = cs if contrib_sum is None else tree_map(lambda a, b: a + b, contrib_sum, cs)
        if self.group is not None and self.group.size() > 1:
            from metapeft.meta.distributed import all_sum_tree

            if contrib_sum is None:  # this rank drew no task of the meta-batch
                contrib_sum = tree_map(mx.zeros_like, theta)
            contrib_sum, loss_sum, acc_sum, n = all_sum_tree(contrib_sum, self.group, loss_sum,
                                                             acc_sum, float(n))
            n = int(n.item())
        mean = tree_map(lambda c: c / n, contrib_sum)
        if self.cfg.algorithm == "reptile":
            eps = self.cfg.outer_lr * ((1.0 - t / max(total_steps, 1)) if self.cfg.anneal else 1.0)
            new = tree_map(lambda th, d: th + eps * d, theta, mean)
            if self.anchor is not None:  # EWC: θ − φ is Reptile's gradient; add the penalty's
                new = tree_map(lambda a, b: a - b, new, self.anchor.pull(theta, eps))
            theta = new
        else:
            if self.anchor is not None:  # EWC: the penalty's gradient joins the outer gradient
                mean = tree_map(lambda a, b: a + b, mean, self.anchor.gradient(theta))
            theta = self.outer.apply_gradients(mean, theta)
        loss, acc = loss_sum / n, acc_sum / n
        mx.eval(theta, loss, acc)
        return theta, float(loss), float(acc)

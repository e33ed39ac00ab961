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

Per-layer inner learning rates (``inner_lr_mode="per-layer"``; MAML++'s LSLR, Antoniou et al.
2019, per parameter leaf rather than per step): every leaf of θ gets a learnable log-multiplier
s_leaf (init 0), the inner step becomes θ ← θ − α·exp(s_leaf)·u (u the inner optimizer's update
direction), and s has its own outer Adam (``inner_lr_meta_lr``), clipped to ±``LOG_LR_CLIP``.
Its gradient:

    maml      exact: mx.grad over the unrolled loop with respect to (θ, s)
    fomaml    first order: dL_q/ds_leaf ≈ −Σ_t <g_q(φ), α·exp(s)·u_t>_leaf = −<g_q(φ), Δ>_leaf,
              Δ the total step the optimizer took on the leaf (the dependence of u_t on s dropped)
    reptile   the same first-order hypergradient, from the task's query gradient at φ. A
              heuristic: Reptile's θ update follows φ − θ, not the query loss, so s and θ are
              trained on different objectives (s: query loss after k steps from the current θ).
              It costs one query backward per task, which plain Reptile does not run.

Data parallel (``meta.distributed``): given an ``mx.distributed`` group, ``step`` receives only
this rank's tasks and adds every rank's sums (contributions, losses, accuracies, task counts)
with one ``all_sum`` before dividing by the total task count, whatever the algorithm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from metapeft.errors import UserError
from metapeft.scoring import Batch
from metapeft.train import batch_loss, make_optimizer, scored_hits

ALGORITHMS = ("reptile", "fomaml", "maml")
INNER_LR_MODES = ("shared", "per-layer")
LOG_LR_CLIP = 3.0  # per-leaf multipliers stay within [e^-3, e^3] ≈ [0.05, 20]


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
    inner_lr_mode: str = "shared"  # shared | per-layer (a learned multiplier per parameter leaf)
    inner_lr_meta_lr: float = 0.05  # per-layer: the outer Adam lr of the log-multipliers

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
        if self.inner_lr_mode not in INNER_LR_MODES:
            raise UserError(f"unknown inner lr mode '{self.inner_lr_mode}'; choose one of "
                            f"{', '.join(INNER_LR_MODES)}", field="inner_lr_mode")
        if not self.inner_lr_meta_lr > 0:
            raise UserError("--inner-lr-meta-lr must be positive", field="inner_lr_meta_lr")
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
    """The inner optimizer as an optax-style pair ``(init(params), update(params, grads, state,
    log_lr=None))``. ``log_lr``: per-layer mode's tree of per-leaf log-multipliers s (scalars, θ's
    structure); the step on each leaf is then ``exp(s_leaf)`` times the shared one.

    Adam is written out because mlx.optimizers.Adam divides by ``sqrt(v) + eps``: at a fresh
    LoRA/DoRA/AdaLoRA init (B = 0) some gradients are exactly 0, and the derivative of ``sqrt(v)``
    at v = 0 is infinite, so second-order MAML through it returns NaN. Here ``eps`` sits inside the
    root, ``m / sqrt(v + eps**2)``, which is finite everywhere and equals mlx's update to within
    eps wherever v >> eps**2. Like mlx's Adam (its default), no bias correction.
    """
    lr = cfg.inner_lr

    def scaled(log_lr, params):
        return (tree_map(lambda p: lr, params) if log_lr is None
                else tree_map(lambda s: lr * mx.exp(s), log_lr))

    if cfg.inner_optimizer == "sgd":
        def sgd(params, grads, state, log_lr=None):
            return tree_map(lambda p, g, a: p - a * g, params, grads,
                            scaled(log_lr, params)), None

        return lambda params: None, sgd
    b1, b2, eps2 = 0.9, 0.999, 1e-16

    def init(params):
        return tree_map(mx.zeros_like, params), tree_map(mx.zeros_like, params)

    def update(params, grads, state, log_lr=None):
        m, v = state
        m = tree_map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, grads)
        v = tree_map(lambda v_, g: b2 * v_ + (1 - b2) * mx.square(g), v, grads)
        params = tree_map(lambda p, m_, v_, a: p - a * m_ / mx.sqrt(v_ + eps2), params, m, v,
                          scaled(log_lr, params))
        return params, (m, v)

    return init, update


def _inner_loop(adapter, params: dict, support: Batch, cfg: MetaConfig, log_lr=None,
                track: bool = False):
    """(φ, Δ): the inner loop, and with ``track`` the total step the optimizer took on each leaf,
    Δ = Σ_t α·exp(s)·u_t = θ − φ before the adapter's hook (else None)."""
    grad_fn = mx.grad(partial(batch_loss, adapter, batches=support, objective=cfg.objective))
    init, update = inner_update(cfg)
    opt_state, hook_state = init(params), adapter.init_state(params)
    moved = tree_map(mx.zeros_like, params) if track else None
    for i in range(1, cfg.inner_steps + 1):
        grads = grad_fn(params)
        new, opt_state = update(params, grads, opt_state, log_lr)
        if track:
            moved = tree_map(lambda d, p, n: d + (p - n), moved, params, new)
        params, hook_state = adapter.on_step(new, grads, hook_state, i, cfg.inner_steps)
    return params, moved


def inner_adapt(adapter, params: dict, support: Batch, cfg: MetaConfig, log_lr=None) -> dict:
    """``cfg.inner_steps`` optimizer steps on the support loss, with the adapter's step hook after
    each (so AdaLoRA allocates ranks here as it does in ``adapt``); differentiable end to end and
    free of ``mx.eval``, so it runs under ``mx.vmap``, ``mx.grad`` and ``mx.compile``. ``log_lr``:
    the per-leaf log-multipliers of per-layer mode (None: the shared lr)."""
    return _inner_loop(adapter, params, support, cfg, log_lr)[0]


def lr_hypergradient(query_grads: dict, moved: dict) -> dict:
    """First-order dL_q/ds per leaf: −<g_q(φ), Δ>_leaf, Δ the leaf's total inner step."""
    return tree_map(lambda g, d: -(g * d).sum(), query_grads, moved)


def init_log_lr(theta: dict) -> dict:
    """Per-layer mode's log-multipliers at their start: 0 (×1) for every leaf of θ."""
    return tree_map(lambda p: mx.zeros((), dtype=mx.float32), theta)


def task_contribution(adapter, cfg: MetaConfig, theta: dict, support: Batch, query: Batch,
                      log_lr=None):
    """(query loss after adaptation, query accuracy after adaptation, contribution tree). With
    ``log_lr`` (per-layer mode) the contribution is ``{"theta": ..., "log_lr": dL_q/ds}``."""
    query_loss = partial(batch_loss, adapter, batches=query, objective=cfg.objective)
    if cfg.algorithm == "maml":
        if log_lr is None:
            def outer_loss(th):
                phi = inner_adapt(adapter, th, support, cfg)
                return query_loss(phi), phi

            (loss, phi), grads = mx.value_and_grad(outer_loss)(theta)
        else:  # exact: through the unrolled loop with respect to θ and s
            def outer_loss(th, s):
                phi = inner_adapt(adapter, th, support, cfg, s)
                return query_loss(phi), phi

            (loss, phi), (g_th, g_s) = mx.value_and_grad(outer_loss, argnums=(0, 1))(
                theta, log_lr)
            grads = {"theta": g_th, "log_lr": g_s}
        return loss, query_accuracy(adapter, tree_map(mx.stop_gradient, phi), query), grads
    phi, moved = _inner_loop(adapter, theta, support, cfg, log_lr, track=log_lr is not None)
    phi = tree_map(mx.stop_gradient, phi)
    if log_lr is not None:
        loss, g_q = mx.value_and_grad(query_loss)(phi)
        g_s = lr_hypergradient(g_q, tree_map(mx.stop_gradient, moved))
        contrib = g_q if cfg.algorithm == "fomaml" else tree_map(lambda a, b: a - b, phi, theta)
        return loss, query_accuracy(adapter, phi, query), {"theta": contrib, "log_lr": g_s}
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
    the means are over every rank's tasks, so all ranks return the same θ. In per-layer mode the
    learner also holds the inner lrs' log-multipliers, ``log_lr``, which each step updates.
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
        # per-layer inner lrs: the log-multipliers s (θ's structure, one scalar per leaf) and
        # their own outer Adam; set by init_outer (or a checkpoint), carried across steps here
        self.per_layer = cfg.inner_lr_mode == "per-layer"
        self.log_lr = None
        # bias-corrected, so a consistent hypergradient moves s by about inner_lr_meta_lr a step
        self.lr_outer = (optim.Adam(learning_rate=cfg.inner_lr_meta_lr, bias_correction=True)
                         if self.per_layer else None)
        if self.per_layer:  # one argument, {"theta", "log_lr"}, so vmap and the sums stay alike
            def per_task(state, support, query):
                return task_contribution(adapter, cfg, state["theta"], support, query,
                                         log_lr=state["log_lr"])
        else:
            per_task = partial(task_contribution, adapter, cfg)
        self._per_task = per_task
        vmapped = mx.vmap(per_task, in_axes=(None, 0, 0))

        def batched(theta, support, query):
            loss, acc, contrib = vmapped(theta, support, query)
            return loss.sum(), acc.sum(), tree_map(lambda c: c.sum(axis=0), contrib)

        self._batched = mx.compile(batched) if self.compile else batched

    def init_outer(self, theta: dict, log_lr: dict | None = None) -> None:
        if self.outer is not None:
            self.outer.init(theta)
        if self.per_layer:
            self.log_lr = init_log_lr(theta) if log_lr is None else log_lr
            self.lr_outer.init(self.log_lr)

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
        if self.per_layer and self.log_lr is None:
            self.init_outer(theta)
        arg = {"theta": theta, "log_lr": self.log_lr} if self.per_layer else theta
        loss_sum, acc_sum, contrib_sum, n = 0.0, 0.0, None, 0
        for support, query in groups:
            ls, ac, cs, k = self._group_sums(arg, support, query)
            loss_sum, acc_sum, n = loss_sum + ls, acc_sum + ac, n + k
            contrib_sum = cs if contrib_sum is None else tree_map(lambda a, b: a + b, contrib_sum, cs)
        if self.group is not None and self.group.size() > 1:
            from metapeft.meta.distributed import all_sum_tree

            if contrib_sum is None:  # this rank drew no task of the meta-batch
                contrib_sum = tree_map(mx.zeros_like, arg)
            contrib_sum, loss_sum, acc_sum, n = all_sum_tree(contrib_sum, self.group, loss_sum,
                                                             acc_sum, float(n))
            n = int(n.item())
        mean = tree_map(lambda c: c / n, contrib_sum)
        if self.per_layer:  # s: its own Adam on dL_q/ds, clipped to ±LOG_LR_CLIP
            s = self.lr_outer.apply_gradients(mean["log_lr"], self.log_lr)
            self.log_lr = tree_map(lambda v: mx.clip(v, -LOG_LR_CLIP, LOG_LR_CLIP), s)
            mean = mean["theta"]
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
        mx.eval(theta, loss, acc, *([self.log_lr] if self.per_layer else []))
        return theta, float(loss), float(acc)

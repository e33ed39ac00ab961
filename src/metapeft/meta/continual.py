"""Continual meta-training: continue from a published version on new data without forgetting.

``meta_train(init="NAME@V")`` starts θ at that version (same method, base model and shapes, or a
one-line refusal) and publishes the next version with ``parent: NAME@V`` in its metadata.
Forgetting control (``forgetting``: ewc, replay, both or none; default both with an init):

* **EWC** (Kirkpatrick et al. 2017): a diagonal Fisher of the meta-objective, F_j = mean over the
  validation tasks of (∂L_query(φ)/∂φ_j)², φ = inner_adapt(θ) (first order: φ's dependence on θ
  is dropped, as in FOMAML). Every published version stores its own Fisher (estimated on its
  validation tasks) as extra tensors named ``fisher.<parameter>``, which ``adapter.unflat``
  ignores; a parent without one gets it computed on the fly from its recorded data. The penalty
  is λ·Σ_j F̂_j·(θ_j − θ_parent,j)², with F̂ = F / mean(F) (so λ does not depend on the loss
  scale). FOMAML/MAML add its gradient 2λ·F̂·(θ − θ_parent) to the outer gradient; Reptile,
  whose update θ ← θ + ε_t·mean(φ − θ) treats θ − φ as a gradient, subtracts the same term from
  the Reptile direction, with the per-coordinate pull ε_t·2λ·F̂ capped at 1 so it never moves θ
  past θ_parent. Default λ = ``DEFAULT_EWC_LAMBDA``.
* **Replay**: ``round(replay_fraction · meta_batch)`` (at least 1) of each meta-batch's tasks are
  drawn from the parent's own meta-train source, re-created from the data spec in its metadata
  (``data``, filters, split seed). When that data cannot be found here, replay is dropped with a
  note, and EWC is used instead.

Every continued version records ``forgetting`` (on the parent's validation tasks: accuracy after
k steps from the parent minus from the new version, each adapted at its own ``adapt_lr``; > 0
means forgotten) and ``gain`` (on the new data's validation tasks: new minus parent).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from metapeft.errors import UserError

FORGETTING = ("ewc", "replay", "both", "none")
DEFAULT_EWC_LAMBDA = 1.0
DEFAULT_REPLAY_FRACTION = 0.25
DEFAULT_STEPS = 5  # k: the adaptation steps at which forgetting and gain are measured
FISHER_PREFIX = "fisher."


def split_fisher(arrays: dict) -> tuple[dict, dict | None]:
    """(the parameters, the stored ``fisher.*`` tensors by parameter name, or None)."""
    params = {k: v for k, v in arrays.items() if not k.startswith(FISHER_PREFIX)}
    fisher = {k[len(FISHER_PREFIX):]: v for k, v in arrays.items()
              if k.startswith(FISHER_PREFIX)}
    return params, fisher or None


def fisher_arrays(fisher: dict) -> dict:
    """A Fisher tree as the extra tensors stored with a version."""
    return {FISHER_PREFIX + k: v for k, v in tree_flatten(fisher)}


def diagonal_fisher(adapter, cfg, theta: dict, episodes: list, group=None) -> dict:
    """Mean over ``episodes`` (encoded, prepared) of the squared query-loss gradient after the
    inner loop, first order. Split over a distributed ``group``; every rank gets the same tree."""
    from functools import partial

    from metapeft.meta import distributed as dist
    from metapeft.meta.learner import inner_adapt
    from metapeft.train import batch_loss

    total, n = None, 0
    for i in dist.mine(len(episodes), group):
        e = episodes[i]
        phi = tree_map(mx.stop_gradient, inner_adapt(adapter, theta, e.support, cfg))
        g = mx.grad(partial(batch_loss, adapter, batches=e.query, objective=cfg.objective))(phi)
        sq = tree_map(mx.square, g)
        total = sq if total is None else tree_map(lambda a, b: a + b, total, sq)
        mx.eval(total)
        n += 1
    if total is None:
        total = tree_map(mx.zeros_like, theta)
    if dist.size_of(group) > 1:
        total, n = dist.all_sum_tree(total, group, float(n))
        n = int(n.item())
    fisher = tree_map(lambda t: t / max(n, 1), total)
    mx.eval(fisher)
    return fisher


@dataclass
class Anchor:
    """EWC's pull toward θ_parent: ``fisher`` is F̂ (mean 1), ``lam`` λ."""

    theta: dict
    fisher: dict
    lam: float

    @classmethod
    def make(cls, theta: dict, fisher: dict, lam: float) -> "Anchor":
        leaves = [v for _, v in tree_flatten(fisher)]
        total = sum(float(v.sum().item()) for v in leaves)
        count = sum(v.size for v in leaves)
        mean = total / count if count else 0.0
        if not math.isfinite(mean) or mean <= 0:  # no signal: a plain L2 pull
            norm = tree_map(mx.ones_like, fisher)
        else:
            norm = tree_map(lambda f: f / mean, fisher)
        return cls(theta=theta, fisher=norm, lam=float(lam))

    def gradient(self, theta: dict) -> dict:
        """∇ of λ·Σ F̂·(θ − θ_parent)²."""
        return tree_map(lambda th, p, f: 2.0 * self.lam * f * (th - p), theta, self.theta,
                        self.fisher)

    def pull(self, theta: dict, eps: float) -> dict:
        """Reptile: ε·2λF̂ per coordinate, capped at 1, times (θ − θ_parent)."""
        return tree_map(lambda th, p, f: mx.minimum(eps * 2.0 * self.lam * f, 1.0) * (th - p),
                        theta, self.theta, self.fisher)

    def penalty(self, theta: dict) -> float:
        return float(sum(float((f * mx.square(th - p)).sum().item()) for (_, th), (_, p), (_, f)
                         in zip(tree_flatten(theta), tree_flatten(self.theta),
                                tree_flatten(self.fisher))) * self.lam)


@dataclass
class Parent:
    """A published version to continue from."""

    spec: str  # NAME@V
    path: str
    meta: dict
    theta: dict
    fisher: dict | None  # the stored Fisher tree, or None
    adapt_lr: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def data_spec(self) -> dict:
        return _json(self.meta.get("data")) or {}

    @property
    def hyper(self) -> dict:
        return _json(self.meta.get("hyperparameters")) or {}


def _json(value) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def parent_header(spec: str, registry=None) -> tuple[str, Path, dict]:
    from metapeft.artifacts import read_metadata
    from metapeft.registry import parse_spec, resolve

    name, _ = parse_spec(spec)
    path = resolve(spec, registry)
    version = int(path.stem.lstrip("v"))
    return f"{name}@{version}", path, read_metadata(path)


def load_parent(spec: str, adapter, registry=None) -> Parent:
    """Version ``spec`` as θ for ``adapter``; a one-line ``UserError`` (field ``init``) when its
    method, base model or parameter shapes differ."""
    from metapeft.artifacts import load_safetensors
    from metapeft.drift import stored_lr

    label, path, _ = parent_header(spec, registry)
    arrays, meta = load_safetensors(path)
    if meta.get("kind") not in (None, "meta-weights"):
        raise UserError(f"{label} is not meta-weights (kind {meta.get('kind')!r})",
                        path=str(path), field="init")
    params, fisher = split_fisher(arrays)
    try:
        theta = adapter.check_compatible(adapter.unflat(params), meta, str(path))
        want = {k: v.shape for k, v in tree_flatten(adapter.init_params(0))}
        bad = [k for k, v in tree_flatten(theta) if k in want and v.shape != want[k]]
        if bad:
            raise UserError(f"init parameter {bad[0]} has shape {dict(tree_flatten(theta))[bad[0]].shape}, "
                            f"this adapter's is {want[bad[0]]}", path=str(path), field="parameters")
    except UserError as e:
        raise UserError(f"cannot continue from {label}: {e.message}", path=str(path),
                        field="init") from None
    fisher_tree = tree_unflatten(list(fisher.items())) if fisher else None
    return Parent(spec=label, path=str(path), meta=meta, theta=theta, fisher=fisher_tree,
                  adapt_lr=stored_lr(meta))


def parent_sources(parent: Parent, *, ways: int, shots: int, query: int):
    """The parent's meta-train and validation sources re-created from its recorded data spec, or
    (None, why) when its data is not reachable from here."""
    from metapeft.meta.sources import SYNTHETIC, build_meta_sources

    spec = parent.data_spec
    data = spec.get("data")
    if not data:
        return None, f"{parent.spec} records no training data"
    if str(data) != SYNTHETIC and not Path(data).exists():
        return None, f"{parent.spec}'s training data {data} is not reachable from here"
    n_train = int(spec.get("num_train_classes") or 0)
    since = None
    if spec.get("since"):  # a feedback log filtered with --since/--days: the same rows
        from datetime import datetime

        since = datetime.fromisoformat(spec["since"])
    try:
        src = build_meta_sources(
            data, ways=min(ways, n_train) if n_train >= 2 else int(spec.get("ways") or ways),
            shots=shots, query=query, domains=spec.get("domains"),
            exclude_domains=spec.get("exclude_domains"), labels_from=spec.get("labels_from"),
            exclude_labels=spec.get("exclude_labels"),
            val_fraction=float(spec.get("val_fraction", 0.2)),
            task_strategy=spec.get("task_strategy"), since=since,
            seed=int(parent.hyper.get("seed", 0)))
    except UserError as e:
        return None, f"{parent.spec}'s training data could not be re-created: {e.message}"
    return src, None


def measure(adapter, new_theta: dict, new_lr: float, parent: Parent, default_lr: float,
            tasks: list, steps: int) -> dict | None:
    """Mean accuracy after ``steps`` steps on ``tasks``: the new θ (at ``new_lr``) and the
    parent's (at its ``adapt_lr``), via ``drift.compare``."""
    from metapeft.drift import Contender, compare

    if not tasks:
        return None
    new = Contender(label="new", adapter=adapter, params=new_theta, lr=new_lr, lr_from="")
    old = Contender(label=parent.spec, adapter=adapter, params=parent.theta,
                    lr=parent.adapt_lr or default_lr, lr_from="")
    r = compare(new, old, tasks, steps=steps)
    return {"tasks": r.num_tasks, "steps": steps, "accuracy_new": r.accuracy_new["mean"],
            "accuracy_parent": r.accuracy_old["mean"], "delta": r.delta}

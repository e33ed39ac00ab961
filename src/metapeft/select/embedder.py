"""The task-embedding network: normalised task features -> a 16-d embedding (a small MLX MLP).

Training signal (metric learning on performance profiles). Experience records are grouped into
tasks; each task has a *profile*: its mean query accuracy per method. The target distance between
two tasks is

    d_p(i, j) = RMS over shared methods of (centred profile_i - centred profile_j)
                + 0.5 * |mean accuracy_i - mean accuracy_j|

(the centred part says "the methods rank alike", the second "equally hard"), rescaled to mean 1,
plus ``DOMAIN_WEIGHT`` (3.0) when the two tasks come from different domains: with the small,
noisy experience sets we have, profiles alone grouped only 60% of tasks with a same-domain
nearest neighbour, and the domain term raises that to 100% (80% for a domain the embedder never
saw) at no cost in selection regret (benchmarks/select_eval.py).
The embedder minimises the mean squared difference between the pairwise Euclidean distances of the
embeddings and d_p, so nearby embeddings mean tasks that respond alike to the methods.

Feature normalisation: counts and lengths (``LOG_FEATURES``) go through log1p, then every feature
is standardised with a mean and std computed on the training tasks; both are stored in the
safetensors header next to the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metapeft.errors import UserError
from metapeft.select.features import FEATURE_NAMES

EMBED_DIM = 16
HIDDEN = 64
DOMAIN_WEIGHT = 3.0  # measured: see benchmarks/select_eval.py (retrieval 60% -> 100% in-domain)
LOG_FEATURES = {"n_support", "n_query", "shots_mean", "shots_min", "num_classes", "imbalance",
                "mean_tokens", "max_tokens", "vocab_size"}


# ----------------------------------------------------------------------------- the task table

@dataclass
class TaskRow:
    """All records of one task: mean accuracy per method and the best config per method."""

    key: str
    name: str
    domain: str
    features: np.ndarray
    accuracy: dict[str, float] = field(default_factory=dict)
    best_hp: dict[str, dict] = field(default_factory=dict)
    record_ids: dict[str, str] = field(default_factory=dict)  # method -> best record's id

    @property
    def best_method(self) -> str | None:
        return max(self.accuracy, key=self.accuracy.get) if self.accuracy else None

    @property
    def id(self) -> str:
        bm = self.best_method
        return self.record_ids.get(bm, "") if bm else ""


def task_table(records) -> list[TaskRow]:
    """Group experience records into tasks (same name, domain and features).

    A method's accuracy on a task is the mean of its runs from its own init (init source fresh,
    or unknown for records written before it was kept): runs started from a meta-init or the
    adapter library (``sweep --init-sources``) measure the init as much as the method, so they
    count only where a (task, method) has no run from its own init."""
    from metapeft.experience import init_source_of

    rows: dict[str, TaskRow] = {}
    sums: dict[tuple[str, str], list[float]] = {}
    own: dict[tuple[str, str], list[float]] = {}
    best: dict[tuple[str, str], float] = {}
    for r in records:
        f = np.asarray(r.features, np.float64)
        key = f"{r.task}|{r.domain}|" + ",".join(f"{v:.4g}" for v in f)
        row = rows.get(key)
        if row is None:
            row = rows[key] = TaskRow(key=key, name=r.task, domain=r.domain, features=f)
        sums.setdefault((key, r.method), []).append(r.final_accuracy)
        if init_source_of(r) in (None, "fresh"):
            own.setdefault((key, r.method), []).append(r.final_accuracy)
        if r.final_accuracy > best.get((key, r.method), -1.0):
            best[(key, r.method)] = r.final_accuracy
            row.best_hp[r.method] = dict(r.hyperparameters)
            row.record_ids[r.method] = r.id
    for (key, m), accs in sums.items():
        rows[key].accuracy[m] = float(np.mean(own.get((key, m)) or accs))
    return list(rows.values())


def profile_matrix(rows: list[TaskRow], methods: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy (T, M) with NaN for unobserved, mask (T, M))."""
    a = np.full((len(rows), len(methods)), np.nan)
    for i, r in enumerate(rows):
        for j, m in enumerate(methods):
            if m in r.accuracy:
                a[i, j] = r.accuracy[m]
    return a, ~np.isnan(a)


def profile_distances(acc: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The target distance matrix d_p (see the module docstring), unscaled."""
    a = np.where(mask, acc, 0.0)
    cnt = mask.sum(1, keepdims=True).clip(min=1)
    mean = a.sum(1, keepdims=True) / cnt
    c = np.where(mask, a - mean, 0.0)
    both = mask[:, None, :] & mask[None, :, :]
    diff2 = ((c[:, None, :] - c[None, :, :]) ** 2) * both
    rms = np.sqrt(diff2.sum(-1) / both.sum(-1).clip(min=1))
    return rms + 0.5 * np.abs(mean - mean.T)


# ----------------------------------------------------------------------------- normalisation

def _prelog(x: np.ndarray) -> np.ndarray:
    x = np.array(x, np.float64, copy=True)
    for j, n in enumerate(FEATURE_NAMES):
        if n in LOG_FEATURES:
            x[..., j] = np.log1p(np.maximum(x[..., j], 0.0))
    return x


def fit_normaliser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = _prelog(x)
    mean, std = z.mean(0), z.std(0)
    return mean, np.where(std < 1e-6, 1.0, std)


def normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return np.clip((_prelog(x) - mean) / std, -6.0, 6.0)


# ----------------------------------------------------------------------------- the network

def _mlp(n_in: int, hidden: int, n_out: int, seed: int):
    import mlx.core as mx
    import mlx.nn as nn

    mx.random.seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def _pairwise(e):
    import mlx.core as mx

    d2 = mx.sum((e[:, None, :] - e[None, :, :]) ** 2, axis=-1)
    return mx.sqrt(d2 + 1e-8)


class TaskEmbedder:
    """Normaliser + MLP; ``embed`` maps raw feature vectors (N, F) to embeddings (N, dim)."""

    def __init__(self, net, mean: np.ndarray, std: np.ndarray, dim: int = EMBED_DIM,
                 hidden: int = HIDDEN, info: dict | None = None):
        self.net, self.mean, self.std, self.dim, self.hidden = net, mean, std, dim, hidden
        self.info = info or {}

    def embed(self, features) -> np.ndarray:
        import mlx.core as mx

        x = np.atleast_2d(np.asarray(features, np.float64))
        z = normalise(x, self.mean, self.std).astype(np.float32)
        out = self.net(mx.array(z))
        mx.eval(out)
        return np.asarray(out, np.float64)

    def save(self, path: str | Path) -> Path:
        from mlx.utils import tree_flatten

        from metapeft import __version__
        from metapeft.artifacts import save_safetensors

        arrays = dict(tree_flatten(self.net.parameters()))
        meta = {"format": "metapeft-task-embedder", "feature_names": list(FEATURE_NAMES),
                "log_features": sorted(LOG_FEATURES), "mean": self.mean.tolist(),
                "std": self.std.tolist(), "dim": self.dim, "hidden": self.hidden,
                "metapeft_version": __version__, **{k: v for k, v in self.info.items()}}
        return save_safetensors(path, arrays, meta)

    @classmethod
    def load(cls, path: str | Path) -> "TaskEmbedder":
        from mlx.utils import tree_unflatten

        from metapeft.artifacts import json_field, load_safetensors

        arrays, meta = load_safetensors(path)
        if meta.get("format") != "metapeft-task-embedder":
            raise UserError("not a metapeft task embedder", path=str(path), field="format")
        if json_field(meta, "feature_names") != list(FEATURE_NAMES):
            raise UserError("embedder was trained on a different feature set; retrain it with "
                            "`metapeft train-selector`", path=str(path), field="feature_names")
        dim, hidden = int(json_field(meta, "dim")), int(json_field(meta, "hidden"))
        net = _mlp(len(FEATURE_NAMES), hidden, dim, 0)
        try:
            net.update(tree_unflatten(list(arrays.items())))
        except Exception as e:
            raise UserError(f"embedder weights do not fit: {e}", path=str(path)) from None
        info = {k: json_field(meta, k) for k in ("num_tasks", "final_loss") if k in meta}
        return cls(net, np.asarray(json_field(meta, "mean")), np.asarray(json_field(meta, "std")),
                   dim, hidden, info)


def train_embedder(rows: list[TaskRow], methods: list[str], *, dim: int = EMBED_DIM,
                   hidden: int = HIDDEN, epochs: int = 300, lr: float = 1e-2, seed: int = 0,
                   domain_weight: float | None = None,
                   max_pairs_tasks: int = 1500) -> TaskEmbedder:
    """Fit the embedder on a task table (at least 2 tasks).

    ``domain_weight`` adds that much (in units of the mean profile distance) to the target
    distance of two tasks from different domains, so tasks of a domain cluster (None:
    ``DOMAIN_WEIGHT``)."""
    if domain_weight is None:
        domain_weight = DOMAIN_WEIGHT
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    if len(rows) < 2:
        raise UserError("training the task embedder needs at least 2 tasks in the experience "
                        "store", field="experience")
    x = np.stack([r.features for r in rows])
    mean, std = fit_normaliser(x)
    z = normalise(x, mean, std).astype(np.float32)
    acc, mask = profile_matrix(rows, methods)
    dp = profile_distances(acc, mask)
    scale = dp[np.triu_indices(len(rows), 1)].mean()
    dp = dp / (scale if scale > 1e-8 else 1.0)
    if domain_weight:
        doms = np.array([r.domain for r in rows])
        dp = dp + domain_weight * (doms[:, None] != doms[None, :])
    rng = np.random.default_rng(seed)
    net = _mlp(z.shape[1], hidden, dim, seed)
    opt = optim.Adam(learning_rate=lr)

    def loss_fn(model, xb, db):
        return mx.mean((_pairwise(model(xb)) - db) ** 2)

    step = nn.value_and_grad(net, loss_fn)
    loss = mx.array(0.0)
    n = len(rows)
    for _ in range(epochs):
        idx = rng.choice(n, size=min(n, max_pairs_tasks), replace=False) if n > max_pairs_tasks \
            else np.arange(n)
        loss, grads = step(net, mx.array(z[idx]), mx.array(dp[np.ix_(idx, idx)].astype(np.float32)))
        opt.update(net, grads)
        mx.eval(net.parameters(), opt.state, loss)
    return TaskEmbedder(net, mean, std, dim, hidden,
                        {"num_tasks": n, "final_loss": float(loss.item()),
                         "distance_scale": float(scale), "domain_weight": domain_weight})


def nearest(query: np.ndarray, reference: np.ndarray, k: int = 5,
            exclude: int | None = None) -> list[tuple[int, float]]:
    """The ``k`` rows of ``reference`` (N, dim) closest to ``query`` (dim,): [(index, distance)],
    nearest first; ``exclude`` skips one index (leave-one-out)."""
    if len(reference) == 0:
        return []
    d = np.sqrt(((np.asarray(reference) - np.asarray(query)[None, :]) ** 2).sum(-1))
    if exclude is not None:
        d = d.copy()
        d[exclude] = np.inf
    order = np.argsort(d, kind="stable")[:k]
    return [(int(i), float(d[i])) for i in order if math.isfinite(d[i])]

"""Pareto utilities: non-dominated set, 2-D hypervolume, knee point, ParEGO scalarisation.

``senses`` gives one of ``"max"`` / ``"min"`` per objective. Everything is plain numpy.

ParEGO (Knowles 2006), as the study uses it: before every suggestion a weight vector λ is drawn
uniformly on the simplex (``simplex_weights``), every observation so far is normalised to [0, 1]
per objective (0 = best observed, 1 = worst; ``normalise``) and scalarised with the augmented
Chebyshev function ``max_j λ_j z_j + 0.05 Σ_j λ_j z_j`` (``chebyshev``); ``scalarise`` does both,
and places failed points (NaN rows) at the nadir.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

RHO = 0.05  # ParEGO's augmentation weight (Knowles 2006)


def _as_min(points, senses: Sequence[str]) -> np.ndarray:
    """Points turned into a minimisation problem (max objectives negated)."""
    p = np.asarray(points, dtype=np.float64).reshape(len(points), -1) if len(points) else \
        np.zeros((0, len(senses)))
    if p.shape[1] != len(senses):
        raise ValueError(f"points have {p.shape[1]} objectives, senses {len(senses)}")
    for s in senses:
        if s not in ("max", "min"):
            raise ValueError(f"sense must be 'max' or 'min', got {s!r}")
    sign = np.array([-1.0 if s == "max" else 1.0 for s in senses])
    return p * sign


def dominates(a, b, senses: Sequence[str]) -> bool:
    """True when ``a`` is at least as good as ``b`` everywhere and better somewhere."""
    m = _as_min([a, b], senses)
    return bool(np.all(m[0] <= m[1]) and np.any(m[0] < m[1]))


def non_dominated(points, senses: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (rows with a NaN are never on the front).

    Exact duplicates of a front point are all kept (none dominates another).
    """
    m = _as_min(points, senses)
    ok = np.all(np.isfinite(m), axis=1)
    idx = [i for i in range(len(m)) if ok[i]]
    front = []
    for i in idx:
        dominated = False
        for j in idx:
            if j != i and np.all(m[j] <= m[i]) and np.any(m[j] < m[i]):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def hypervolume_2d(points, senses: Sequence[str], ref: Sequence[float]) -> float:
    """Area dominated by ``points`` and bounded by the reference point ``ref`` (in the original
    units; for a max objective ``ref`` is a lower bound, for a min objective an upper bound).
    Points that do not strictly improve on ``ref`` in both objectives contribute nothing."""
    if len(senses) != 2:
        raise ValueError("hypervolume_2d needs exactly two objectives")
    m = _as_min(points, senses)
    r = _as_min([ref], senses)[0]
    m = m[np.all(np.isfinite(m), axis=1)] if len(m) else m
    m = m[np.all(m < r, axis=1)] if len(m) else m
    if len(m) == 0:
        return 0.0
    m = m[np.lexsort((m[:, 1], m[:, 0]))]  # by first objective, then second
    # simple sweep: walk points by x; the covered height between consecutive x is r1 - min y so far
    hv, cur_min = 0.0, math.inf
    xs = list(m[:, 0]) + [r[0]]
    for k in range(len(m)):
        cur_min = min(cur_min, m[k, 1])
        width = xs[k + 1] - xs[k]
        if width > 0:
            hv += width * (r[1] - cur_min)
    return float(hv)


def normalise(points, senses: Sequence[str], lo=None, hi=None) -> np.ndarray:
    """Minimisation-form points scaled to [0, 1] per objective (0 = best observed).

    ``lo``/``hi`` (in minimisation form) default to the finite rows' min/max; a constant
    objective maps to 0.
    """
    m = _as_min(points, senses)
    fin = m[np.all(np.isfinite(m), axis=1)] if len(m) else m
    if lo is None:
        lo = fin.min(axis=0) if len(fin) else np.zeros(m.shape[1])
    if hi is None:
        hi = fin.max(axis=0) if len(fin) else np.ones(m.shape[1])
    span = np.where(np.asarray(hi) - np.asarray(lo) > 0, np.asarray(hi) - np.asarray(lo), 1.0)
    return (m - lo) / span


def knee_point(points, senses: Sequence[str], front: list[int] | None = None) -> int | None:
    """Index of the front point closest (Euclidean) to the ideal point after normalising each
    objective over the front to [0, 1]. None when there is no finite point."""
    front = non_dominated(points, senses) if front is None else list(front)
    if not front:
        return None
    sub = np.asarray(points, dtype=np.float64)[front]
    z = normalise(sub, senses)
    d = np.sqrt((z ** 2).sum(axis=1))
    return front[int(np.argmin(d))]


def chebyshev(z, weights, rho: float = RHO) -> np.ndarray:
    """ParEGO's augmented Chebyshev scalarisation of normalised minimisation vectors ``z``:
    ``max_j w_j z_j + rho * sum_j w_j z_j`` (one value per row)."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    w = np.asarray(weights, dtype=np.float64)
    wz = z * w
    return wz.max(axis=1) + rho * wz.sum(axis=1)


def simplex_weights(k: int, rng: np.random.Generator) -> np.ndarray:
    """Weights drawn uniformly on the (k-1)-simplex (Dirichlet(1, ..., 1))."""
    if k == 1:
        return np.ones(1)
    return rng.dirichlet(np.ones(k))


def scalarise(points, senses: Sequence[str], weights) -> np.ndarray:
    """The values told to the optimiser (smaller is better) for ``points`` (NaN rows = failed).

    One objective: the minimisation form (a "max" objective in [0, 1], i.e. accuracy, becomes
    ``1 - value``); a failed point gets the worst finite value (at least 1.0 for a "max"
    objective, 1.0 when there is none). Several: ParEGO's augmented Chebyshev of the points
    normalised over the finite rows, failed rows at the nadir (1, ..., 1).
    """
    points = np.asarray(points, dtype=np.float64)
    finite = np.all(np.isfinite(points), axis=1) if len(points) else np.zeros(0, bool)
    if len(senses) == 1:
        y = points[:, 0].copy()
        if senses[0] == "max":
            y = 1.0 - y
        worst = float(np.max(y[finite])) if finite.any() else 1.0
        y[~finite] = max(worst, 1.0) if senses[0] == "max" else worst
        return y
    z = normalise(points, senses)
    z[~finite] = 1.0
    return chebyshev(z, weights)

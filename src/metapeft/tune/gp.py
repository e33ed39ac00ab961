"""The one Bayesian optimiser of metapeft: scikit-optimize's ``Optimizer(base_estimator="GP")``
with a Latin-hypercube initial design, driven by ask/tell. ``Study`` (``metapeft tune``) builds its
optimiser here, and ``minimize`` runs the same optimiser over a plain box of reals for callers
whose objective is a number, not a training run (the LoRA composition weights of
``adapt --init library:compose``).
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Sequence


def gp_optimizer(dimensions, *, acq_func: str = "EI", n_initial: int = 5, seed: int = 0):
    """A fresh skopt GP optimiser over ``dimensions`` (skopt dimensions or (low, high) pairs)."""
    from skopt import Optimizer

    return Optimizer(list(dimensions), base_estimator="GP", acq_func=acq_func,
                     n_initial_points=n_initial, initial_point_generator="lhs",
                     random_state=int(seed))


def minimize(objective: Callable[[list[float]], float], bounds: Sequence[tuple[float, float]],
             *, trials: int, x0: Sequence[Sequence[float]] = (), seed: int = 0,
             n_initial: int | None = None, acq_func: str = "EI") -> dict:
    """Minimise ``objective`` over the box ``bounds`` in ``trials`` evaluations: the points of
    ``x0`` first (clipped into the box; warm starts), then skopt's suggestions (its initial design
    until ``n_initial`` points are known, then GP + ``acq_func``). Returns {"x", "y" (the best),
    "xs", "ys" (every evaluation, in order), "seconds"}."""
    t0 = time.perf_counter()
    lo = [float(b[0]) for b in bounds]
    hi = [float(b[1]) for b in bounds]
    n_init = max(1, min(trials, n_initial if n_initial is not None else max(3, len(bounds))))
    opt = gp_optimizer([(a, b) for a, b in zip(lo, hi)], acq_func=acq_func, n_initial=n_init,
                       seed=seed)
    import numpy as np

    rng = np.random.default_rng(seed)
    xs: list[list[float]] = []
    ys: list[float] = []
    queue = [[min(max(float(v), a), b) for v, a, b in zip(p, lo, hi)] for p in x0]
    while len(xs) < trials:
        if queue:
            x = queue.pop(0)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = [float(v) for v in opt.ask()]
        if x in xs:  # a repeated point teaches the GP nothing: a seeded random one instead
            x = [float(v) for v in rng.uniform(lo, hi)]
        y = float(objective(x))
        xs.append(x)
        ys.append(y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.tell(x, y if y == y and abs(y) != float("inf") else max(
                [v for v in ys if v == v and abs(v) != float("inf")] or [1e6]))
    i = min(range(len(ys)), key=lambda j: (ys[j] != ys[j], ys[j]))
    return {"x": xs[i], "y": ys[i], "xs": xs, "ys": ys,
            "seconds": time.perf_counter() - t0}

"""``metapeft tune``: Bayesian (skopt GP) hyperparameter search with ParEGO Pareto fronts.

- ``space``: configs/search_spaces.yaml -> skopt dimensions (``load_space``);
- ``search``: the study (ask/tell, ParEGO scalarisation, warm start, persistence, ``tune``);
- ``pareto``: non-dominated sets, 2-D hypervolume, knee point, Chebyshev scalarisation.

Importing this package is cheap; skopt and MLX load inside the functions that need them.
"""

from metapeft.tune.pareto import hypervolume_2d, knee_point, non_dominated

__all__ = ["hypervolume_2d", "knee_point", "non_dominated", "tune", "warm_start_points",
           "load_space", "Study"]


def __getattr__(name):
    if name in ("tune", "warm_start_points", "Study"):
        from metapeft.tune import search

        return getattr(search, name)
    if name == "load_space":
        from metapeft.tune.space import load_space

        return load_space
    raise AttributeError(name)

"""``metapeft tune``: Bayesian (skopt GP) hyperparameter search with ParEGO Pareto fronts.

One module per job:

- ``space``: configs/search_spaces.yaml -> skopt dimensions (``load_space``);
- ``pareto``: non-dominated sets, 2-D hypervolume, knee point, ParEGO scalarisation;
- ``study``: a study's settings and trials, its ask/tell loop and its file (``Study``);
- ``warm_start``: seed points from similar past tasks (the selector's similarity search);
- ``search``: the evaluator (``adapt`` per trial) and ``tune()``;
- ``plot``: the front and the best-so-far curve as a PNG.

Importing this package is cheap; skopt and MLX load inside the functions that need them.
"""

from metapeft.tune.pareto import hypervolume_2d, knee_point, non_dominated, scalarise

# public name -> the submodule it lives in (imported on first use)
_LAZY = {"tune": "search", "adapt_evaluator": "search", "TuneResult": "search",
         "Study": "study", "study_path": "study", "warm_start_points": "warm_start",
         "load_space": "space", "plot_study": "plot"}

__all__ = ["hypervolume_2d", "knee_point", "non_dominated", "scalarise", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"metapeft.tune.{_LAZY[name]}"), name)
    raise AttributeError(name)

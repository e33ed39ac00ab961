"""Method selection: task features, a task-embedding network and an ensemble selector.

- ``features``: ``task_features(task, base)`` with the fixed ``FEATURE_NAMES`` order;
- ``embedder``: an MLX MLP from normalised features to a 16-d embedding trained so that
  embedding distances track distances between per-method performance profiles;
- ``selector``: an ensemble of 5 MLX MLPs predicting each method's accuracy, P(best), a ranking
  and hyperparameters from the nearest past tasks (priors when there is no experience).

Submodules import MLX lazily; importing this package is cheap.
"""

from metapeft.select.features import FEATURE_NAMES, task_domain, task_features

__all__ = ["FEATURE_NAMES", "task_domain", "task_features"]

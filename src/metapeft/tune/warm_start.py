"""Warm start of a study: the configurations that did best on the most similar past tasks.

Similarity is the selector's. The experience store's records are grouped into tasks
(``select.embedder.task_table``, as the selector groups them) and the tasks are ranked with
``select.embedder.nearest`` in the space of the trained task embedder
(``<registry root>/selector/embedder.safetensors``, written by ``metapeft train-selector``), where
nearby tasks are tasks on which the methods performed alike. Only when there is no trained
embedder (none saved yet, or one trained on another feature set) does the ranking fall back to
plain distance between the tasks' feature vectors, normalised as the embedder normalises its input
(log1p of counts and lengths, z-scored over the stored tasks): similar inputs, not similar
behaviour. Every point says which was used (``"similarity": "embedder"`` or ``"features"``).

Only records of plain adaptations count (every source but ``meta-train``, whose settings belong
to a meta-learner), and of those only the learning rate and the options of the record's method
(its ``Config``): anything else would fail the trial as an unknown option.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from metapeft.errors import UserError

NOT_WARM_SOURCES = ("meta-train",)  # experience sources whose settings are not an adapt config


def experience_path(registry=None) -> Path:
    """The experience store of ``registry`` (default: the registry root's)."""
    from metapeft.registry import registry_root

    return registry_root(registry) / "experience.safetensors"


def embedder_path(registry=None) -> Path:
    """Where ``metapeft train-selector`` saves the task embedder by default."""
    from metapeft.registry import registry_root

    return registry_root(registry) / "selector" / "embedder.safetensors"


def task_feature_vector(task, base) -> list[float] | None:
    """The task's feature vector (``select.features``), or None when it cannot be computed."""
    from metapeft.select.features import feature_vector, task_features

    try:
        return feature_vector(task_features(task, base))
    except Exception:  # features are a nicety for warm start, never a reason to fail a study
        return None


def _options(method: str, hyperparameters: dict | None) -> dict:
    """The learning rate and ``method``'s Config options among a record's hyperparameters."""
    from metapeft.adapters import get_adapter_class

    known = {"lr", *get_adapter_class(method).Config.defaults()}
    return {k: v for k, v in (hyperparameters or {}).items() if k in known}


def similarity_space(query, features: np.ndarray, registry=None
                     ) -> tuple[np.ndarray, np.ndarray, str]:
    """(query vector, reference rows, "embedder" | "features"): the task embedder's space when a
    trained embedder is saved, else the embedder's feature normalisation fitted on ``features``."""
    from metapeft.select.embedder import TaskEmbedder, fit_normaliser, normalise

    path = embedder_path(registry)
    if path.exists():
        try:
            emb = TaskEmbedder.load(path)
            return emb.embed([query])[0], emb.embed(features), "embedder"
        except UserError:  # trained on another feature set, or not an embedder: fall back
            pass
    mean, std = fit_normaliser(features)
    return normalise(np.asarray([query]), mean, std)[0], normalise(features, mean, std), "features"


def warm_start_points(task, methods: list[str], k: int = 3, *, base=None, registry=None,
                      features: list[float] | None = None) -> list[dict]:
    """Seed configurations from the experience store, or [] when there is none.

    Returns ``[{"method", "params": {lr, option: value}, "source": "warm", "task", "distance",
    "similarity", ["objectives": {"accuracy", "seconds", "memory_mb"}]}]``: for each of the ``k``
    past tasks nearest to ``task`` (see the module docstring), the best-accuracy configuration of
    every study method it ran. Records of this very task (same name and features) come first,
    every one of them, with their measured ``objectives`` (told to the GP, not re-run).
    """
    from metapeft.experience import ExperienceStore
    from metapeft.select.embedder import nearest, task_table

    if k <= 0:
        return []
    try:
        store = ExperienceStore(experience_path(registry))
        if not store.exists():
            return []
        records = [r for r in store.load() if r.method in methods
                   and r.source not in NOT_WARM_SOURCES and math.isfinite(r.final_accuracy)]
        if not records:
            return []
        if features is None:
            features = task_feature_vector(task, base)
        if features is None:
            return []
        name = getattr(task, "name", None)

        def this_task(task_name, feats) -> bool:
            return task_name == name and np.allclose(feats, features, rtol=1e-4, atol=1e-6)

        rows = task_table(records)
        query, ref, how = similarity_space(features, np.stack([r.features for r in rows]),
                                           registry)
        out: list[dict] = []
        for r in records:  # every measured config of this task is a free observation
            if this_task(r.task, r.features):
                out.append({"method": r.method, "params": _options(r.method, r.hyperparameters),
                            "source": "warm", "task": r.task, "distance": 0.0,
                            "similarity": how,
                            "objectives": {"accuracy": float(r.final_accuracy),
                                           "seconds": float(r.seconds),
                                           "memory_mb": float(r.peak_memory_mb)}})
        others = [(i, d) for i, d in nearest(query, ref, len(rows))
                  if not this_task(rows[i].name, rows[i].features)][:k]
        for i, d in others:
            for m in methods:
                if m in rows[i].best_hp:
                    out.append({"method": m, "params": _options(m, rows[i].best_hp[m]),
                                "source": "warm", "task": rows[i].name,
                                "distance": round(d, 4), "similarity": how})
        return out
    except Exception:  # a broken or foreign store must not stop a study
        return []

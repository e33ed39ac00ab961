"""Where meta-training tasks come from: ``build_meta_sources`` turns ``meta-train --data`` into a
train source, a validation source and a description of the split.

A source is anything with ``sample(seed) -> Task`` (and ``classes``, ``name``):
``data.episodes.EpisodeSource`` (N-way K-shot episodes from a pool), ``FixedTasks`` (ready-made
tasks) and ``MixtureSource`` (a uniform mixture of sources, one per feedback group).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, NamedTuple

from metapeft.errors import UserError

SYNTHETIC = "synthetic"


class MixtureSource:
    """Episodes from several sources: each draw picks a source uniformly, then an episode."""

    def __init__(self, sources: list, name: str = "mixture"):
        if not sources:
            raise UserError("no usable tasks for meta-training", field="data")
        self.sources, self.name = sources, name
        self.classes = sorted({c for s in sources for c in getattr(s, "classes", [])})

    def sample(self, seed: int):
        return self.sources[random.Random(seed).randrange(len(self.sources))].sample(seed)


class FixedTasks:
    """A list of ready-made tasks (a directory of task folders, or small feedback groups)."""

    def __init__(self, tasks: list, name: str = "tasks"):
        self.tasks, self.name = tasks, name
        self.classes = sorted({lab for t in tasks for lab in t.labels})

    def sample(self, seed: int):
        return self.tasks[random.Random(seed).randrange(len(self.tasks))]


class MetaSources(NamedTuple):
    """What ``build_meta_sources`` returns. A named tuple, so ``train, val, spec, report = ...``
    still unpacks."""

    train: Any  # the meta-train source
    validation: Any | None  # held-out classes/tasks/groups, or None
    spec: dict  # the data options and the split (train/validation classes, tasks or groups)
    extraction_report: dict | None  # feedback logs: what ``extract_tasks`` kept and dropped

    @property
    def num_train_classes(self) -> int:
        return self.spec.get("num_train_classes", 0)

    @property
    def num_validation(self) -> int:
        """Validation classes, tasks or feedback groups, whichever the data has."""
        spec = self.spec
        return len(spec.get("val_classes", spec.get("groups_val", spec.get("tasks_val", []))) or [])


def synthetic_pool(per_label: int = 40, seed: int = 0) -> list:
    """Every synthetic family's pool, with ``domain`` = family (the embedded meta-train data)."""
    from metapeft.data.synthetic import FAMILIES, generate_pool

    return [e for fam in FAMILIES if fam != "topic_long" for e in generate_pool(fam, seed, per_label)]


def _feedback_sources(data, spec: dict, *, ways, shots, query, val_fraction, task_strategy,
                      min_samples, replay, seed, text_field, label_field, since=None):
    from metapeft.data.feedback import extract_tasks, filter_since, read_feedback

    rows = read_feedback(data, text_field, label_field)
    if since is not None:
        total = len(rows)
        rows, undated = filter_since(rows, since)
        spec["since"] = since.isoformat()
        spec["rows_since"] = {"kept": len(rows), "of": total, "undated": undated}
        if not rows:
            raise UserError(f"no feedback row has a timestamp at or after {since.isoformat()} "
                            f"({total} rows, {undated} without a timestamp)", path=str(data),
                            field="since")
    groups, report = extract_tasks(rows, task_strategy, min_samples)
    if not groups:
        raise UserError(f"no group has more than {min_samples} rows and 2 labels",
                        path=str(data), field="min_samples")
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(groups) * val_fraction)) if len(groups) > 2 else 0

    def to_src(g):
        try:
            return g.to_source(ways, shots, query, replay)
        except UserError:  # too small for episodes: a fixed support/query split
            return FixedTasks([g.split(0.5, seed)], g.name)

    val = [to_src(groups[i]) for i in order[:n_val]]
    train = [to_src(groups[i]) for i in order[n_val:]]
    spec["groups_train"] = [groups[i].name for i in order[n_val:]]
    spec["groups_val"] = [groups[i].name for i in order[:n_val]]
    return (MixtureSource(train, "feedback"),
            MixtureSource(val, "feedback-val") if val else None, report)


def _pool_sources(data, spec: dict, *, ways, shots, query, domains, exclude_domains, labels_from,
                  exclude_labels, val_fraction, val_domains, replay, seed, text_field,
                  label_field):
    from metapeft.data import (EpisodeSource, filter_pool, read_rows, replay_weights,
                               split_classes, split_classes_by_domain)

    if str(data) == SYNTHETIC:
        pool = synthetic_pool()
    else:
        pool = read_rows(data, text_field=text_field, label_field=label_field)
    pool = filter_pool(pool, domains=domains, exclude_domains=exclude_domains,
                       labels_from=labels_from, exclude_labels=exclude_labels)
    labels = sorted({e.label for e in pool})
    if val_domains:
        train_labels, val_labels = split_classes_by_domain(pool, val_domains)
    else:
        train_labels, val_labels = split_classes(labels, val_fraction, seed)
    weights = None
    if replay is not None and any("rating" in e.extra for e in pool):
        weights = replay_weights(pool, replay)
    if ways > len(train_labels):  # refused, never capped: a capped run is not the one asked for
        held = (f", {len(val_labels)} held out by "
                f"{'--val-domains' if val_domains else '--val-fraction'}" if val_labels else "")
        raise UserError(f"--ways {ways} but only {len(train_labels)} meta-train classes are "
                        f"available ({len(labels)} labels{held})", path=str(data), field="ways")
    # validation episodes use every held-out class when there are fewer than --ways of them
    tr = EpisodeSource(pool, train_labels, ways=ways, shots=shots,
                       query=query, weights=weights, name=str(data))
    va = (EpisodeSource(pool, val_labels, ways=min(ways, len(val_labels)), shots=shots,
                        query=query, name=f"{data} (validation classes)")
          if val_labels else None)
    spec["train_classes"], spec["val_classes"] = train_labels, val_labels
    return tr, va


def _task_dir_sources(data, spec: dict, *, ways, shots, query, val_fraction, seed, text_field,
                      label_field):
    from metapeft.data import load_task

    entries = sorted(p for p in Path(data).iterdir()
                     if p.is_dir() or p.suffix.lower() in (".jsonl", ".csv"))
    tasks = [load_task(p, shots=shots if p.is_file() else None,
                       query=query if p.is_file() else None, ways=ways if p.is_file() else None,
                       seed=seed, text_field=text_field, label_field=label_field)
             for p in entries]
    if len(tasks) < 2:
        raise UserError("a task directory needs at least 2 tasks", path=str(data))
    n_val = max(1, int(round(len(tasks) * val_fraction))) if val_fraction > 0 else 0
    spec["tasks_train"] = [t.name for t in tasks[n_val:]]
    spec["tasks_val"] = [t.name for t in tasks[:n_val]]
    return (FixedTasks(tasks[n_val:], str(data)),
            FixedTasks(tasks[:n_val], f"{data} (validation tasks)") if n_val else None)


def build_meta_sources(data: str | Path = SYNTHETIC, *, ways: int = 5, shots: int = 5,
                       query: int = 15, domains=None, exclude_domains=None, labels_from=None,
                       exclude_labels=None, val_fraction: float = 0.2, val_domains=None,
                       task_strategy: str | None = None, min_samples: int = 20, replay=None,
                       seed: int = 0, text_field: str = "text",
                       label_field: str = "label", since=None) -> MetaSources:
    """The meta-train and validation sources for ``data``.

    ``data`` is ``synthetic`` (the embedded families), a labelled pool file (episodes; classes
    split into meta-train and validation classes, disjoint), a directory of task folders/files,
    or with ``task_strategy`` a feedback log (project/intent/temporal/mixed groups); ``since`` (a
    datetime) keeps only the log's rows whose ``timestamp`` is at or after it (rows without one
    are dropped), and is refused for other data. ``val_domains`` (a pool only) holds those
    domains' classes out whole as the validation classes, instead of ``val_fraction`` of the
    classes drawn from every domain (``data.split_classes_by_domain``).
    """
    val_domains = list(val_domains) if val_domains else None
    if val_domains and (task_strategy is not None
                        or (str(data) != SYNTHETIC and not Path(data).is_file())):
        raise UserError("--val-domains holds out a labelled pool's domains: it needs a pool "
                        "file or 'synthetic', not a task directory or a feedback log",
                        field="val_domains")
    if val_domains and exclude_domains and set(val_domains) & set(exclude_domains):
        raise UserError(f"domain(s) {sorted(set(val_domains) & set(exclude_domains))} are both "
                        f"excluded and validation domains", field="val_domains")
    if since is not None and task_strategy is None:
        raise UserError("--since/--days filter a feedback log by its timestamp field: give "
                        "--task-strategy too (a pool or task directory has no timestamps)",
                        field="since")
    spec = {"data": str(data), "ways": ways, "shots": shots, "query": query,
            "domains": domains, "exclude_domains": exclude_domains,
            "exclude_labels": exclude_labels, "labels_from": labels_from,
            "val_fraction": val_fraction, "task_strategy": task_strategy}
    if val_domains:  # only when given, so that older checkpoints' specs still match on resume
        spec["val_domains"] = val_domains
    fields = {"ways": ways, "shots": shots, "query": query, "val_fraction": val_fraction,
              "seed": seed, "text_field": text_field, "label_field": label_field}
    report = None
    if task_strategy is not None:
        tr, va, report = _feedback_sources(data, spec, task_strategy=task_strategy,
                                           min_samples=min_samples, replay=replay,
                                           since=since, **fields)
    elif str(data) == SYNTHETIC or Path(data).is_file():
        tr, va = _pool_sources(data, spec, domains=domains, exclude_domains=exclude_domains,
                               labels_from=labels_from, exclude_labels=exclude_labels,
                               val_domains=val_domains, replay=replay, **fields)
    elif Path(data).is_dir():
        tr, va = _task_dir_sources(data, spec, **fields)
    else:
        raise UserError("meta-train data does not exist (a pool file, a task directory, or "
                        "'synthetic')", path=str(data), field="data")
    spec["num_train_classes"] = len(getattr(tr, "classes", []))
    return MetaSources(tr, va, spec, report)

"""Episodes: the one N-way K-shot sampler, and everything that draws few-shot tasks with it.

Every task metapeft draws from a pool goes through two steps:

``choose_classes(rng, classes, ways) -> list[str]``
    ``ways`` of ``classes`` without replacement, sorted (all of them, sorted, when ``ways`` is
    ``None``).

``draw_examples(rng, by_label, chosen, sizes, *, shuffle=None, weights=None) -> list[list]``
    For each chosen class, ``sum(sizes)`` of its examples without replacement, cut into one part
    per size (support, query[, test]); then each part whose ``shuffle`` flag is set (default: all)
    is shuffled. ``weights`` (numpy only) maps a class to the sampling probabilities of its
    examples.

Both take either RNG, ``random.Random`` or ``numpy.random.Generator``: ``sample_episode`` (and so
``load_task`` on a pool file and the sweeps) and benchmarks/hpo_eval.py use the former,
``EpisodeSource`` (meta-training, quickstart, the benchmarks) the latter. Each keeps the exact
draws it had before the samplers were merged, so a seed gives the same task as in the README's
benchmarks; tests/test_episodes.py pins them.

Built on it
-----------
``sample_episode(pool, *, ways, shots, query, seed, source="pool", labels=None) -> Task``
    A stratified episode with ``query`` examples per class, drawn with ``random.Random(seed)``
    from the classes ``labels`` (all of the pool's when ``None``).

``EpisodeSource(pool, labels=None, ways=None, shots=5, query=10, weights=None, name="pool")``
    A sampler of stratified N-way K-shot episodes over ``pool`` restricted to ``labels`` (all
    labels of the pool when ``None``; ``ways=None`` means every label in each episode).
    ``.classes`` is the sorted label list. ``.sample(seed) -> Task`` picks ``ways`` classes, then
    ``shots`` support and ``query`` query examples from each class; the same seed always gives the
    same episode. If ``weights`` is given (one non-negative number per example, aligned with
    ``pool``, or a callable such as ``feedback.ReplayWeights`` that maps the pool's examples to
    such an array) the examples within each chosen class are drawn by weighted sampling without
    replacement (``numpy.random.Generator.choice(p=..., replace=False)``); classes are always
    chosen uniformly. Construction raises ``UserError`` when a label is not in the pool, when
    ``ways`` is below 2 or above the number of labels, when a label has fewer than
    ``shots + query`` examples (or, with weights, fewer than that many examples of positive
    weight) -- naming the label -- or when the weights are malformed.

``split_classes(labels, val_fraction, seed) -> (train_labels, val_labels)``
    Deterministic (in ``seed``) split of the distinct labels into two disjoint sorted lists.
    ``val_fraction`` must be in ``[0, 1)``; the validation side gets ``round(n * val_fraction)``
    labels, but at least 2 whenever ``val_fraction > 0``, and the training side always keeps at
    least 2. With ``val_fraction > 0`` and fewer than 4 distinct labels this is impossible and
    raises ``UserError``. ``val_fraction == 0`` returns ``(all labels, [])``.

``sample_sweep_tasks(data, n, ...) -> list[Task]``
    ``n`` diverse tasks for a sweep (shots log-uniform, ways uniform), from the synthetic families
    or a pool file.

``load_task(path, *, shots=None, query=None, ways=None, seed=0, ...) -> Task``
    A task directory as it is (``tasks.read_task_dir``), or an episode drawn from a pool file.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from metapeft.data.synthetic import FAMILIES, family_labels, generate_task
from metapeft.data.tasks import Example, Task, check_classes, read_rows, read_task_dir
from metapeft.errors import UserError

__all__ = [
    "EpisodeSource",
    "choose_classes",
    "draw_examples",
    "group_by_label",
    "load_task",
    "sample_episode",
    "sample_sweep_tasks",
    "split_classes",
    "weight_array",
]


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


class _PyDraws:
    """Draws with ``random.Random``: ``sample`` and an in-place ``shuffle``."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def sample(self, items: Sequence, k: int, p=None) -> list:
        if p is not None:
            raise ValueError("weighted draws need a numpy Generator")
        return self.rng.sample(items, k)

    def shuffle(self, items: list) -> list:
        self.rng.shuffle(items)
        return items


class _NpDraws:
    """Draws with ``numpy.random.Generator``: ``choice`` without replacement, ``permutation``."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def sample(self, items: Sequence, k: int, p=None) -> list:
        return [items[int(i)] for i in self.rng.choice(len(items), size=k, replace=False, p=p)]

    def shuffle(self, items: list) -> list:
        return [items[int(i)] for i in self.rng.permutation(len(items))]


def _draws(rng) -> _PyDraws | _NpDraws:
    return _NpDraws(rng) if isinstance(rng, np.random.Generator) else _PyDraws(rng)


def choose_classes(rng, classes: Sequence[str], ways: int | None) -> list[str]:
    """``ways`` of ``classes`` drawn without replacement, sorted (all, sorted, for ``None``)."""
    if ways is None:
        return sorted(classes)
    return sorted(_draws(rng).sample(list(classes), ways))


def draw_examples(rng, by_label: Mapping[str, Sequence], chosen: Sequence[str],
                  sizes: Sequence[int], *, shuffle: Sequence[bool] | None = None,
                  weights: Mapping[str, np.ndarray] | None = None) -> list[list]:
    """``sum(sizes)`` examples of each chosen class, cut into one part per size, class by class;
    the parts flagged in ``shuffle`` (default: all) are then shuffled, in order."""
    draws = _draws(rng)
    need = sum(sizes)
    parts: list[list] = [[] for _ in sizes]
    for c in chosen:
        picked = draws.sample(by_label[c], need, None if weights is None else weights[c])
        start = 0
        for part, n in zip(parts, sizes):
            part.extend(picked[start:start + n])
            start += n
    flags = [True] * len(sizes) if shuffle is None else list(shuffle)
    return [draws.shuffle(part) if flag else part for part, flag in zip(parts, flags)]


def group_by_label(examples: Iterable[Example]) -> dict[str, list[Example]]:
    """The examples of each label, in their original order."""
    by_label: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_label[e.label].append(e)
    return dict(by_label)


def _check_ways(ways: int, available: int, source: str, field: str) -> None:
    if ways < 2:
        raise UserError("--ways must be at least 2", field="ways")
    if ways > available:
        raise UserError(f"--ways {ways} but only {available} labels are available", path=source,
                        field=field)


def _check_counts(counts: Mapping[str, int], labels: Iterable[str], shots: int, query: int,
                  source: str, what: str = "examples") -> None:
    need = shots + query
    for label in labels:
        have = counts.get(label, 0)
        if have < need:
            raise UserError(f"label '{label}' has {have} {what}, needs {need} for --shots {shots} "
                            f"--query {query}", path=source, field="label")


def sample_episode(pool: list[Example], *, ways: int | None, shots: int, query: int, seed: int,
                   source: str = "pool", labels: list[str] | None = None) -> Task:
    """Draw a stratified N-way K-shot episode with ``query`` examples per class."""
    if shots < 1:
        raise UserError(f"--shots must be at least 1, got {shots}", field="shots")
    if query < 0:
        raise UserError(f"--query must be non-negative, got {query}", field="query")
    by_label = group_by_label(pool)
    rng = random.Random(seed)
    available = sorted(by_label) if labels is None else list(labels)
    if len(available) < 2:
        raise UserError(f"a task needs at least 2 classes, found {len(available)}", path=source,
                        field="label")
    if ways is not None:
        _check_ways(ways, len(available), source, field="label")
    chosen = choose_classes(rng, available, ways)
    _check_counts({c: len(v) for c, v in by_label.items()}, chosen, shots, query, source)
    support, query_set = draw_examples(rng, by_label, chosen, (shots, query))
    return Task(name=f"{Path(source).stem}-{len(chosen)}w{shots}s-seed{seed}", support=support,
                query=query_set, labels=chosen,
                meta={"source": source, "ways": len(chosen), "shots": shots, "query": query,
                      "seed": seed})


# --------------------------------------------------------------------------------------------
# Episode sources
# --------------------------------------------------------------------------------------------


def weight_array(weights, examples: Sequence[Example], name: str = "pool") -> np.ndarray | None:
    """``weights`` as one finite non-negative float64 per example (``None`` stays ``None``); a
    callable (``feedback.ReplayWeights``) is applied to ``examples`` first."""
    if weights is None:
        return None
    if callable(weights):
        weights = weights(examples)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(examples),):
        raise UserError(f"got {w.size} weights for {len(examples)} examples", path=name,
                        field="weights")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise UserError("weights must be finite and non-negative", path=name, field="weights")
    return w


class EpisodeSource:
    """Stratified N-way K-shot episodes over a pool restricted to a label set (see module doc)."""

    def __init__(self, pool: Sequence[Example], labels: Iterable[str] | None = None,
                 ways: int | None = None, shots: int = 5, query: int = 10, weights=None,
                 name: str = "pool"):
        self.pool = list(pool)
        self.name = name
        self.shots = int(shots)
        self.query = int(query)
        if self.shots < 1:
            raise UserError("--shots must be at least 1", field="shots")
        if self.query < 0:
            raise UserError("--query must be non-negative", field="query")
        index: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(self.pool):
            index[e.label].append(i)
        if labels is None:
            classes = sorted(index)
        else:
            classes = sorted({str(x) for x in labels})
            missing = [c for c in classes if c not in index]
            if missing:
                raise UserError(f"labels {missing} have no examples in {name}", path=name,
                                field="label")
        if len(classes) < 2:
            raise UserError(f"an episode source needs at least 2 classes, found {len(classes)}",
                            path=name, field="label")
        ways = len(classes) if ways is None else int(ways)
        _check_ways(ways, len(classes), name, field="ways")
        self.ways = ways
        self.classes = classes
        self.weights = weight_array(weights, self.pool, name)
        if self.weights is None:
            _check_counts({c: len(index[c]) for c in classes}, classes, self.shots, self.query,
                          name)
            self._p = None
        else:
            w = {c: self.weights[index[c]] for c in classes}
            _check_counts({c: int(np.count_nonzero(w[c])) for c in classes}, classes, self.shots,
                          self.query, name, what="examples with non-zero weight")
            self._p = {c: w[c] / w[c].sum() for c in classes}
        self._by_label = {c: [self.pool[i] for i in index[c]] for c in classes}

    def __len__(self) -> int:
        return len(self.pool)

    def __repr__(self) -> str:
        return (f"EpisodeSource({self.name!r}, {len(self.classes)} classes, {len(self.pool)} "
                f"examples, {self.ways}w{self.shots}s{self.query}q, "
                f"weighted={self.weights is not None})")

    def sample(self, seed: int) -> Task:
        """One episode; the same seed always gives the same episode."""
        rng = np.random.default_rng(seed)
        chosen = choose_classes(rng, self.classes, self.ways)
        support, query_set = draw_examples(rng, self._by_label, chosen, (self.shots, self.query),
                                           weights=self._p)
        return Task(name=f"{Path(self.name).stem}-{len(chosen)}w{self.shots}s-seed{seed}",
                    support=support, query=query_set, labels=chosen,
                    meta={"source": self.name, "ways": len(chosen), "shots": self.shots,
                          "query": self.query, "seed": seed,
                          "weighted": self.weights is not None})


def split_classes(labels: Iterable[str], val_fraction: float,
                  seed: int = 0) -> tuple[list[str], list[str]]:
    """Split distinct labels into disjoint (train, val) lists, deterministic in ``seed``."""
    distinct = sorted({str(x) for x in labels})
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise UserError(f"val fraction must be in [0, 1), got {val_fraction!r}",
                        field="val_fraction")
    if val_fraction == 0:
        return distinct, []
    n = len(distinct)
    if n < 4:
        raise UserError(f"splitting classes needs at least 4 labels (2 train + 2 validation), "
                        f"found {n}", field="label")
    n_val = min(max(2, round(n * val_fraction)), n - 2)
    order = list(distinct)
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])


# --------------------------------------------------------------------------------------------
# Sweep tasks
# --------------------------------------------------------------------------------------------


def _log_uniform_int(rng: random.Random, lo: int, hi: int) -> int:
    if hi <= lo:
        return max(lo, hi)
    return max(lo, min(hi, int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))))


def sample_sweep_tasks(data: str | Path, n: int, *, seed: int = 0, min_shots: int = 1,
                       max_shots: int = 50, min_ways: int = 2, max_ways: int = 20, query: int = 5,
                       domains: list[str] | None = None, text_field: str = "text",
                       label_field: str = "label") -> list[Task]:
    """``n`` diverse tasks for a sweep: shots log-uniform in [min_shots, max_shots], ways uniform in
    [min_ways, max_ways], both capped by what the source holds (labels; examples per label minus
    ``query``).

    ``data`` is ``synthetic`` (each task from a uniformly drawn synthetic family; ``domain`` =
    family) or a pool JSONL/CSV; with a ``domain`` field each task comes from one domain drawn
    uniformly (CLINC150: 10 domains of 15 intents). ``domains`` restricts the families/domains.
    """
    rng = random.Random(f"sweep:{seed}")
    tasks = []
    if str(data) == "synthetic":
        fams = [f for f in FAMILIES if domains is None or f in domains]
        if not fams:
            raise UserError(f"no synthetic family among {domains}", field="domains")
        for i in range(n):
            fam = rng.choice(fams)
            ways = rng.randint(min_ways, max(min_ways, min(max_ways, len(family_labels(fam)))))
            shots = _log_uniform_int(rng, min_shots, max_shots)
            t = generate_task(rng.randrange(2**31), family=fam, ways=ways, shots=shots, query=query)
            t.name = f"{fam}-{ways}w{shots}s-{seed}.{i}"
            t.meta["domain"] = fam
            tasks.append(t)
        return tasks
    path = Path(data)
    pool = read_rows(path, text_field=text_field, label_field=label_field)
    by_dom: dict[str, list] = {}
    for e in pool:
        by_dom.setdefault(str(e.extra.get("domain") or path.stem), []).append(e)
    if domains is not None:
        by_dom = {d: v for d, v in by_dom.items() if d in domains}
    usable = {}
    for d, rows in sorted(by_dom.items()):
        counts: dict[str, int] = {}
        for e in rows:
            counts[e.label] = counts.get(e.label, 0) + 1
        if sum(c > query + min_shots for c in counts.values()) >= 2:
            usable[d] = (rows, counts)
    if not usable:
        raise UserError(f"no domain has 2 labels with more than {query + min_shots} examples",
                        path=str(path), field="domain")
    names = sorted(usable)
    for i in range(n):
        d = rng.choice(names)
        rows, counts = usable[d]
        ok = sorted(lab for lab, c in counts.items() if c > query + min_shots)
        ways = rng.randint(min_ways, max(min_ways, min(max_ways, len(ok))))
        labels = sorted(rng.sample(ok, ways))
        cap = min(counts[lab] for lab in labels) - query
        shots = _log_uniform_int(rng, min_shots, min(max_shots, cap))
        t = sample_episode([e for e in rows if e.label in set(labels)], ways=None, shots=shots,
                           query=query, seed=rng.randrange(2**31), source=str(path),
                           labels=labels)
        t.name = f"{d}-{ways}w{shots}s-{seed}.{i}"
        t.meta["domain"] = d
        tasks.append(t)
    return tasks


# --------------------------------------------------------------------------------------------
# Loading a task
# --------------------------------------------------------------------------------------------


def load_task(path: str | Path, *, shots: int | None = None, query: int | None = None,
              ways: int | None = None, seed: int = 0, text_field: str = "text",
              label_field: str = "label") -> Task:
    """Load a task from an mlx-lm style directory or draw an episode from a single file."""
    path = Path(path)
    if not path.exists():
        raise UserError("task path does not exist", path=str(path))
    if path.is_dir():
        given = [f"--{k}" for k, v in (("shots", shots), ("query", query), ("ways", ways))
                 if v is not None]
        if given:  # refused, not ignored: the run would not be the one asked for
            raise UserError(f"{'/'.join(given)} draw an episode from a single file; a task "
                            "directory is used as it is (train.jsonl is the support set, "
                            "valid.jsonl or test.jsonl the query set)", path=str(path),
                            field=given[0][2:])
        return read_task_dir(path, text_field=text_field, label_field=label_field)
    pool = read_rows(path, text_field=text_field, label_field=label_field)
    check_classes(pool, path)
    if shots is None:
        raise UserError("a single-file task needs --shots (and --query) to draw an episode",
                        path=str(path), field="shots")
    return sample_episode(pool, ways=ways, shots=shots, query=query if query is not None else 10,
                          seed=seed, source=str(path))

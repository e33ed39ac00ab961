"""Episode pools, class splits, feedback-log task extraction and replay weights.

Everything here is pure Python/numpy and raises ``UserError`` (naming file, line and field where
known) for anything the user can fix.

Class filters for episode pools
-------------------------------
``filter_pool(pool, *, domains=None, exclude_domains=None, labels_from=None,
exclude_labels=None, domain_field="domain") -> list[Example]``
    Keeps the examples of ``pool`` that pass every given filter, in their original order:

    * ``domains`` -- keep only examples whose ``Example.extra[domain_field]`` is one of these;
    * ``exclude_domains`` -- drop examples whose domain is one of these;
    * ``labels_from`` -- a path: either a plain text file listing labels one per line (blank
      lines and lines starting with ``#`` are ignored) or a JSONL/CSV pool (``.jsonl``, ``.json``,
      ``.csv``, or any file whose first non-blank line starts with ``{``) whose labels are taken;
      keep only examples with one of those labels;
    * ``exclude_labels`` -- drop examples with one of these label names.

    A domain name (in ``domains`` or ``exclude_domains``) that no example carries raises
    ``UserError`` listing the available domains (field ``domain_field``); so does asking for
    domains when no example has a ``domain_field`` column. An empty result raises ``UserError``.

``split_classes(labels, val_fraction, seed) -> (train_labels, val_labels)``
    Deterministic (in ``seed``) split of the distinct labels into two disjoint sorted lists.
    ``val_fraction`` must be in ``[0, 1)``; the validation side gets ``round(n * val_fraction)``
    labels, but at least 2 whenever ``val_fraction > 0``, and the training side always keeps at
    least 2. With ``val_fraction > 0`` and fewer than 4 distinct labels this is impossible and
    raises ``UserError``. ``val_fraction == 0`` returns ``(all labels, [])``.

``class_overlap(a, b) -> set[str]``
    The labels two collections share. Each side may be an iterable of label strings or of
    ``Example`` objects (their labels are used), e.g. ``class_overlap(train_pool, val_pool)``.

Episode sources
---------------
``EpisodeSource(pool, labels=None, ways=None, shots=5, query=10, weights=None, name="pool")``
    A sampler of stratified N-way K-shot episodes over ``pool`` restricted to ``labels`` (all
    labels of the pool when ``None``; ``ways=None`` means every label in each episode).
    ``.classes`` is the sorted label list. ``.sample(seed) -> Task`` picks ``ways`` classes, then
    ``shots`` support and ``query`` query examples from each class; the same seed always gives the
    same episode. If ``weights`` is given (one non-negative number per example, aligned with
    ``pool``, or a ``ReplayWeights`` that is turned into such an array with ``replay_weights``)
    the examples within each chosen class are drawn by weighted sampling without replacement
    (``numpy.random.Generator.choice(p=..., replace=False)``); classes are always chosen
    uniformly. Construction raises ``UserError`` when a label is not in the pool, when ``ways`` is
    below 2 or above the number of labels, when a label has fewer than ``shots + query`` examples
    (or, with weights, fewer than that many examples of positive weight) -- naming the label -- or
    when the weights are malformed.

Feedback-log task extraction
----------------------------
A feedback log is JSONL (or CSV) with rows ``{text, label, project, intent, timestamp, rating}``.

``read_feedback(path, text_field="text", label_field="label") -> list[Example]``
    ``read_rows`` plus bookkeeping: every example's ``extra`` also holds ``"_path"`` and
    ``"_line"`` (the 1-based source line), so later errors can point at the offending row.

``extract_tasks(rows, strategy, min_samples=20, *, project_field="project",
intent_field="intent", timestamp_field="timestamp") -> (list[TaskGroup], dict)``
    ``rows`` is a list of ``Example`` (or a path, read with ``read_feedback``). ``strategy`` is

    * ``"project"`` -- one group per distinct project value;
    * ``"intent"`` -- one group per distinct intent value;
    * ``"temporal"`` -- one group per ISO week of the timestamp, named like ``2024-W07``.
      Timestamps may be ISO 8601 strings (``2024-02-13``, ``2024-02-13T10:00:00Z``, with or
      without an offset; naive times are taken as UTC) or unix seconds (int/float, or a numeric
      string as CSV gives). Anything else raises ``UserError`` with field ``timestamp`` and, when
      known, the file and line;
    * ``"mixed"`` -- the three above concatenated, names prefixed ``project:``, ``intent:`` and
      ``week:``.

    Single strategies use the bare value as the group name. Rows lacking the grouping field
    (absent, null or empty) are not assigned to a group and are counted in
    ``report["unassigned"]``. A group with ``min_samples`` rows **or fewer** is dropped, as is a
    group with fewer than 2 distinct labels. Groups are sorted by name (ISO weeks sort
    chronologically). The report is::

        {"strategy": ..., "rows": <input rows>, "min_samples": ...,
         "kept": [{"name", "size", "num_labels"}, ...],
         "dropped": [{"name", "size", "num_labels", "reason"}, ...],
         "unassigned": {<field>: <rows without it>, ...}}

    ``format_report(report) -> str`` renders it as human-readable lines.

``TaskGroup(name, examples, labels, kind, key)``
    ``labels`` is the sorted distinct labels; ``kind`` is ``"project"``, ``"intent"`` or
    ``"week"``; ``key`` the raw group value. ``.to_source(ways, shots, query, weights=None)
    -> EpisodeSource`` restricts to the labels with at least ``shots + query``
    examples and caps ``ways`` at their count (``UserError`` if fewer than 2 such labels; use
    ``.split`` then). ``.split(query_fraction=0.5, seed=0) -> Task`` is a stratified
    support/query split of all the group's rows, for groups too small for episodes: each label
    with n >= 2 rows puts ``round(n * query_fraction)`` of them (clamped to 1..n-1) into the query
    set; a label with one row goes to support only.

Replay-buffer weights
---------------------
``ReplayWeights(failed=3.0, positive=1.0, other_negative=0.5, neutral=1.0)``
    A dataclass of non-negative finite weights per rating category. ``.category(rating)`` and
    ``.weight_of(rating)``: rating ``== -1`` -> ``failed``; ``> 0`` -> ``positive``; any other
    negative -> ``other_negative``; ``0``, ``None``, an empty string or a missing rating ->
    ``neutral``. Numbers and numeric strings are accepted; anything else (including booleans
    and NaN) raises ``UserError`` with field ``rating``.

``replay_weights(examples, rw=ReplayWeights(), rating_field="rating") -> np.ndarray``
    One float64 weight per example, read from ``Example.extra[rating_field]``; errors name the
    row's file and line when the examples came from ``read_feedback``.

``replay_stats(examples, rw=ReplayWeights(), rating_field="rating") -> dict``
    ``{"examples": n, "total_weight": w, "counts": {cat: n}, "weights": {cat: per-example
    weight}, "shares": {cat: sum of weights in cat / total weight}}`` over the four categories
    (shares are 0 when the total weight is 0).
"""

from __future__ import annotations

import csv
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from metapeft.data.tasks import Example, Task, _decode, read_rows
from metapeft.errors import UserError

__all__ = [
    "CATEGORIES",
    "STRATEGIES",
    "EpisodeSource",
    "ReplayWeights",
    "TaskGroup",
    "class_overlap",
    "extract_tasks",
    "filter_pool",
    "format_report",
    "read_feedback",
    "read_label_list",
    "replay_stats",
    "replay_weights",
    "split_classes",
]

STRATEGIES = ("project", "intent", "temporal", "mixed")
CATEGORIES = ("failed", "positive", "other_negative", "neutral")


def _where(e: Example) -> dict:
    return {"path": e.extra.get("_path"), "line": e.extra.get("_line")}


# --------------------------------------------------------------------------------------------
# Class filters
# --------------------------------------------------------------------------------------------


def _looks_like_pool(path: Path, lines: list[str]) -> bool:
    if path.suffix.lower() in (".jsonl", ".json", ".csv"):
        return True
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    return first.startswith("{")


def read_label_list(path: str | Path) -> list[str]:
    """Labels named by ``path``: a one-per-line list or a JSONL/CSV pool (sorted, distinct)."""
    path = Path(path)
    if path.is_dir():
        raise UserError("is a directory, expected a label list or a pool file", path=str(path))
    lines = _decode(path)
    if _looks_like_pool(path, lines):
        # read_rows treats every non-.csv suffix as JSONL.
        labels = {e.label for e in read_rows(path)}
    else:
        labels = {ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")}
    if not labels:
        raise UserError("lists no labels", path=str(path))
    return sorted(labels)


def _domain_of(e: Example, domain_field: str):
    value = e.extra.get(domain_field)
    return None if value is None else str(value)


def filter_pool(pool: Sequence[Example], *, domains: Iterable[str] | None = None,
                exclude_domains: Iterable[str] | None = None,
                labels_from: str | Path | None = None,
                exclude_labels: Iterable[str] | None = None,
                domain_field: str = "domain") -> list[Example]:
    """Keep the examples of ``pool`` that pass the domain and label filters (see module doc)."""
    pool = list(pool)
    domains = None if domains is None else [str(d) for d in domains]
    exclude_domains = None if exclude_domains is None else [str(d) for d in exclude_domains]
    if domains is not None or exclude_domains is not None:
        seen = (_domain_of(e, domain_field) for e in pool)
        available = sorted({d for d in seen if d is not None})
        if not available:
            raise UserError(f"no example has a '{domain_field}' column to filter domains on",
                            field=domain_field)
        asked = (domains or []) + (exclude_domains or [])
        unknown = sorted({d for d in asked if d not in set(available)})
        if unknown:
            raise UserError(f"unknown domain(s) {unknown}; available domains: {available}",
                            field=domain_field)
    keep_labels = None if labels_from is None else set(read_label_list(labels_from))
    drop_labels = set() if exclude_labels is None else {str(x).strip() for x in exclude_labels}
    keep_domains = None if domains is None else set(domains)
    drop_domains = set() if exclude_domains is None else set(exclude_domains)
    out = []
    for e in pool:
        d = _domain_of(e, domain_field)
        if keep_domains is not None and d not in keep_domains:
            continue
        if d is not None and d in drop_domains:
            continue
        if keep_labels is not None and e.label not in keep_labels:
            continue
        if e.label in drop_labels:
            continue
        out.append(e)
    if not out:
        raise UserError("no examples are left after the domain/label filters", field="label")
    return out


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


def _label_set(x) -> set[str]:
    return {e.label if isinstance(e, Example) else str(e) for e in x}


def class_overlap(a: Iterable, b: Iterable) -> set[str]:
    """Labels shared by ``a`` and ``b`` (each labels or ``Example`` objects)."""
    return _label_set(a) & _label_set(b)


# --------------------------------------------------------------------------------------------
# Episode sources
# --------------------------------------------------------------------------------------------


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
        by_label: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(self.pool):
            by_label[e.label].append(i)
        if labels is None:
            classes = sorted(by_label)
        else:
            classes = sorted({str(x) for x in labels})
            missing = [c for c in classes if c not in by_label]
            if missing:
                raise UserError(f"labels {missing} have no examples in {name}", path=name,
                                field="label")
        if len(classes) < 2:
            raise UserError(f"an episode source needs at least 2 classes, found {len(classes)}",
                            path=name, field="label")
        if ways is None:
            ways = len(classes)
        ways = int(ways)
        if ways < 2:
            raise UserError("--ways must be at least 2", field="ways")
        if ways > len(classes):
            raise UserError(f"--ways {ways} but only {len(classes)} labels are available",
                            path=name, field="ways")
        self.ways = ways
        self.classes = classes
        self._index = {c: np.asarray(by_label[c], dtype=np.int64) for c in classes}

        if isinstance(weights, ReplayWeights):
            weights = replay_weights(self.pool, weights)
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(self.pool),):
                raise UserError(f"got {w.size} weights for {len(self.pool)} examples",
                                path=name, field="weights")
            if not np.all(np.isfinite(w)) or np.any(w < 0):
                raise UserError("weights must be finite and non-negative", path=name,
                                field="weights")
            self.weights = w
        else:
            self.weights = None

        need = self.shots + self.query
        for c in classes:
            idx = self._index[c]
            have = len(idx) if self.weights is None else int(np.count_nonzero(self.weights[idx]))
            if have < need:
                what = "examples" if self.weights is None else "examples with non-zero weight"
                raise UserError(f"label '{c}' has {have} {what}, needs {need} for --shots "
                                f"{self.shots} --query {self.query}", path=name, field="label")

    def __len__(self) -> int:
        return len(self.pool)

    def __repr__(self) -> str:
        return (f"EpisodeSource({self.name!r}, {len(self.classes)} classes, {len(self.pool)} "
                f"examples, {self.ways}w{self.shots}s{self.query}q, "
                f"weighted={self.weights is not None})")

    def sample(self, seed: int) -> Task:
        """One episode; the same seed always gives the same episode."""
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(self.classes), size=self.ways, replace=False)
        chosen = sorted(self.classes[i] for i in picked)
        need = self.shots + self.query
        support, query_set = [], []
        for c in chosen:
            idx = self._index[c]
            if self.weights is None:
                take = rng.choice(idx, size=need, replace=False)
            else:
                w = self.weights[idx]
                take = rng.choice(idx, size=need, replace=False, p=w / w.sum())
            support.extend(self.pool[int(i)] for i in take[:self.shots])
            query_set.extend(self.pool[int(i)] for i in take[self.shots:])
        s_order = rng.permutation(len(support))
        q_order = rng.permutation(len(query_set))
        support = [support[i] for i in s_order]
        query_set = [query_set[i] for i in q_order]
        return Task(name=f"{Path(self.name).stem}-{len(chosen)}w{self.shots}s-seed{seed}",
                    support=support, query=query_set, labels=chosen,
                    meta={"source": self.name, "ways": len(chosen), "shots": self.shots,
                          "query": self.query, "seed": seed,
                          "weighted": self.weights is not None})


# --------------------------------------------------------------------------------------------
# Feedback logs
# --------------------------------------------------------------------------------------------


def read_feedback(path: str | Path, text_field: str = "text",
                  label_field: str = "label") -> list[Example]:
    """``read_rows`` with ``extra["_path"]`` and ``extra["_line"]`` added to every example."""
    path = Path(path)
    examples = read_rows(path, text_field=text_field, label_field=label_field)
    lines = _decode(path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(lines)
        line_nos = [reader.line_num for _ in reader]
    else:
        line_nos = [i for i, ln in enumerate(lines, start=1) if ln.strip()]
    assert len(line_nos) == len(examples)
    return [Example(text=e.text, label=e.label,
                    extra={**e.extra, "_path": str(path), "_line": n})
            for e, n in zip(examples, line_nos)]


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _parse_timestamp(value, e: Example, field_name: str) -> datetime:
    def bad(why: str):
        return UserError(f"bad timestamp {value!r}: {why} (expected ISO 8601 or unix seconds)",
                         field=field_name, **_where(e))

    if isinstance(value, bool):
        raise bad("a boolean")
    if isinstance(value, str):
        s = value.strip()
        try:
            value = float(s)
        except ValueError:
            try:
                dt = datetime.fromisoformat(s)
            except ValueError:
                raise bad("not a date") from None
            return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise bad("not finite")
        try:
            return datetime.fromtimestamp(value, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise bad("out of range") from None
    raise bad(f"a {type(value).__name__}")


def _iso_week(dt: datetime) -> str:
    year, week, _ = dt.isocalendar()
    return f"{year}-W{week:02d}"


@dataclass
class TaskGroup:
    """The rows of a feedback log that share a project, an intent or an ISO week."""

    name: str
    examples: list[Example]
    labels: list[str]
    kind: str = ""
    key: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def to_source(self, ways: int | None, shots: int, query: int, weights=None) -> EpisodeSource:
        """An ``EpisodeSource`` over the labels that have ``shots + query`` rows, ways capped."""
        need = shots + query
        counts = Counter(e.label for e in self.examples)
        if isinstance(weights, ReplayWeights):
            weights = replay_weights(self.examples, weights)
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(self.examples),):
                raise UserError(f"got {w.size} weights for {len(self.examples)} examples",
                                path=self.name, field="weights")
            counts = Counter(e.label for e, wi in zip(self.examples, w) if wi > 0)
        eligible = sorted(c for c in self.labels if counts[c] >= need)
        if len(eligible) < 2:
            raise UserError(f"group '{self.name}' has {len(eligible)} label(s) with at least "
                            f"{need} rows; too small for {shots}-shot episodes with {query} query "
                            f"(use a support/query split instead)", path=self.name, field="label")
        ways = len(eligible) if ways is None else min(int(ways), len(eligible))
        return EpisodeSource(self.examples, eligible, ways=ways, shots=shots, query=query,
                             weights=weights, name=self.name)

    def split(self, query_fraction: float = 0.5, seed: int = 0) -> Task:
        """A stratified support/query split of all the group's rows."""
        if not (0 < query_fraction < 1):
            raise UserError(f"query fraction must be in (0, 1), got {query_fraction!r}",
                            field="query_fraction")
        rng = random.Random(seed)
        by_label: dict[str, list[Example]] = defaultdict(list)
        for e in self.examples:
            by_label[e.label].append(e)
        support, query_set = [], []
        for label in sorted(by_label):
            rows = list(by_label[label])
            rng.shuffle(rows)
            n = len(rows)
            n_q = 0 if n < 2 else min(max(1, round(n * query_fraction)), n - 1)
            query_set.extend(rows[:n_q])
            support.extend(rows[n_q:])
        rng.shuffle(support)
        rng.shuffle(query_set)
        return Task(name=f"{self.name}-split-seed{seed}", support=support, query=query_set,
                    labels=sorted(by_label),
                    meta={"source": self.name, "group_kind": self.kind,
                          "query_fraction": query_fraction, "seed": seed})


def _group_by(rows: list[Example], kind: str, field_name: str, prefix: str,
              unassigned: dict) -> list[TaskGroup]:
    buckets: dict[str, list[Example]] = defaultdict(list)
    missing = 0
    for e in rows:
        value = e.extra.get(field_name)
        if _is_missing(value):
            missing += 1
            continue
        if kind == "week":
            key = _iso_week(_parse_timestamp(value, e, field_name))
        else:
            key = str(value).strip()
        buckets[key].append(e)
    unassigned[field_name] = missing
    return [TaskGroup(name=f"{prefix}{key}", examples=buckets[key],
                      labels=sorted({e.label for e in buckets[key]}), kind=kind, key=key)
            for key in sorted(buckets)]


def extract_tasks(rows, strategy: str, min_samples: int = 20, *, project_field: str = "project",
                  intent_field: str = "intent",
                  timestamp_field: str = "timestamp") -> tuple[list[TaskGroup], dict]:
    """Group feedback rows into candidate tasks and report what was kept and dropped."""
    if isinstance(rows, (str, Path)):
        rows = read_feedback(rows)
    rows = list(rows)
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}",
                        field="strategy")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 0:
        raise UserError(f"--min-samples must be a non-negative integer, got {min_samples!r}",
                        field="min_samples")
    plan = {
        "project": [("project", project_field, "")],
        "intent": [("intent", intent_field, "")],
        "temporal": [("week", timestamp_field, "")],
        "mixed": [("project", project_field, "project:"), ("intent", intent_field, "intent:"),
                  ("week", timestamp_field, "week:")],
    }[strategy]
    unassigned: dict[str, int] = {}
    candidates: list[TaskGroup] = []
    for kind, field_name, prefix in plan:
        candidates.extend(_group_by(rows, kind, field_name, prefix, unassigned))
    kept, report_kept, report_dropped = [], [], []
    for g in candidates:
        entry = {"name": g.name, "size": len(g.examples), "num_labels": len(g.labels)}
        if len(g.examples) <= min_samples:
            entry["reason"] = (f"{len(g.examples)} rows, at most --min-samples {min_samples}")
            report_dropped.append(entry)
        elif len(g.labels) < 2:
            entry["reason"] = f"only {len(g.labels)} distinct label"
            report_dropped.append(entry)
        else:
            kept.append(g)
            report_kept.append(entry)
    report = {"strategy": strategy, "rows": len(rows), "min_samples": min_samples,
              "kept": report_kept, "dropped": report_dropped, "unassigned": unassigned}
    return kept, report


def format_report(report: dict) -> str:
    """Human-readable lines for an ``extract_tasks`` report."""
    out = [f"strategy {report['strategy']}: {report['rows']} rows, kept {len(report['kept'])} "
           f"group(s), dropped {len(report['dropped'])} (--min-samples {report['min_samples']})"]
    for g in report["kept"]:
        out.append(f"  kept    {g['name']}: {g['size']} rows, {g['num_labels']} labels")
    for g in report["dropped"]:
        out.append(f"  dropped {g['name']}: {g['reason']}")
    for name, n in report.get("unassigned", {}).items():
        if n:
            out.append(f"  {n} row(s) have no '{name}' and were not grouped by it")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Replay weights
# --------------------------------------------------------------------------------------------


def _rating_category(rating, *, field_name: str = "rating", where: dict | None = None) -> str:
    where = where or {}
    if _is_missing(rating):
        return "neutral"
    if isinstance(rating, bool):
        raise UserError(f"rating must be a number, got {rating!r}", field=field_name, **where)
    if isinstance(rating, str):
        try:
            rating = float(rating.strip())
        except ValueError:
            raise UserError(f"rating must be a number, got {rating!r}", field=field_name,
                            **where) from None
    if not isinstance(rating, (int, float)):
        raise UserError(f"rating must be a number, got {rating!r}", field=field_name, **where)
    if not math.isfinite(rating):
        raise UserError(f"rating must be finite, got {rating!r}", field=field_name, **where)
    if rating == -1:
        return "failed"
    if rating > 0:
        return "positive"
    if rating < 0:
        return "other_negative"
    return "neutral"


@dataclass
class ReplayWeights:
    """Sampling weight per rating category of a replay buffer."""

    failed: float = 3.0
    positive: float = 1.0
    other_negative: float = 0.5
    neutral: float = 1.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise UserError(f"replay weight must be a finite non-negative number, got {v!r}",
                                field=f.name)
            setattr(self, f.name, float(v))

    def category(self, rating) -> str:
        return _rating_category(rating)

    def weight_of(self, rating) -> float:
        return getattr(self, _rating_category(rating))


def _categories(examples: Sequence[Example], rating_field: str) -> list[str]:
    return [_rating_category(e.extra.get(rating_field), field_name=rating_field, where=_where(e))
            for e in examples]


def replay_weights(examples: Sequence[Example], rw: ReplayWeights | None = None,
                   rating_field: str = "rating") -> np.ndarray:
    """One sampling weight per example, from its rating."""
    rw = rw or ReplayWeights()
    return np.asarray([getattr(rw, c) for c in _categories(examples, rating_field)],
                      dtype=np.float64)


def replay_stats(examples: Sequence[Example], rw: ReplayWeights | None = None,
                 rating_field: str = "rating") -> dict:
    """Counts, per-example weight and sampling share of each rating category."""
    rw = rw or ReplayWeights()
    cats = _categories(examples, rating_field)
    counts = {c: 0 for c in CATEGORIES}
    counts.update(Counter(cats))
    weights = {c: getattr(rw, c) for c in CATEGORIES}
    mass = {c: counts[c] * weights[c] for c in CATEGORIES}
    total = sum(mass.values())
    shares = {c: (mass[c] / total if total > 0 else 0.0) for c in CATEGORIES}
    return {"examples": len(cats), "total_weight": total, "counts": counts, "weights": weights,
            "shares": shares}

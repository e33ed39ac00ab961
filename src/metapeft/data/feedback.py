"""Feedback logs: task extraction and replay weights.

Everything here is pure Python/numpy and raises ``UserError`` (naming file, line and field where
known) for anything the user can fix. Episodes are drawn by ``metapeft.data.episodes``.

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
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from metapeft.data.episodes import EpisodeSource, group_by_label, weight_array
from metapeft.data.tasks import Example, Task, read_lines, read_rows
from metapeft.errors import UserError

__all__ = [
    "CATEGORIES",
    "STRATEGIES",
    "ReplayWeights",
    "TaskGroup",
    "extract_tasks",
    "format_report",
    "read_feedback",
    "replay_stats",
    "replay_weights",
]

STRATEGIES = ("project", "intent", "temporal", "mixed")
CATEGORIES = ("failed", "positive", "other_negative", "neutral")


def _where(e: Example) -> dict:
    return {"path": e.extra.get("_path"), "line": e.extra.get("_line")}


# --------------------------------------------------------------------------------------------
# Feedback logs
# --------------------------------------------------------------------------------------------


def read_feedback(path: str | Path, text_field: str = "text",
                  label_field: str = "label") -> list[Example]:
    """``read_rows`` with ``extra["_path"]`` and ``extra["_line"]`` added to every example."""
    path = Path(path)
    examples = read_rows(path, text_field=text_field, label_field=label_field)
    lines = read_lines(path)
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


def filter_since(rows: list[Example], since: datetime,
                 field_name: str = "timestamp") -> tuple[list[Example], int]:
    """The rows whose ``field_name`` timestamp is at or after ``since`` (continual meta-training's
    ``--since``/``--days``), and how many rows had no timestamp (they are dropped)."""
    if since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    kept, missing = [], 0
    for e in rows:
        value = e.extra.get(field_name)
        if _is_missing(value):
            missing += 1
        elif _parse_timestamp(value, e, field_name) >= since:
            kept.append(e)
    return kept, missing


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
        w = weight_array(weights, self.examples, self.name)
        usable = self.examples if w is None else [e for e, wi in zip(self.examples, w) if wi > 0]
        counts = Counter(e.label for e in usable)
        eligible = sorted(c for c in self.labels if counts[c] >= need)
        if len(eligible) < 2:
            raise UserError(f"group '{self.name}' has {len(eligible)} label(s) with at least "
                            f"{need} rows; too small for {shots}-shot episodes with {query} query "
                            f"(use a support/query split instead)", path=self.name, field="label")
        ways = len(eligible) if ways is None else min(int(ways), len(eligible))
        return EpisodeSource(self.examples, eligible, ways=ways, shots=shots, query=query,
                             weights=w, name=self.name)

    def split(self, query_fraction: float = 0.5, seed: int = 0) -> Task:
        """A stratified support/query split of all the group's rows."""
        if not (0 < query_fraction < 1):
            raise UserError(f"query fraction must be in (0, 1), got {query_fraction!r}",
                            field="query_fraction")
        rng = random.Random(seed)
        by_label = group_by_label(self.examples)
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

    def __call__(self, examples: Sequence[Example]) -> np.ndarray:
        """One weight per example (``replay_weights``); so an ``EpisodeSource`` takes these
        weights directly."""
        return replay_weights(examples, self)


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

"""Feedback logs: task extraction by project/intent/week, replay weights, weighted episodes."""

import json
from collections import Counter
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from metapeft.data.episodes import EpisodeSource
from metapeft.data.feedback import (
    ReplayWeights,
    TaskGroup,
    extract_tasks,
    format_report,
    read_feedback,
    replay_stats,
    replay_weights,
)
from metapeft.data.tasks import Example
from metapeft.errors import UserError


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_weighted_sampling_prefers_failed_examples():
    pool, ratings = [], []
    for label in ("a", "b", "c"):
        for i in range(20):
            rating = -1 if i < 10 else 1
            pool.append(Example(f"{label}{i}", label, {"rating": rating}))
            ratings.append(rating)
    w = replay_weights(pool, ReplayWeights())
    assert w.tolist() == [3.0 if r == -1 else 1.0 for r in ratings]
    src = EpisodeSource(pool, None, ways=2, shots=1, query=1, weights=w)
    picks = Counter()
    for seed in range(1000):
        t = src.sample(seed)
        for e in t.support + t.query:
            picks["failed" if e.extra["rating"] == -1 else "positive"] += 1
    ratio = picks["failed"] / picks["positive"]
    assert 2.0 < ratio < 4.0, ratio
    # unweighted is balanced
    plain = EpisodeSource(pool, None, ways=2, shots=1, query=1)
    c = Counter(e.extra["rating"] for s in range(500) for e in plain.sample(s).support)
    assert 0.7 < c[-1] / c[1] < 1.4
    # a ReplayWeights object is accepted directly and is deterministic
    src2 = EpisodeSource(pool, None, ways=2, shots=1, query=1, weights=ReplayWeights())
    assert [e.text for e in src2.sample(5).support] == [e.text for e in src.sample(5).support]


# ---------------------------------------------------------------- feedback extraction

BASE = datetime(2024, 3, 4, 9, 0, tzinfo=timezone.utc)  # a Monday (ISO week 10)


def feedback_rows():
    """3 big projects + 1 tiny; 4 intents + 1 single-label; 3 weeks + 1 tiny week."""
    rows = []
    projects = ["alpha", "beta", "gamma"]
    intents = ["ask", "fix", "explain", "refactor"]
    labels = ["good", "bad", "meh"]
    for i in range(180):
        ts = BASE + timedelta(days=(i % 21), hours=i % 7)
        ts_value = ts.isoformat() if i % 2 else int(ts.timestamp())
        rows.append({"text": f"row {i}", "label": labels[(i // 3) % 3], "project": projects[i % 3],
                     "intent": intents[i % 4], "timestamp": ts_value,
                     "rating": [-1, 1, 0, -2][i % 4]})
    for i in range(5):  # tiny project, intent 'ask', week 13 (dropped as a tiny week)
        rows.append({"text": f"tiny {i}", "label": labels[i % 2], "project": "tiny",
                     "intent": "ask", "timestamp": (BASE + timedelta(days=21)).isoformat(),
                     "rating": 1})
    for i in range(30):  # a big intent with one label only
        rows.append({"text": f"mono {i}", "label": "good", "project": "alpha",
                     "intent": "greet", "timestamp": "2024-03-05T10:00:00Z"})
    rows.append({"text": "no project", "label": "good", "intent": "ask",
                 "timestamp": "2024-03-05"})
    return rows


@pytest.fixture
def feedback(tmp_path):
    return read_feedback(write(tmp_path / "fb.jsonl", feedback_rows()))


def names(groups):
    return [g.name for g in groups]


def test_read_feedback_keeps_lines_and_extras(tmp_path, feedback):
    assert feedback[0].extra["_line"] == 1 and feedback[0].extra["project"] == "alpha"
    assert feedback[-1].extra["_line"] == len(feedback_rows())
    assert feedback[0].extra["_path"].endswith("fb.jsonl")


def test_extract_project(feedback):
    groups, report = extract_tasks(feedback, "project", min_samples=20)
    assert names(groups) == ["alpha", "beta", "gamma"]
    assert {g.name: len(g) for g in groups} == {"alpha": 90, "beta": 60, "gamma": 60}
    assert [d["name"] for d in report["dropped"]] == ["tiny"]
    assert "min-samples" in report["dropped"][0]["reason"]
    assert report["unassigned"]["project"] == 1
    assert [k["name"] for k in report["kept"]] == ["alpha", "beta", "gamma"]
    assert "dropped tiny" in format_report(report)


def test_extract_intent_drops_single_label_group(feedback):
    groups, report = extract_tasks(feedback, "intent")
    assert names(groups) == ["ask", "explain", "fix", "refactor"]
    dropped = {d["name"]: d["reason"] for d in report["dropped"]}
    assert list(dropped) == ["greet"] and "1 distinct label" in dropped["greet"]


def test_extract_temporal_weeks(feedback):
    groups, report = extract_tasks(feedback, "temporal")
    assert names(groups) == ["2024-W10", "2024-W11", "2024-W12"]
    assert [d["name"] for d in report["dropped"]] == ["2024-W13"]
    # the unix-seconds and ISO rows land in the same weeks
    assert sum(len(g) for g in groups) == 180 + 30 + 1


def test_extract_mixed(feedback):
    groups, report = extract_tasks(feedback, "mixed")
    assert names(groups) == ["project:alpha", "project:beta", "project:gamma", "intent:ask",
                             "intent:explain", "intent:fix", "intent:refactor", "week:2024-W10",
                             "week:2024-W11", "week:2024-W12"]
    assert {d["name"] for d in report["dropped"]} == {"project:tiny", "intent:greet",
                                                      "week:2024-W13"}
    with pytest.raises(UserError):
        extract_tasks(feedback, "by-moon-phase")


def test_min_samples_boundary():
    def group(n, project):
        return [Example(f"{project} {i}", "ab"[i % 2], {"project": project}) for i in range(n)]

    rows = group(20, "exact") + group(21, "above")
    groups, report = extract_tasks(rows, "project", min_samples=20)
    assert names(groups) == ["above"]
    assert [(d["name"], d["size"]) for d in report["dropped"]] == [("exact", 20)]
    groups, _ = extract_tasks(rows, "project", min_samples=19)
    assert names(groups) == ["above", "exact"]


def test_bad_timestamp_names_field_and_line(tmp_path):
    rows = feedback_rows()[:3] + [{"text": "x", "label": "a", "timestamp": "last tuesday"}]
    fb = read_feedback(write(tmp_path / "fb.jsonl", rows))
    with pytest.raises(UserError) as e:
        extract_tasks(fb, "temporal")
    assert e.value.field == "timestamp" and e.value.line == 4
    assert "fb.jsonl:4" in e.value.one_line()
    for bad in ([2024], True, float("nan")):
        with pytest.raises(UserError) as e:
            extract_tasks([Example("x", "a", {"timestamp": bad})], "temporal")
        assert e.value.field == "timestamp"


def test_bad_rating_names_field(tmp_path):
    rows = [{"text": "a", "label": "x", "rating": 1},
            {"text": "b", "label": "y", "rating": "thumbs up"}]
    fb = read_feedback(write(tmp_path / "fb.jsonl", rows))
    with pytest.raises(UserError) as e:
        replay_weights(fb)
    assert e.value.field == "rating" and e.value.line == 2
    with pytest.raises(UserError) as e:
        ReplayWeights().weight_of("great")
    assert e.value.field == "rating"
    with pytest.raises(UserError):
        ReplayWeights(failed=-1.0)


def test_group_to_source_and_split(feedback):
    groups, _ = extract_tasks(feedback, "project")
    alpha = groups[0]
    src = alpha.to_source(ways=10, shots=2, query=3)
    assert src.ways == len(alpha.labels) == 3
    t = src.sample(0)
    assert Counter(e.label for e in t.support) == {c: 2 for c in alpha.labels}
    weighted = alpha.to_source(ways=2, shots=2, query=3, weights=ReplayWeights())
    assert weighted.weights is not None and weighted.ways == 2
    tiny = TaskGroup("tiny", [Example(f"t{i}", "ab"[i % 2]) for i in range(5)], ["a", "b"])
    with pytest.raises(UserError):
        tiny.to_source(ways=2, shots=2, query=2)
    task = tiny.split(0.5, seed=1)
    assert task.labels == ["a", "b"]
    assert len(task.support) + len(task.query) == 5
    assert {e.label for e in task.support} == {"a", "b"} == {e.label for e in task.query}
    assert [e.text for e in task.query] == [e.text for e in tiny.split(0.5, seed=1).query]


# ---------------------------------------------------------------- replay weights


def test_weight_of_categories():
    rw = ReplayWeights()
    assert rw.weight_of(-1) == 3.0 and rw.weight_of(-1.0) == 3.0 and rw.weight_of("-1") == 3.0
    assert rw.weight_of(1) == 1.0 and rw.weight_of(5) == 1.0
    assert rw.weight_of(-2) == 0.5 and rw.weight_of(-0.5) == 0.5
    assert rw.weight_of(0) == 1.0 and rw.weight_of(None) == 1.0 and rw.weight_of("") == 1.0
    custom = ReplayWeights(failed=5.0, neutral=0.0)
    assert custom.weight_of(-1) == 5.0 and custom.weight_of(None) == 0.0


def test_replay_stats_shares():
    ex = ([Example("f", "a", {"rating": -1})] * 2 + [Example("p", "a", {"rating": 1})] * 4
          + [Example("n", "a", {"rating": -3})] * 4 + [Example("z", "a", {})] * 2)
    stats = replay_stats(ex, ReplayWeights())
    assert stats["counts"] == {"failed": 2, "positive": 4, "other_negative": 4, "neutral": 2}
    assert stats["weights"] == {"failed": 3.0, "positive": 1.0, "other_negative": 0.5,
                                "neutral": 1.0}
    # masses: 6, 4, 2, 2 -> total 14
    assert stats["total_weight"] == pytest.approx(14.0)
    assert stats["shares"]["failed"] == pytest.approx(6 / 14)
    assert stats["shares"]["positive"] == pytest.approx(4 / 14)
    assert stats["shares"]["other_negative"] == pytest.approx(2 / 14)
    assert stats["shares"]["neutral"] == pytest.approx(2 / 14)
    assert sum(stats["shares"].values()) == pytest.approx(1.0)
    w = replay_weights(ex)
    assert isinstance(w, np.ndarray) and w.sum() == pytest.approx(14.0)
    zero = replay_stats(ex, ReplayWeights(0, 0, 0, 0))
    assert all(v == 0.0 for v in zero["shares"].values())

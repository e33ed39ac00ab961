"""Episodes, pool filters and class splits.

The episode sampler's draws are pinned: the README's benchmark numbers were measured on them.
Every expected value in the pinning tests was recorded from the samplers as they were before they moved into
``metapeft.data.episodes`` (``sample_episode`` in data/tasks.py, ``EpisodeSource`` in
data/extract.py, ``sample_sweep_tasks`` in experience.py, ``clinc_tasks`` in
benchmarks/hpo_eval.py). A change here means the same seed now draws a different task, so a
benchmark rerun would no longer reproduce the published tables.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from metapeft.data.episodes import (EpisodeSource, sample_episode, sample_sweep_tasks,
                                    split_classes)
from metapeft.data.feedback import ReplayWeights
from metapeft.data.pools import class_overlap, filter_pool, read_label_list
from metapeft.data.synthetic import family_labels, generate_pool
from metapeft.data.tasks import Example
from metapeft.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def digest(rows) -> str:
    """The examples' texts and labels, in order."""
    return hashlib.sha256(json.dumps([[e.text, e.label] for e in rows]).encode()).hexdigest()[:16]


def fingerprint(task) -> tuple:
    return task.name, task.labels, digest(task.support), digest(task.query)


def write_pool(path: Path) -> Path:
    """3 domains x 6 labels, 14-19 rows per label (labels differ in size)."""
    with path.open("w") as f:
        for d in ("banking", "travel", "work"):
            for lab in range(6):
                for i in range(14 + lab):
                    f.write(json.dumps({"text": f"{d} {lab} text {i}", "label": f"{d}_{lab}",
                                        "domain": d}) + "\n")
    return path


def test_sample_episode_draws_are_pinned():
    pool = generate_pool("intent", seed=0, per_label=20)
    t = sample_episode(pool, ways=4, shots=3, query=5, seed=11)
    assert fingerprint(t) == ("pool-4w3s-seed11", ["offer", "question", "request", "thanks"],
                              "bc90ba1f4407ce0d", "00a2d67d65cf5def")
    assert (t.support[0].text, t.support[0].label) == (
        "so two were or two she were sale special maybe before those you team he are storm",
        "offer")
    t = sample_episode(pool, ways=None, shots=2, query=3, seed=5)
    assert fingerprint(t) == ("pool-8w2s-seed5", ["cancellation", "complaint", "greeting",
                                                  "offer", "question", "report", "request",
                                                  "thanks"],
                              "2edbd287190ecc19", "cd36015e7b003c01")
    t = sample_episode(pool, ways=2, shots=2, query=2, seed=3,
                       labels=["complaint", "greeting", "offer"])
    assert fingerprint(t) == ("pool-2w2s-seed3", ["complaint", "offer"], "6101bd0cbad3ec30",
                              "11b7feb8955bcd79")
    assert t.support[0].text == ("just saw faulty on about missing an realtor really appreciated "
                                 "property")


def test_episode_source_draws_are_pinned():
    topic = generate_pool("topic", 0, 12)
    src = EpisodeSource(topic, ways=5, shots=2, query=3)
    assert fingerprint(src.sample(0)) == (
        "pool-5w2s-seed0", ["finance", "food_delivery", "history", "movies", "real_estate"],
        "ba751abf6babda01", "48a43f07e17ee219")
    t = src.sample(7)
    assert fingerprint(t) == ("pool-5w2s-seed7", ["movies", "ocean", "science", "sports",
                                                  "weather"],
                              "f170e36e86d29a98", "a18789ec89bbba36")
    assert (t.support[0].text, t.support[0].label) == ("in the news people biology very team atom",
                                                        "science")
    src = EpisodeSource(topic, family_labels("topic")[:6], ways=3, shots=2, query=2,
                        name="x/held.jsonl")
    assert fingerprint(src.sample(42)) == ("held-3w2s-seed42", ["animals", "cooking", "fashion"],
                                           "60fdd8f10f555067", "84f2d26f00f6785f")


def test_weighted_episode_source_draws_are_pinned():
    topic = generate_pool("topic", 0, 12)
    w = np.array([(i % 5) * 0.5 for i in range(len(topic))])
    t = EpisodeSource(topic, ways=4, shots=2, query=2, weights=w).sample(3)
    assert fingerprint(t) == ("pool-4w2s-seed3", ["art", "education", "fashion", "real_estate"],
                              "855dd7775fe03385", "fb85bd738d39cef6")
    rated = [Example(e.text, e.label, {**e.extra, "rating": [-1, 1, 0, -2, None][i % 5]})
             for i, e in enumerate(topic)]
    t = EpisodeSource(rated, ways=4, shots=2, query=2, weights=ReplayWeights()).sample(9)
    assert fingerprint(t) == ("pool-4w2s-seed9", ["finance", "gaming", "space_travel", "travel"],
                              "e6c3c2ad88ba6476", "879b3621a3b59a35")


def test_synthetic_sweep_tasks_are_pinned():
    tasks = sample_sweep_tasks("synthetic", 4, seed=0, max_shots=8)
    assert [(t.name, digest(t.support), digest(t.query)) for t in tasks] == [
        ("topic_long-11w2s-0.0", "5769794bf72e43bf", "f4f66a0f479a5cc8"),
        ("topic_long-19w5s-0.1", "e0216abe970ef163", "c8a139a64ae9cdf5"),
        ("intent-4w5s-0.2", "51f2e4922d2b024d", "62cc8e7e9d27f39e"),
        ("topic-6w1s-0.3", "6d1e8a27c51438d0", "8359160935b03675"),
    ]
    assert tasks[2].labels == ["complaint", "greeting", "request", "thanks"]


def test_pool_sweep_tasks_are_pinned(tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl")
    tasks = sample_sweep_tasks(pool, 4, seed=1, query=2)
    assert [fingerprint(t) for t in tasks] == [
        ("travel-6w8s-1.0", [f"travel_{k}" for k in range(6)], "18cb920626503e90",
         "234b7cd5879ddfae"),
        ("work-6w6s-1.1", [f"work_{k}" for k in range(6)], "1a9ab4075a4a680c",
         "da1e89915e5e9154"),
        ("travel-2w12s-1.2", ["travel_1", "travel_2"], "fd8e3b30821a6f39", "6c77b1cf4525f96b"),
        ("banking-6w1s-1.3", [f"banking_{k}" for k in range(6)], "e342cc041adff617",
         "47e001139e3655d3"),
    ]
    assert tasks[0].support[0].text == "travel 5 text 5"
    tasks = sample_sweep_tasks(pool, 2, seed=2, query=3, domains=["work"], max_ways=4)
    assert [fingerprint(t) for t in tasks] == [
        ("work-3w2s-2.0", ["work_1", "work_2", "work_5"], "a141f336a9ac5e13", "521ac4b16ebd67c2"),
        ("work-2w4s-2.1", ["work_3", "work_4"], "e25e8cd106157e3b", "3ed4446a9484ece8"),
    ]


def _hpo_eval():
    spec = importlib.util.spec_from_file_location("hpo_eval", ROOT / "benchmarks" / "hpo_eval.py")
    if spec is None or not spec.loader:
        pytest.skip("benchmarks/hpo_eval.py is absent")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hpo_eval_clinc_tasks_are_pinned(tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl")
    pairs = _hpo_eval().clinc_tasks(pool, 3, ways=3, shots=2, query=3, seed=0, test=4)
    got = [(fingerprint(a), b.name, digest(b.support), digest(b.query), a.meta)
           for a, b in pairs]
    assert got == [
        (("clinc-banking-0", ["banking_2", "banking_3", "banking_4"], "80842afedb086328",
          "d27e5709056d2853"), "clinc-banking-0-test", "80842afedb086328", "1ae410688d1e3d1a",
         {"domain": "banking"}),
        (("clinc-travel-1", ["travel_0", "travel_2", "travel_3"], "3b974f78a48fe2a5",
          "f00d2fe040a7a595"), "clinc-travel-1-test", "3b974f78a48fe2a5", "6917d04938875531",
         {"domain": "travel"}),
        (("clinc-banking-2", ["banking_1", "banking_4", "banking_5"], "2ce661f8b37892f9",
          "f5345ecb0ee68220"), "clinc-banking-2-test", "2ce661f8b37892f9", "f66d2e8a55909139",
         {"domain": "banking"}),
    ]
    assert pairs[0][0].support[0].text == "banking 4 text 11"
    assert all(e.extra == {"domain": "banking"} for e in pairs[0][1].query)


# ---------------------------------------------------------------- helpers


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def domain_pool():
    """3 domains x 3 intents each (labels disjoint by domain), 10 examples per intent."""
    pool = []
    for d in ("banking", "travel", "work"):
        for k in range(3):
            label = f"{d}_intent{k}"
            for i in range(10):
                pool.append(Example(f"{label} text {i}", label, {"domain": d}))
    return pool


# ---------------------------------------------------------------- pool filters


def test_filter_by_domain_and_exclude_gives_disjoint_classes():
    pool = domain_pool()
    train = filter_pool(pool, exclude_domains=["work"])
    val = filter_pool(pool, domains=["work"])
    assert {e.extra["domain"] for e in train} == {"banking", "travel"}
    assert {e.extra["domain"] for e in val} == {"work"}
    assert len(train) == 60 and len(val) == 30
    assert class_overlap(train, val) == set()
    assert class_overlap({e.label for e in train}, ["work_intent0", "banking_intent1"]) == {
        "banking_intent1"}


def test_filter_labels_from_and_exclude_labels(tmp_path):
    pool = domain_pool()
    lst = tmp_path / "labels.txt"
    lst.write_text("# keep these\nbanking_intent0\n\ntravel_intent2\n")
    assert read_label_list(lst) == ["banking_intent0", "travel_intent2"]
    kept = filter_pool(pool, labels_from=lst)
    assert {e.label for e in kept} == {"banking_intent0", "travel_intent2"}
    other = write(tmp_path / "other.jsonl", [{"text": "x", "label": "work_intent1"},
                                             {"text": "y", "label": "banking_intent0"}])
    kept = filter_pool(pool, labels_from=other, exclude_labels=["banking_intent0"])
    assert {e.label for e in kept} == {"work_intent1"}
    with pytest.raises(UserError):
        filter_pool(pool, domains=["work"], exclude_labels=[f"work_intent{k}" for k in range(3)])


def test_unknown_domain_lists_available():
    with pytest.raises(UserError) as e:
        filter_pool(domain_pool(), domains=["banking", "cooking"])
    msg = e.value.one_line()
    assert e.value.field == "domain" and "cooking" in msg
    assert "banking" in msg and "travel" in msg and "work" in msg
    with pytest.raises(UserError):
        filter_pool(domain_pool(), exclude_domains=["nope"])
    with pytest.raises(UserError):
        filter_pool([Example("a", "x")], domains=["banking"])


def test_split_classes_deterministic_and_disjoint():
    labels = [f"c{i}" for i in range(20)]
    a = split_classes(labels, 0.25, seed=3)
    assert a == split_classes(list(reversed(labels)), 0.25, seed=3)
    train, val = a
    assert len(val) == 5 and len(train) == 15
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(labels)
    assert any(split_classes(labels, 0.25, seed=s)[1] != val for s in range(4, 10))
    # at least 2 validation labels whenever a fraction is asked for
    assert len(split_classes(labels, 0.01, seed=0)[1]) == 2
    assert split_classes(labels, 0.0, seed=0) == (sorted(labels), [])
    with pytest.raises(UserError):
        split_classes(["a", "b", "c"], 0.5, seed=0)
    with pytest.raises(UserError):
        split_classes(labels, 1.0, seed=0)


# ---------------------------------------------------------------- episode sources


def test_episode_source_deterministic_and_stratified():
    pool = domain_pool()
    labels = sorted({e.label for e in pool})[:6]
    src = EpisodeSource(pool, labels, ways=3, shots=2, query=4, name="pool.jsonl")
    assert src.classes == labels
    t1, t2 = src.sample(7), src.sample(7)
    assert [e.text for e in t1.support] == [e.text for e in t2.support]
    assert [e.text for e in t1.query] == [e.text for e in t2.query]
    assert len(t1.labels) == 3 and set(t1.labels) <= set(labels)
    assert Counter(e.label for e in t1.support) == {c: 2 for c in t1.labels}
    assert Counter(e.label for e in t1.query) == {c: 4 for c in t1.labels}
    assert not {e.text for e in t1.support} & {e.text for e in t1.query}
    assert any(src.sample(s).labels != t1.labels for s in range(8, 20))


def test_episode_source_validation():
    pool = domain_pool()
    with pytest.raises(UserError) as e:
        EpisodeSource(pool, ["banking_intent0", "travel_intent1"], ways=3, shots=1, query=1)
    assert e.value.field == "ways"
    small = pool + [Example("lonely", "rare", {})]
    with pytest.raises(UserError) as e:
        EpisodeSource(small, ["banking_intent0", "rare"], ways=2, shots=1, query=1)
    assert "'rare'" in e.value.one_line()
    with pytest.raises(UserError):
        EpisodeSource(pool, ["banking_intent0", "travel_intent0"], ways=2, shots=5, query=6)
    with pytest.raises(UserError):
        EpisodeSource(pool, None, ways=2, shots=1, query=1, weights=[1.0, 2.0])

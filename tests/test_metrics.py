"""metapeft.metrics against values worked out by hand (no model, no MLX)."""

import math

import numpy as np
import pytest

from metapeft.metrics import ECE_BINS, classification_metrics, confusion_matrix, reliability

LABELS = ["a", "b", "c"]
GOLD = [0, 0, 1, 1, 2, 2]
# predictions a, b, b, b, a, c with confidences .9 .62 .82 .72 .52 .95 (each in its own bin)
PROBS = [[0.90, 0.05, 0.05],
         [0.20, 0.62, 0.18],
         [0.10, 0.82, 0.08],
         [0.14, 0.72, 0.14],
         [0.52, 0.20, 0.28],
         [0.02, 0.03, 0.95]]


def test_by_hand():
    m = classification_metrics(GOLD, PROBS, LABELS)
    # rows gold, columns predicted
    assert m["confusion"] == {"labels": LABELS, "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 1]]}
    assert m["accuracy"] == pytest.approx(4 / 6) and m["num_examples"] == 6
    # precision tp/predicted: a 1/2, b 2/3, c 1/1; recall tp/support: a 1/2, b 2/2, c 1/2
    per = {r["label"]: r for r in m["per_class"]}
    assert [per[k]["precision"] for k in LABELS] == pytest.approx([0.5, 2 / 3, 1.0])
    assert [per[k]["recall"] for k in LABELS] == pytest.approx([0.5, 1.0, 0.5])
    assert [per[k]["f1"] for k in LABELS] == pytest.approx([0.5, 0.8, 2 / 3])
    assert [per[k]["support"] for k in LABELS] == [2, 2, 2]
    assert m["macro"]["precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["macro"]["recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["macro"]["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # one label per example: micro precision = recall = F1 = accuracy
    assert m["micro"] == pytest.approx({"precision": 4 / 6, "recall": 4 / 6, "f1": 4 / 6})
    # ECE: every confidence in its own bin, so (1/6) * sum |correct - confidence|
    gaps = [1 - 0.9, 0.62, 1 - 0.82, 1 - 0.72, 0.52, 1 - 0.95]
    assert m["ece"] == pytest.approx(sum(gaps) / 6) and m["ece_bins"] == ECE_BINS == 15
    assert sum(r["count"] for r in m["reliability"]) == 6


def test_macro_skips_classes_never_seen_nor_predicted():
    m = classification_metrics(GOLD, [p + [0.0] for p in PROBS], LABELS + ["d"])
    base = classification_metrics(GOLD, PROBS, LABELS)
    assert m["macro"] == pytest.approx(base["macro"])
    d = m["per_class"][3]
    assert d == {"label": "d", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # a class that is predicted but never gold counts (precision 0), as in scikit-learn
    m2 = classification_metrics([0, 0], [[0.4, 0.6], [0.9, 0.1]], ["x", "y"])
    assert m2["macro"]["precision"] == pytest.approx((1.0 + 0.0) / 2)
    assert m2["macro"]["recall"] == pytest.approx((0.5 + 0.0) / 2)


def test_reliability_bins():
    # .91 and .93 share bin 13 = (13/15, 14/15]: accuracy 1/2, confidence .92
    ece, table = reliability(np.array([0.91, 0.93]), np.array([True, False]))
    assert ece == pytest.approx(0.42)
    assert table[13]["count"] == 2 and table[13]["confidence"] == pytest.approx(0.92)
    assert table[13]["accuracy"] == 0.5 and table[0]["accuracy"] is None
    assert len(table) == 15 and table[0]["lower"] == 0 and table[-1]["upper"] == 1
    # the edges: 1.0 is in the last bin, 0 in the first, 1/15 (upper edge) in the first
    _, t = reliability(np.array([1.0, 0.0, 1 / 15]), np.array([True, True, True]))
    assert t[14]["count"] == 1 and t[0]["count"] == 2
    # perfectly calibrated: zero
    ece, _ = reliability(np.array([0.5, 0.5]), np.array([True, False]))
    assert ece == pytest.approx(0.0)


def test_confusion_and_edge_cases():
    assert confusion_matrix(np.array([1, 1, 0]), np.array([1, 0, 0]), 2).tolist() == [[1, 0],
                                                                                      [1, 1]]
    perfect = classification_metrics([0, 1], [[0.7, 0.3], [0.2, 0.8]], ["x", "y"])
    assert perfect["accuracy"] == 1.0 and perfect["macro"]["f1"] == 1.0
    assert perfect["ece"] == pytest.approx(((1 - 0.7) + (1 - 0.8)) / 2)
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [[1.0, 0.0]], ["x", "y"])
    with pytest.raises(ValueError):
        classification_metrics([2], [[0.5, 0.5]], ["x", "y"])
    empty = classification_metrics([], np.zeros((0, 2)), ["x", "y"])
    assert empty["accuracy"] == 0.0 and empty["ece"] == 0.0
    assert not any(math.isnan(v) for v in empty["macro"].values())

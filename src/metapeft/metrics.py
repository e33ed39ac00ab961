"""Classification metrics in plain numpy: what ``metapeft evaluate`` reports.

``classification_metrics(gold, probabilities, labels)`` takes gold class indices (N,) and the
predicted distribution over the candidates (N, C); the prediction is its argmax (the first on a
tie, as ``np.argmax``). It returns

* ``accuracy``;
* ``per_class``: precision, recall, F1 and support (gold count) for every label, in label order;
  a ratio with a zero denominator is 0 (scikit-learn's ``zero_division=0``);
* ``macro``: the unweighted mean of the per-class precision, recall and F1 over the classes that
  occur in the gold labels or the predictions (scikit-learn's default label set);
* ``micro``: precision, recall and F1 from the pooled counts; with one label per example every
  error is one false positive and one false negative, so all three equal the accuracy;
* ``confusion``: counts, rows the gold class, columns the predicted one, in label order;
* ``ece``: expected calibration error of the confidence (the top probability) over
  ``ECE_BINS`` = 15 equal-width bins of [0, 1] (bin b holds confidences in (b/15, (b+1)/15], the
  first also 0): sum over bins of (bin size / N) * |bin accuracy - bin mean confidence|;
* ``reliability``: per bin its edges, count, mean confidence and accuracy (None when empty),
  the data of a reliability diagram.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def confusion_matrix(gold: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows gold, columns predicted."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (np.asarray(gold, np.int64), np.asarray(pred, np.int64)), 1)
    return m


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _ratio(2 * p * r, p + r)


def reliability(confidence: np.ndarray, correct: np.ndarray,
                bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """(ECE, per-bin data) over ``bins`` equal-width bins of [0, 1] (see the module doc)."""
    conf = np.asarray(confidence, np.float64)
    hit = np.asarray(correct, np.float64)
    n = max(len(conf), 1)
    # bin b holds (b/bins, (b+1)/bins]; confidence 0 joins the first bin
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        sel = idx == b
        count = int(sel.sum())
        row = {"lower": b / bins, "upper": (b + 1) / bins, "count": count,
               "confidence": None, "accuracy": None}
        if count:
            c, a = float(conf[sel].mean()), float(hit[sel].mean())
            row.update(confidence=c, accuracy=a)
            ece += count / n * abs(a - c)
        table.append(row)
    return ece, table


def classification_metrics(gold, probabilities, labels: list[str],
                           bins: int = ECE_BINS) -> dict:
    """Accuracy, macro/micro and per-class precision/recall/F1, confusion matrix, ECE and the
    reliability table (see the module doc) of predictions ``probabilities`` (N, C) against
    ``gold`` (N,) class indices into ``labels``."""
    probs = np.asarray(probabilities, np.float64)
    gold = np.asarray(gold, np.int64)
    C = len(labels)
    if probs.ndim != 2 or probs.shape != (len(gold), C):
        raise ValueError(f"probabilities {probs.shape} do not match {len(gold)} examples x "
                         f"{C} labels")
    if len(gold) and (gold.min() < 0 or gold.max() >= C):
        raise ValueError("gold indices outside the label set")
    pred = probs.argmax(axis=1) if len(gold) else np.zeros(0, np.int64)
    cm = confusion_matrix(gold, pred, C)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # gold count per class
    predicted = cm.sum(axis=0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _f1(precision, recall)
    present = (support + predicted) > 0
    macro = {k: float(v[present].mean()) if present.any() else 0.0
             for k, v in (("precision", precision), ("recall", recall), ("f1", f1))}
    n = len(gold)
    micro_p = float(tp.sum() / predicted.sum()) if predicted.sum() else 0.0
    micro_r = float(tp.sum() / support.sum()) if support.sum() else 0.0
    micro = {"precision": micro_p, "recall": micro_r,
             "f1": float(_f1(np.array(micro_p), np.array(micro_r)))}
    correct = pred == gold
    ece, table = reliability(probs.max(axis=1) if n else np.zeros(0), correct, bins)
    return {
        "accuracy": float(correct.mean()) if n else 0.0,
        "num_examples": n,
        "macro": macro,
        "micro": micro,
        "per_class": [{"label": lab, "precision": float(precision[c]),
                       "recall": float(recall[c]), "f1": float(f1[c]),
                       "support": int(support[c])} for c, lab in enumerate(labels)],
        "confusion": {"labels": list(labels), "matrix": cm.tolist()},
        "ece": float(ece),
        "ece_bins": bins,
        "reliability": table,
    }


def mean_ci(values) -> dict:
    """``{"mean", "ci"}``: the mean and its 95% CI half-width (1.96·sd/√n; None for n < 2)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci": None}
    half = float(1.96 * v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None
    return {"mean": float(v.mean()), "ci": half}

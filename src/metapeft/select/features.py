"""Task characterisation: a fixed, documented feature vector for one few-shot task.

``FEATURE_NAMES`` fixes the order of the vector (it is stored with every experience record and
with the embedder, so a changed list is detected rather than silently mixed):

============================ ==============================================================
name                         meaning
============================ ==============================================================
``n_support``                support (training) examples
``n_query``                  query (evaluation) examples
``log_n``                    log(1 + n_support)
``shots_mean``               mean support examples per class
``shots_min``                smallest support examples per class
``num_classes``              number of labels
``label_entropy``            entropy of the support label distribution / log(num_classes), in [0, 1]
``imbalance``                largest / smallest per-class support count (1 = balanced)
``mean_tokens``              mean prompt length in tokens of the base model's tokenizer
                             (whitespace words when no model is given)
``max_tokens``               longest prompt in tokens (same unit)
``vocab_size``               distinct lower-cased whitespace words in the support texts
``type_token_ratio``         vocab_size / total support words
``zero_shot_loss``           mean cross-entropy over candidates of the frozen base model on the
                             query set (rank classification; a fresh LoRA has B = 0, so its
                             scores are the base model's)
``zero_shot_accuracy``       the base model's rank-classification accuracy on the query set
``chance_accuracy``          1 / num_classes (so a learner can compare zero-shot to chance)
``fisher_log_trace``         log(1 + ||grad||²) of the support loss w.r.t. a fresh rank-4 LoRA's
                             parameters (all linear layers, seed 0): a Task2Vec-style
                             Fisher-diagonal-trace proxy
============================ ==============================================================

The domain (``domain`` of the rows, or the synthetic family) is *not* in the vector: it is a
categorical kept as a string by ``task_domain`` and stored separately in the experience store.

Without a base model the three model-based features take their chance values (loss = log C,
accuracy = 1 / C, Fisher = 0) so the vector stays finite. The model-based features use at most
``MAX_EXAMPLES`` support and query examples (a deterministic subset), which keeps profiling
under a second on the tiny model.
"""

from __future__ import annotations

import math
from collections import Counter

FEATURE_NAMES: tuple[str, ...] = (
    "n_support", "n_query", "log_n", "shots_mean", "shots_min", "num_classes", "label_entropy",
    "imbalance", "mean_tokens", "max_tokens", "vocab_size", "type_token_ratio",
    "zero_shot_loss", "zero_shot_accuracy", "chance_accuracy", "fisher_log_trace",
)
MAX_EXAMPLES = 96


def task_domain(task) -> str:
    """The task's domain: the rows' ``domain`` field (most common), the synthetic family, or
    ``unknown``."""
    fam = (task.meta or {}).get("family") or (task.meta or {}).get("domain")
    if fam:
        return str(fam)
    doms = Counter(str(e.extra.get("domain")) for e in task.support if e.extra.get("domain"))
    return doms.most_common(1)[0][0] if doms else "unknown"


def _subset(examples: list, n: int) -> list:
    if len(examples) <= n:
        return list(examples)
    step = len(examples) / n  # deterministic, spread over the (already shuffled) list
    return [examples[int(i * step)] for i in range(n)]


def _stratified(task, n: int) -> list:
    """At most ``n`` support examples, round-robin over labels so every class is present."""
    by: dict[str, list] = {}
    for e in task.support:
        by.setdefault(e.label, []).append(e)
    out, i = [], 0
    while len(out) < min(n, len(task.support)):
        for lab in task.labels:
            rows = by.get(lab, [])
            if i < len(rows) and len(out) < n:
                out.append(rows[i])
        i += 1
    return out


def _model_features(task, base) -> tuple[float, float, float]:
    import mlx.core as mx
    from functools import partial

    from metapeft.adapters import PROBE_METHOD, PROBE_OPTIONS, get_adapter_class
    from metapeft.train import batch_loss, encode_task, evaluate
    from metapeft.data.tasks import Task

    small = Task(name=task.name, support=_stratified(task, MAX_EXAMPLES),
                 query=_subset(task.query, MAX_EXAMPLES) or _subset(task.support, MAX_EXAMPLES),
                 labels=list(task.labels), meta=dict(task.meta or {}))
    adapter = get_adapter_class(PROBE_METHOD).attach(base, PROBE_OPTIONS)
    params = adapter.init_params(0)
    data = encode_task(small, base.tokenizer, bucket_size=MAX_EXAMPLES)
    acc, loss = evaluate(adapter, params, data.query)
    grads = mx.grad(partial(batch_loss, adapter))(params, data.support)
    from mlx.utils import tree_flatten

    sq = sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads))
    mx.eval(sq)
    return float(loss), float(acc), math.log1p(float(sq.item()))


def task_features(task, base=None) -> dict[str, float]:
    """The feature dict of ``task`` in ``FEATURE_NAMES`` order (all finite floats).

    ``base`` is a ``metapeft.models.BaseModel`` (tokens and the model-based features) or None
    (whitespace words, chance values for the model-based features).
    """
    counts = Counter(e.label for e in task.support)
    per_class = [counts.get(lab, 0) for lab in task.labels]
    n_sup, n_q = len(task.support), len(task.query)
    c = max(len(task.labels), 1)
    probs = [k / n_sup for k in per_class if k > 0] if n_sup else []
    ent = -sum(p * math.log(p) for p in probs)
    label_entropy = ent / math.log(c) if c > 1 else 0.0
    nonzero = [k for k in per_class if k > 0] or [1]
    texts = [e.text for e in task.support] + [e.text for e in task.query]
    if base is not None:
        from metapeft.scoring import TaskEncoder

        enc = TaskEncoder(base.tokenizer, task.labels)
        lengths = [len(enc.prompt_tokens(t)) for t in texts]
    else:
        lengths = [len(t.split()) for t in texts]
    words = [w.lower() for e in task.support for w in e.text.split()]
    vocab = len(set(words))
    if base is not None and n_sup:
        zl, za, fisher = _model_features(task, base)
    else:
        zl, za, fisher = math.log(c), 1.0 / c, 0.0
    feats = {
        "n_support": float(n_sup),
        "n_query": float(n_q),
        "log_n": math.log1p(n_sup),
        "shots_mean": n_sup / c,
        "shots_min": float(min(per_class) if per_class else 0),
        "num_classes": float(c),
        "label_entropy": float(label_entropy),
        "imbalance": max(nonzero) / min(nonzero),
        "mean_tokens": sum(lengths) / max(len(lengths), 1),
        "max_tokens": float(max(lengths) if lengths else 0),
        "vocab_size": float(vocab),
        "type_token_ratio": vocab / max(len(words), 1),
        "zero_shot_loss": zl,
        "zero_shot_accuracy": za,
        "chance_accuracy": 1.0 / c,
        "fisher_log_trace": fisher,
    }
    out = {k: float(feats[k]) for k in FEATURE_NAMES}
    for k, v in out.items():
        if not math.isfinite(v):
            out[k] = 0.0
    return out


def feature_vector(features: dict[str, float]) -> list[float]:
    """The values of a feature dict in ``FEATURE_NAMES`` order (missing -> 0.0)."""
    return [float(features.get(k, 0.0)) for k in FEATURE_NAMES]

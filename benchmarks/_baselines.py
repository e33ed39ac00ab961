"""Training-free baselines for the meta-learning tables: logistic regression on the frozen model's
features, and in-context learning (the support set as demonstrations, scored by the same rank
classification as every adapter)."""

from __future__ import annotations

import numpy as np


def frozen_features(base, batches):
    """L2-normalised mean-pooled final hidden states over the prompt tokens (the library's
    ``prototype`` features, uncentred), and the labels."""
    from metapeft.adapters.prototype import pooled_states

    f = np.concatenate([np.asarray(pooled_states(base.model, b)) for b in batches])
    labels = np.concatenate([np.asarray(b.labels) for b in batches])
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8), labels


def logistic_regression_accuracy(base, data, C: float = 10.0) -> float:
    """Multinomial logistic regression (scikit-learn, a dependency of scikit-optimize) on the
    frozen features of the support set, scored on the query set. C = 10 on unit-norm features:
    fixed a priori (weak L2, as 25 examples in ~600 dimensions are separable), not tuned on test."""
    from sklearn.linear_model import LogisticRegression

    fs, ys = frozen_features(base, data.support)
    fq, yq = frozen_features(base, data.query)
    clf = LogisticRegression(C=C, max_iter=2000).fit(fs, ys)
    return float((clf.predict(fq) == yq).mean())


def in_context_accuracy(base, task, seed: int = 0, max_demo_tokens: int = 2048) -> float:
    """In-context learning: every support example as a demonstration (``Input: x\\nLabel: y``,
    classes interleaved in a seeded random order), then each query scored by rank classification
    over the candidate labels, exactly as adapters are scored. The demonstrations' keys/values are
    computed once (an mlx-lm KV cache) and shared by every query as a prefix, so the query tokens
    sit at the positions that follow the demonstrations."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from metapeft.scoring import DEFAULT_TEMPLATE, TaskEncoder, score_candidates, verbalise

    tok = base.tokenizer
    rng = np.random.default_rng(seed)
    demos = [task.support[i] for i in rng.permutation(len(task.support))]
    text = "".join(DEFAULT_TEMPLATE.format(text=e.text) + " " + verbalise(e.label) + "\n\n"
                   for e in demos)
    # keep the last demonstrations that fit the model's context, with room for a query
    ctx = getattr(getattr(base.model, "args", None), "max_position_embeddings", None) or 10**9
    ids = list(tok.encode(text))[-min(max_demo_tokens, max(ctx - 128, 0)):]
    cache = make_prompt_cache(base.model)
    base.model(mx.array(ids)[None], cache=cache)
    prefix = [(c.keys[..., :c.offset, :], c.values[..., :c.offset, :]) for c in cache]
    mx.eval(prefix)
    bos = getattr(tok, "bos_token_id", None)

    class _QueryEncoder(TaskEncoder):  # the query continues the demonstrations: no second BOS
        def prompt_tokens(self, t):
            got = super().prompt_tokens(t)
            return got[1:] if bos is not None and len(got) > 1 and got[0] == bos else got

    enc = _QueryEncoder(tok, task.labels)
    hits = n = 0
    for batch in enc.encode_buckets(task.query, max_size=16):
        B = batch.prompt.shape[0]
        pre = [(mx.broadcast_to(k, (B,) + k.shape[1:]), mx.broadcast_to(v, (B,) + v.shape[1:]))
               for k, v in prefix]
        scores = score_candidates(base.model, batch, prefix=pre)
        hits += int((mx.argmax(scores, axis=-1) == batch.labels).sum().item())
        n += B
    return hits / max(n, 1)

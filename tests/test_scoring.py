"""The two-pass batched scorer must equal scoring each prompt+label as one plain sequence."""

import mlx.core as mx
import numpy as np

from metapeft.scoring import score_candidates
from metapeft.data.tasks import Example
from metapeft.scoring import TaskEncoder, classification_loss


def reference_scores(model, enc, text):
    prompt = enc.prompt_tokens(text)
    out = []
    for lab in enc.label_tokens:
        seq = mx.array([prompt + lab])
        logp = model(seq)[0].astype(mx.float32)
        logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
        out.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(lab)))
    return out


def check(model, tokenizer, labels, texts):
    enc = TaskEncoder(tokenizer, labels)
    batch = enc.encode([Example(t, labels[0]) for t in texts])
    got = np.array(score_candidates(model, batch))
    want = np.array([reference_scores(model, enc, t) for t in texts])
    assert got.shape == (len(texts), len(labels))
    assert np.allclose(got, want, atol=2e-3), (got, want)


def test_batched_scores_equal_single_sequences_tiny(tiny):
    # labels of different token lengths, prompts of different lengths (padding paths)
    check(tiny.model, tiny.tokenizer, ["weather", "space_travel", "real_estate", "low_priority"],
          ["rain storm", "the guitar and the piano with a long concert tonight", "goal"])


def test_batched_scores_equal_single_sequences_stories(stories):
    check(stories.model, stories.tokenizer, ["happy", "sad", "very angry"],
          ["The dog ran to the park.", "Lily cried because her toy broke and she was alone."])


def test_objectives_pick_gold():
    scores = mx.array([[-1.0, -5.0], [-4.0, -0.5]])
    from metapeft.scoring import Batch

    b = Batch(mx.zeros((2, 1), mx.int32), mx.ones(2, mx.int32), mx.zeros((2, 1), mx.int32),
              mx.ones(2, mx.int32), mx.array([0, 1]), mx.ones(2))
    good = float(classification_loss(scores, b))
    b2 = b._replace(labels=mx.array([1, 0]))
    assert good < float(classification_loss(scores, b2))
    assert float(classification_loss(scores, b, objective="nll")) == 0.75
    ce = float(classification_loss(scores, b, objective="ce"))
    # ce_nll is ce plus the gold label's per-token NLL (label_len 1 here: 0.75 as above)
    assert abs(float(classification_loss(scores, b, objective="ce_nll")) - (ce + 0.75)) < 1e-5
    # with one-token labels, length-normalised ce equals ce
    assert abs(float(classification_loss(scores, b, objective="ce_mean")) - ce) < 1e-6

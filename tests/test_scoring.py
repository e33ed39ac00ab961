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


def _trunk_case(base, num_layers, labels, texts):
    """Scores and LoRA gradients from the frozen-trunk path against the full forward."""
    from mlx.utils import tree_flatten, tree_map

    from metapeft.adapters import get_adapter_class
    from metapeft.scoring import runs_blocks
    from metapeft.train import batch_loss

    assert runs_blocks(base.model)
    ad = get_adapter_class("lora").attach(base, {"num_layers": num_layers})
    assert ad.frozen_blocks == base.num_layers - num_layers > 0
    params = tree_map(lambda x: x + 0.01, ad.init_params(0))  # B != 0: the adapter matters
    enc = TaskEncoder(base.tokenizer, labels)
    batch = enc.encode([Example(t, labels[i % len(labels)]) for i, t in enumerate(texts)])
    cached = ad.prepare(batch)
    assert cached.hidden.ndim == 3 and batch.hidden.ndim == 1
    full = np.array(ad.scores(params, batch))
    fast = np.array(ad.scores(params, cached))
    g_full = dict(tree_flatten(mx.grad(batch_loss, argnums=1)(ad, params, batch)))
    g_fast = dict(tree_flatten(mx.grad(batch_loss, argnums=1)(ad, params, cached)))
    score_diff = float(np.abs(full - fast).max())
    grad_diff = max(float(mx.abs(g_full[k] - g_fast[k]).max()) for k in g_full)
    grad_scale = max(float(mx.abs(g).max()) for g in g_full.values())
    assert score_diff < 1e-4 * max(1.0, float(np.abs(full).max())), score_diff
    assert grad_diff < 1e-4 * grad_scale, (grad_diff, grad_scale)


TRUNK_LABELS = ["pin change", "card arrival", "exchange rate"]  # multi-token: both passes
TRUNK_TEXTS = ["how do i change my pin", "where is my new card", "what is the rate today",
               "i want a new pin please and quickly"]


def test_trunk_cache_equals_full_forward_tiny(tiny):
    _trunk_case(tiny, 1, TRUNK_LABELS, TRUNK_TEXTS)


def test_trunk_cache_equals_full_forward_stories(stories):
    _trunk_case(stories, 2, TRUNK_LABELS, TRUNK_TEXTS)


def test_trunk_cache_equals_full_forward_smollm2(smol):
    _trunk_case(smol, 8, TRUNK_LABELS, TRUNK_TEXTS)


def test_block_path_equals_model_call(tiny):
    """Running the blocks ourselves (head only at scored positions) equals mlx-lm's own forward."""
    import metapeft.scoring as sc

    enc = TaskEncoder(tiny.tokenizer, TRUNK_LABELS)
    batch = enc.encode([Example(t, TRUNK_LABELS[0]) for t in TRUNK_TEXTS])
    blocks = np.array(score_candidates(tiny.model, batch))
    saved = sc.BLOCK_MODEL_TYPES
    try:
        sc.BLOCK_MODEL_TYPES = frozenset()
        generic = np.array(score_candidates(tiny.model, batch))
    finally:
        sc.BLOCK_MODEL_TYPES = saved
    assert np.abs(blocks - generic).max() < 1e-4


def _groups_case(base, labels, texts):
    """Continuations grouped by length, unpadded (``label_groups``), against every candidate
    padded to the longest label and masked (no groups): the same scores and the same LoRA
    gradients, with and without the frozen-trunk cache."""
    from mlx.utils import tree_flatten, tree_map

    from metapeft.adapters import get_adapter_class
    from metapeft.train import batch_loss

    enc = TaskEncoder(base.tokenizer, labels)
    batch = enc.encode([Example(t, labels[i % len(labels)]) for i, t in enumerate(texts)])
    C, Lm = batch.label_tokens.shape
    lens = np.array(batch.label_len)
    assert 1 in lens and len(set(lens)) > 2 and Lm > 2  # one-token labels and padding to skip
    # one group per continuation length, no one-token label in any, every other label once
    assert [g[1].shape[1] + 1 for g in batch.label_groups] == sorted(set(lens.tolist()) - {1})
    grouped = sorted(int(c) for g in batch.label_groups for c in np.array(g[0]))
    assert grouped == [c for c in range(C) if lens[c] > 1]
    ad = get_adapter_class("lora").attach(base, {"num_layers": max(1, base.num_layers - 1)})
    params = tree_map(lambda x: x + 0.01, ad.init_params(0))
    padded = batch._replace(label_groups=())
    for b_fast, b_ref in ((batch, padded), (ad.prepare(batch), ad.prepare(padded))):
        fast, ref = np.array(ad.scores(params, b_fast)), np.array(ad.scores(params, b_ref))
        assert np.abs(fast - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))
        g_fast = dict(tree_flatten(mx.grad(batch_loss, argnums=1)(ad, params, b_fast)))
        g_ref = dict(tree_flatten(mx.grad(batch_loss, argnums=1)(ad, params, b_ref)))
        scale = max(float(mx.abs(g).max()) for g in g_ref.values())
        assert max(float(mx.abs(g_fast[k] - g_ref[k]).max()) for k in g_ref) < 1e-4 * scale


GROUP_LABELS = ["pin", "card arrival", "international exchange rate today", "balance",
                "lost card"]


def test_label_groups_equal_padded_scoring_tiny(tiny):
    _groups_case(tiny, GROUP_LABELS, TRUNK_TEXTS)


def test_label_groups_equal_padded_scoring_smollm2(smol):
    _groups_case(smol, GROUP_LABELS, TRUNK_TEXTS)

"""Prompt tuning, prefix tuning and P-tuning: shapes, exactness against explicit references,
gradients, training, save/load, vmap and config validation (tiny model, a few seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import metapeft  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from metapeft.adapters import get_adapter_class
from metapeft.scoring import score_candidates
from metapeft.errors import UserError
from metapeft.scoring import Batch

CASES = [
    ("prompt", {}),
    ("prompt", {"init": "text", "init_text": "input label text"}),
    ("prompt", {"init": "vocab"}),
    ("prefix", {}),
    ("prefix", {"init": "text"}),
    ("prefix", {"prefix_projection": True, "encoder_hidden_size": 32}),
    ("ptuning", {"encoder_type": "mlp"}),
    ("ptuning", {"encoder_type": "lstm", "encoder_hidden_size": 16}),
]
IDS = [m + ("-" + "-".join(f"{k}={v}" for k, v in c.items()) if c else "") for m, c in CASES]
# One case per parameterisation for the slower tests.
MAIN = [CASES[0], CASES[3], CASES[5], CASES[6], CASES[7]]
MAIN_IDS = ["prompt", "prefix", "prefix-projection", "ptuning-mlp", "ptuning-lstm"]


def attach(base, method, cfg, **extra):
    return get_adapter_class(method).attach(base, {"num_virtual_tokens": 5, **cfg, **extra})


def make_batch(base, seed=0):
    """3 right-padded prompts of different lengths and 3 candidates of 1, 2 and 3 label tokens,
    so both scoring passes, the padding masks and the per-sequence RoPE offsets are exercised."""
    rng = np.random.default_rng(seed)
    vocab = base.model.model.embed_tokens.weight.shape[0]
    plen = np.array([7, 4, 9], np.int32)
    prompt = np.zeros((3, 12), np.int32)
    for b, n in enumerate(plen):
        prompt[b, 0] = 1  # BOS
        prompt[b, 1:n] = rng.integers(4, vocab, n - 1)
    llen = np.array([1, 2, 3], np.int32)
    labels = np.zeros((3, 3), np.int32)
    for c, n in enumerate(llen):
        labels[c, :n] = rng.integers(4, vocab, n)
    return Batch(mx.array(prompt), mx.array(plen), mx.array(labels), mx.array(llen),
                 mx.array(np.array([0, 2, 1], np.int32)), mx.ones((3,)))


def label_logprob(logits, start, label):
    """sum_t log p(label[t]) where logits[start + t] predicts label[t]."""
    lp = logits.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    return sum(lp[start + t, int(tok)].item() for t, tok in enumerate(label))


def _rel_close(a, b, tol=2e-4):
    return abs(a - b) <= tol * max(1.0, abs(b))


# --- shapes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,cfg", CASES, ids=IDS)
def test_scores_shape_and_tree(tiny, small_task, method, cfg):
    from metapeft.train import encode_task

    a = attach(tiny, method, cfg)
    p = a.init_params(0)
    data = encode_task(small_task, tiny.tokenizer)
    for b in data.support + data.query:
        s = a.scores(p, b)
        assert s.shape == (b.size, len(small_task.labels))
        assert bool(mx.all(mx.isfinite(s)).item())
        assert bool(mx.all(s <= 0).item())
    if method == "prompt":
        assert p["prompt"].shape == (5, tiny.hidden_size)
    if method == "prefix":
        keys, values = a.prefix_kv(p)
        want = (tiny.num_layers, tiny.num_kv_heads, 5, tiny.head_dim)  # GQA: 2 KV heads, not 4
        assert keys.shape == want and values.shape == want
    if method == "ptuning":
        assert a.virtual_tokens(p).shape == (5, tiny.hidden_size)


@pytest.mark.parametrize("method,cfg", CASES, ids=IDS)
def test_init_is_deterministic(tiny, method, cfg):
    a = attach(tiny, method, cfg)
    p0, p0b, p1 = a.init_params(0), a.init_params(0), a.init_params(1)
    f0, f0b, f1 = a.flat(p0), a.flat(p0b), a.flat(p1)
    assert set(f0) == set(f1)
    assert all(mx.array_equal(f0[k], f0b[k]).item() for k in f0)
    text_init = cfg.get("init") == "text"
    assert text_init == all(mx.array_equal(f0[k], f1[k]).item() for k in f0)


def test_prompt_inits(tiny):
    base_std = float(mx.std(tiny.model.model.embed_tokens.weight).item())
    a = get_adapter_class("prompt").attach(tiny, {"num_virtual_tokens": 64})
    assert abs(float(mx.std(a.init_params(0)["prompt"]).item()) - base_std) < 0.15 * base_std
    ids = tiny.tokenizer.encode("input label text", add_special_tokens=False)
    a = attach(tiny, "prompt", {"init": "text", "init_text": "input label text"}, num_virtual_tokens=7)
    want = tiny.embed(mx.array((ids * 3)[:7]))
    assert mx.array_equal(a.init_params(0)["prompt"], want).item()
    a = attach(tiny, "prompt", {"init": "vocab"})
    rows = np.asarray(tiny.model.model.embed_tokens.weight)
    got = np.asarray(a.init_params(3)["prompt"])
    assert all((np.abs(rows - g).max(axis=1) == 0).any() for g in got)  # each is a vocab row


def test_prefix_inits(tiny):
    a = attach(tiny, "prefix", {"init": "text", "init_text": "input label text"})
    ids = tiny.tokenizer.encode("input label text", add_special_tokens=False)
    kv = a.real_kv((ids * 2)[:5])
    p = a.init_params(0)
    for l, (k, v) in enumerate(kv):
        assert mx.allclose(p["keys"][l], k).item() and mx.allclose(p["values"][l], v).item()
    a = attach(tiny, "prefix", {}, num_virtual_tokens=64)
    p = a.init_params(0)
    for l, (sk, sv) in enumerate(a.kv_std()):
        assert abs(float(mx.std(p["keys"][l]).item()) - sk) < 0.1 * sk
        assert abs(float(mx.std(p["values"][l]).item()) - sv) < 0.1 * sv


# --- exactness against explicit single-sequence references -----------------------------------

@pytest.mark.parametrize("method,cfg", [CASES[0], CASES[6], CASES[7]],
                         ids=["prompt", "ptuning-mlp", "ptuning-lstm"])
def test_virtual_tokens_match_one_sequence_reference(tiny, method, cfg):
    """scores == log-probs of the labels when [virtual; prompt; label] runs as ONE sequence."""
    a = attach(tiny, method, cfg)
    p = a.init_params(0)
    virtual = p["prompt"] if method == "prompt" else a.virtual_tokens(p)
    V = virtual.shape[0]
    batch = make_batch(tiny)
    scores = a.scores(p, batch)
    model = tiny.model
    for b in range(batch.size):
        n = int(batch.prompt_len[b].item())
        for c in range(batch.label_tokens.shape[0]):
            m = int(batch.label_len[c].item())
            toks = mx.concatenate([batch.prompt[b, :n], batch.label_tokens[c, :m]])
            emb = mx.concatenate([virtual.astype(mx.float32), model.model.embed_tokens(toks)])
            logits = model(mx.zeros((1, V + n + m), mx.int32), input_embeddings=emb[None])[0]
            ref = label_logprob(logits, V + n - 1, batch.label_tokens[c, :m].tolist())
            assert _rel_close(scores[b, c].item(), ref), (b, c, scores[b, c].item(), ref)


@pytest.mark.parametrize("cfg", [CASES[3][1], CASES[5][1]], ids=["plain", "projection"])
def test_prefix_matches_prefilled_kvcache_reference(tiny, cfg):
    """scores == label log-probs with mlx-lm's real KVCache pre-filled with the prefix."""
    from mlx_lm.models.cache import KVCache

    a = attach(tiny, "prefix", cfg)
    p = a.init_params(0)
    keys, values = a.prefix_kv(p)
    batch = make_batch(tiny)
    scores = a.scores(p, batch)
    for b in range(batch.size):
        n = int(batch.prompt_len[b].item())
        for c in range(batch.label_tokens.shape[0]):
            m = int(batch.label_len[c].item())
            caches = [KVCache() for _ in range(tiny.num_layers)]
            for l, cache in enumerate(caches):
                cache.update_and_fetch(keys[l][None], values[l][None])
            toks = mx.concatenate([batch.prompt[b, :n], batch.label_tokens[c, :m]])
            logits = tiny.model(toks[None], cache=caches)[0]
            ref = label_logprob(logits, n - 1, batch.label_tokens[c, :m].tolist())
            assert _rel_close(scores[b, c].item(), ref), (b, c, scores[b, c].item(), ref)
    # The prefix is not a no-op (documented): scores differ from the base model's.
    plain = score_candidates(tiny.model, batch)
    assert not mx.allclose(plain, scores, atol=1e-3).item()


def test_functional_lstm_matches_mlx_nn_lstm():
    import mlx.nn as nn
    from metapeft.adapters.ptuning import lstm, lstm_init

    p = lstm_init(mx.random.key(0), 6, 5)
    ref = nn.LSTM(6, 5)
    ref.update(p)
    x = mx.random.normal((7, 6), key=mx.random.key(1))
    assert mx.allclose(lstm(p, x), ref(x)[0], atol=1e-6).item()


# --- gradients, training, vmap ---------------------------------------------------------------

@pytest.mark.parametrize("method,cfg", CASES, ids=IDS)
def test_gradients_reach_every_leaf(tiny, method, cfg):
    a = attach(tiny, method, cfg)
    p = a.init_params(0)
    batch = make_batch(tiny)
    g = mx.grad(lambda q: a.scores(q, batch)[mx.arange(3), batch.labels].sum())(p)
    fp, fg = a.flat(p), a.flat(g)
    assert set(fp) == set(fg)
    for k in fp:
        assert fg[k].shape == fp[k].shape
        assert bool(mx.all(mx.isfinite(fg[k])).item()), k
        assert float(mx.abs(fg[k]).max().item()) > 0, f"zero gradient for {k}"
    # The frozen base model exposes nothing trainable: gradients can only reach the adapter tree.
    assert tree_flatten(tiny.model.trainable_parameters()) == []


@pytest.mark.parametrize("method,cfg", MAIN, ids=MAIN_IDS)
def test_training_decreases_loss_and_leaves_base_untouched(tiny, small_task, method, cfg):
    from metapeft.train import encode_task, train

    before = {k: np.array(v) for k, v in tree_flatten(tiny.model.parameters())}
    a = attach(tiny, method, cfg)
    p = a.init_params(0)
    p_copy = tree_map(lambda x: mx.array(x), p)
    data = encode_task(small_task, tiny.tokenizer)
    res = train(a, p, data, steps=10, lr=1e-2, evaluate_query=False)
    assert len(res.losses) == 10 and all(math.isfinite(v) for v in res.losses)
    assert res.losses[-1] < res.losses[0] - 1e-3, res.losses
    print(f"\n{method} {cfg}: {1000 * res.train_seconds / 10:.1f} ms/step, "
          f"loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}")
    # the caller's init is intact and the shared base model is unchanged
    assert all(mx.array_equal(x, y).item() for (_, x), (_, y) in
               zip(tree_flatten(p), tree_flatten(p_copy)))
    after = dict(tree_flatten(tiny.model.parameters()))
    assert set(after) == set(before)
    assert all(np.array_equal(before[k], np.array(after[k])) for k in before)


@pytest.mark.parametrize("method,cfg", MAIN, ids=MAIN_IDS)
def test_vmap_over_stacked_params(tiny, method, cfg):
    a = attach(tiny, method, cfg)
    ps = [a.init_params(s) for s in (0, 1, 2)]
    stacked = tree_map(lambda *xs: mx.stack(xs), *ps)
    batch = make_batch(tiny)
    out = mx.vmap(lambda q: a.scores(q, batch))(stacked)
    assert out.shape == (3, batch.size, 3)
    for i, q in enumerate(ps):
        assert mx.allclose(out[i], a.scores(q, batch), atol=1e-4, rtol=1e-4).item()


# --- save / load -------------------------------------------------------------------------------

@pytest.mark.parametrize("method,cfg", MAIN, ids=MAIN_IDS)
def test_safetensors_round_trip(tiny, tmp_path, method, cfg):
    a = attach(tiny, method, cfg)
    p = a.init_params(4)
    path = str(tmp_path / "adapter.safetensors")
    mx.save_safetensors(path, a.flat(p), metadata=a.metadata())
    flat, meta = mx.load(path, return_metadata=True)
    q = a.check_compatible(a.unflat(flat), meta, path)
    batch = make_batch(tiny)
    assert mx.array_equal(a.scores(p, batch), a.scores(q, batch)).item()
    # an adapter with another shape refuses it
    other = attach(tiny, method, cfg, num_virtual_tokens=3)
    with pytest.raises(UserError):
        other.check_compatible(q, meta, path)


# --- config validation -------------------------------------------------------------------------

@pytest.mark.parametrize("method,cfg,field", [
    ("prompt", {"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ("prompt", {"init": "zeros"}, "init"),
    ("prompt", {"init": "text", "init_text": "  "}, "init_text"),
    ("prefix", {"num_virtual_tokens": -2}, "num_virtual_tokens"),
    ("prefix", {"encoder_hidden_size": 0}, "encoder_hidden_size"),
    ("prefix", {"init": "text", "prefix_projection": True}, "init"),
    ("prefix", {"prefix_projection": "yes"}, "prefix_projection"),
    ("ptuning", {"encoder_type": "gru"}, "encoder_type"),
    ("ptuning", {"encoder_hidden_size": -1}, "encoder_hidden_size"),
    ("ptuning", {"encoder_num_layers": 0}, "encoder_num_layers"),
])
def test_config_validation(tiny, method, cfg, field):
    cls = get_adapter_class(method)
    with pytest.raises(UserError) as e:
        cls.attach(tiny, cfg)
    assert e.value.field == field
    with pytest.raises(UserError) as e:  # a dataclass instance is validated too
        cls.attach(tiny, cls.Config(**cfg))
    assert e.value.field == field


@pytest.mark.parametrize("method", ["prompt", "prefix", "ptuning"])
def test_unknown_option_and_config_round_trip(tiny, method):
    cls = get_adapter_class(method)
    with pytest.raises(UserError):
        cls.attach(tiny, {"num_virtual_tokenz": 4})
    a = cls.attach(tiny)
    assert a.method == method
    assert cls.Config.from_dict(a.config.to_dict()) == a.config


def test_untokenisable_init_text_is_a_user_error(tiny):
    with pytest.raises(UserError) as e:
        get_adapter_class("prompt").attach(tiny, {"init": "text", "init_text": "\n"})
    assert e.value.field == "init_text"


@pytest.mark.parametrize("method,cfg", [CASES[0], CASES[3], CASES[7]],
                         ids=["prompt", "prefix", "ptuning-lstm"])
def test_real_model_matches_reference(stories, method, cfg):
    """The same exactness checks on stories260K (5 layers, 8 heads / 4 KV heads, head_dim 8)."""
    from mlx_lm.models.cache import KVCache

    a = attach(stories, method, cfg)
    p = a.init_params(0)
    batch = make_batch(stories, seed=1)
    scores = a.scores(p, batch)
    model = stories.model
    for b in range(batch.size):
        n = int(batch.prompt_len[b].item())
        for c in range(batch.label_tokens.shape[0]):
            m = int(batch.label_len[c].item())
            toks = mx.concatenate([batch.prompt[b, :n], batch.label_tokens[c, :m]])
            if method == "prefix":
                keys, values = a.prefix_kv(p)
                caches = [KVCache() for _ in range(stories.num_layers)]
                for l, cache in enumerate(caches):
                    cache.update_and_fetch(keys[l][None], values[l][None])
                logits, start = model(toks[None], cache=caches)[0], n - 1
            else:
                virtual = p["prompt"] if method == "prompt" else a.virtual_tokens(p)
                V = virtual.shape[0]
                emb = mx.concatenate([virtual, model.model.embed_tokens(toks)])
                logits = model(mx.zeros((1, V + n + m), mx.int32), input_embeddings=emb[None])[0]
                start = V + n - 1
            ref = label_logprob(logits, start, batch.label_tokens[c, :m].tolist())
            assert _rel_close(scores[b, c].item(), ref), (b, c, scores[b, c].item(), ref)

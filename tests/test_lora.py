"""LoRA/DoRA: the peft formula, no-op init, gradients only on the adapter, and mlx-lm loading."""

import math

import mlx.core as mx
import numpy as np
import pytest

from metapeft.adapters.lora import LoRA
from metapeft.api import adapt
from metapeft.scoring import TaskEncoder
from metapeft.train import batch_loss, encode_task


def test_fresh_lora_is_noop_and_formula(tiny, small_task):
    ad = LoRA.attach(tiny, {"rank": 4, "alpha": 8.0})
    p = ad.init_params(0)
    enc = TaskEncoder(tiny.tokenizer, small_task.labels)
    batch = enc.encode(small_task.query[:4])
    from metapeft.scoring import score_candidates

    base = score_candidates(tiny.model, batch)
    assert np.allclose(np.array(ad.scores(p, batch)), np.array(base), atol=1e-5)
    # y = Wx + (alpha/r) B A x, in peft's (r, in)/(out, r) layout == mlx-lm's transposed layout
    layer = ad.model.layers[0].self_attn.q_proj
    a = mx.random.normal(layer.lora_a.shape)
    b = mx.random.normal(layer.lora_b.shape)
    layer.lora_a, layer.lora_b = a, b
    x = mx.random.normal((3, a.shape[0]))
    W = layer.linear.weight
    expected = x @ W.T + (8.0 / 4) * (x @ a.T.T) @ b.T.T  # (alpha/r) * x A^T B^T with A=a.T, B=b.T
    assert np.allclose(np.array(layer(x)), np.array(expected), atol=1e-4)
    assert math.isclose(LoRA.Config(rank=4, alpha=8, use_rslora=True).scale, 4.0)


def test_kaiming_uniform_bounds(tiny):
    p = LoRA.attach(tiny).init_params(3)
    a = p["model"]["layers"][0]["self_attn"]["q_proj"]["lora_a"]
    bound = 1 / math.sqrt(a.shape[0])
    assert float(mx.abs(a).max()) <= bound and float(mx.abs(a).max()) > 0.5 * bound
    assert float(mx.abs(p["model"]["layers"][0]["self_attn"]["q_proj"]["lora_b"]).max()) == 0.0


def test_gradients_only_adapter_leaves(tiny, small_task):
    ad = LoRA.attach(tiny)
    p = ad.init_params(0)
    data = encode_task(small_task, tiny.tokenizer)
    grads = mx.grad(lambda q: batch_loss(ad, q, data.support))(p)
    from mlx.utils import tree_flatten

    flat = dict(tree_flatten(grads))
    assert flat and all(k.endswith(("lora_a", "lora_b")) for k in flat)
    assert any(float(mx.abs(v).sum()) > 0 for k, v in flat.items() if k.endswith("lora_b"))
    # the frozen base was not touched
    assert "lora_a" not in str(tiny.model.layers[0].self_attn.q_proj)


def test_loss_decreases(tiny, small_task):
    r = adapt(small_task, method="lora", steps=8, lr=3e-3)
    assert r.losses[-1] < r.losses[0]
    assert len(r.accuracies) == 9


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_mlx_lm_loads_adapter_with_identical_logits(tiny, small_task, tmp_path, method):
    from mlx_lm import load

    r = adapt(small_task, method=method, steps=3, lr=1e-2, out=tmp_path / "a")
    model, tok = load(tiny.path, adapter_path=str(tmp_path / "a"))
    model.eval()
    x = mx.array([tok.encode("input : rain forecast storm label :")])
    ours = r.adapter.model
    ours.update(r.params)
    ours.eval()
    assert np.allclose(np.array(model(x)), np.array(ours(x)), atol=1e-5)
    # and trained weights are not a no-op
    assert not np.allclose(np.array(tiny.model(x)), np.array(ours(x)), atol=1e-4)


def test_stories260k_round_trip(stories, tmp_path):
    from mlx_lm import load

    from metapeft.data.synthetic import generate_task

    task = generate_task(1, family="sentiment", ways=3, shots=2, query=2)
    r = adapt(task, model=stories.path, method="lora", steps=2, lr=1e-2, out=tmp_path / "s")
    model, tok = load(stories.path, adapter_path=str(tmp_path / "s"))
    x = mx.array([tok.encode("Once upon a time")])
    ours = r.adapter.model
    ours.update(r.params)
    assert np.allclose(np.array(model(x)), np.array(ours(x)), atol=1e-4)

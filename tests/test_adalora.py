"""AdaLoRA: SVD-form LoRA with peft's RankAllocator (see ``metapeft/adapters/adalora.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import metapeft  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from metapeft.adapters import get_adapter_class
from metapeft.errors import UserError
from metapeft.scoring import classification_loss


@pytest.fixture
def data(tiny, small_task):
    from metapeft.train import encode_task

    return encode_task(small_task, tiny.tokenizer)


def _adapter(tiny, **cfg):
    return get_adapter_class("adalora").attach(tiny, cfg)


def _base_scores(tiny, batch):
    from metapeft.scoring import score_candidates

    return score_candidates(tiny.model, batch)


def _nonzero_E(params) -> int:
    return sum(int(np.count_nonzero(np.array(v))) for k, v in tree_flatten(params)
               if k.endswith("lora_E"))


def test_config_defaults_and_validation():
    from metapeft.adapters.adalora import AdaLoRAConfig

    c = AdaLoRAConfig()
    assert (c.init_r, c.target_r, c.lora_alpha, c.beta1, c.beta2, c.orth_reg_weight) == \
        (12, 8, 32.0, 0.85, 0.85, 0.5)
    assert len(c.target_modules) == 7 and c.total_step is None
    for bad, fld in [({"init_r": 0}, "init_r"), ({"target_r": 13}, "target_r"),
                     ({"beta1": 1.0}, "beta1"), ({"deltaT": 0}, "deltaT"),
                     ({"dropout": 1.0}, "dropout"),
                     ({"tinit": 5, "tfinal": 5, "total_step": 10}, "tinit")]:
        with pytest.raises(UserError) as e:
            AdaLoRAConfig.from_dict(bad)
        assert e.value.field == fld
    with pytest.raises(UserError):
        AdaLoRAConfig.from_dict({"rank": 4})


def test_fresh_adapter_is_noop(tiny, data):
    ad = _adapter(tiny)
    params = ad.init_params(0)
    assert {k.rsplit(".", 1)[-1] for k, _ in tree_flatten(params)} == {"lora_A", "lora_E", "lora_B"}
    assert len(ad.module_names) == 7 * tiny.num_layers
    b = data.query[0]
    np.testing.assert_array_equal(np.array(ad.scores(params, b)), np.array(_base_scores(tiny, b)))
    # A and B ~ N(0, 0.02), E = 0 (peft reset_lora_parameters)
    flat = dict(tree_flatten(params))
    a = np.array(flat["model.layers.0.self_attn.q_proj.lora_A"])
    assert a.shape == (12, tiny.hidden_size) and 0.015 < a.std() < 0.025
    assert flat["model.layers.0.mlp.down_proj.lora_B"].shape == (tiny.hidden_size, 12)


def test_gradients_only_on_svd_leaves(tiny, data):
    ad = _adapter(tiny)
    params = ad.init_params(0)
    b = data.support[0]

    def loss(p):
        return classification_loss(ad.scores(p, b), b)

    grads = mx.grad(loss)(params)
    flat = dict(tree_flatten(grads))
    assert set(flat) == set(dict(tree_flatten(params)))
    assert all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_E", "lora_B") for k in flat)
    # with E = 0 only E receives a gradient; it must be nonzero
    e_norm = sum(float(mx.abs(v).sum()) for k, v in flat.items() if k.endswith("lora_E"))
    assert e_norm > 0
    ab_norm = sum(float(mx.abs(v).sum()) for k, v in flat.items() if not k.endswith("lora_E"))
    assert ab_norm == 0.0


def test_forward_matches_svd_formula(tiny):
    from metapeft.adapters.adalora import SVDLinear
    import mlx.nn as nn

    lin = nn.Linear(6, 5, bias=False)
    m = SVDLinear(lin, r=3, scaling=32.0)
    m.lora_A = mx.random.normal((3, 6), key=mx.random.key(1))
    m.lora_E = mx.random.normal((3, 1), key=mx.random.key(2))
    m.lora_B = mx.random.normal((5, 3), key=mx.random.key(3))
    x = mx.random.normal((2, 6), key=mx.random.key(4))
    A, E, B, W = (np.array(t) for t in (m.lora_A, m.lora_E, m.lora_B, lin.weight))
    want = np.array(x) @ W.T + np.array(x) @ (A * E).T @ B.T * 32.0 / (3 + 1e-5)
    np.testing.assert_allclose(np.array(m(x)), want, rtol=1e-5, atol=1e-5)


def test_regularizer_orthonormal_zero(tiny):
    ad = _adapter(tiny)
    params = ad.init_params(0)
    reg = float(ad.regularizer(params))
    assert reg > 0
    # peft: w * mean over all A and B of the (unsquared) Frobenius norm ||P P^T - I||
    flat = dict(tree_flatten(params))
    terms = []
    for k, v in flat.items():
        v = np.array(v, dtype=np.float64)
        if k.endswith("lora_A"):
            terms.append(np.linalg.norm(v @ v.T - np.eye(v.shape[0])))
        elif k.endswith("lora_B"):
            terms.append(np.linalg.norm(v.T @ v - np.eye(v.shape[1])))
    assert len(terms) == 2 * len(ad.module_names)
    assert reg == pytest.approx(0.5 * np.mean(terms), rel=1e-4)

    # orthonormal rows of A and columns of B -> 0
    rng = np.random.default_rng(0)
    ortho = {}
    for k, v in flat.items():
        if k.endswith("lora_A"):
            q, _ = np.linalg.qr(rng.normal(size=(v.shape[1], v.shape[0])))
            ortho[k] = mx.array(q.T.astype(np.float32))
        elif k.endswith("lora_B"):
            q, _ = np.linalg.qr(rng.normal(size=v.shape))
            ortho[k] = mx.array(q.astype(np.float32))
        else:
            ortho[k] = v
    p2 = ad.unflat(ortho)
    assert float(ad.regularizer(p2)) < 1e-5
    g = mx.grad(ad.regularizer)(p2)
    assert all(np.isfinite(np.array(v)).all() for _, v in tree_flatten(g))
    assert _adapter(tiny, orth_reg_weight=0.0).regularizer(params) is None


def test_budget_schedule_matches_peft_formula(tiny):
    ad = _adapter(tiny, tinit=10, tfinal=20, deltaT=5)
    n = len(ad.module_names)
    init_bgt, target_bgt, T = 12 * n, 8 * n, 100
    assert (ad.init_bgt, ad.target_bgt) == (init_bgt, target_bgt)

    def expected(step):  # written out from peft's RankAllocator.budget_schedule
        if step <= 10:
            return init_bgt, False
        if step > T - 20:
            return target_bgt, True
        frac = (step - 10) / (T - 20 - 10)
        return math.floor((init_bgt - target_bgt) * (1 - frac) ** 3 + target_bgt), step % 5 == 0

    assert ad.schedule(10, T) == (init_bgt, False)  # tinit: warmup, no mask
    assert ad.schedule(45, T) == expected(45)  # middle of the budgeting phase
    assert ad.schedule(45, T)[0] == int(56 * 0.5 ** 3 + 112) == 119
    assert ad.schedule(47, T) == (expected(47)[0], False)
    assert ad.schedule(80, T) == (target_bgt, True)  # T - tfinal: cubic reaches the target
    assert ad.schedule(81, T) == (target_bgt, True)  # final fine-tuning
    for s in range(0, T + 1):
        assert ad.schedule(s, T) == expected(s)
    # config.total_step overrides the train loop's count
    ad2 = _adapter(tiny, tinit=10, tfinal=20, deltaT=5, total_step=100)
    assert ad2.schedule(45, 7) == expected(45)


def test_training_masks_to_budget(tiny, data):
    from metapeft.train import train

    ad = _adapter(tiny, tinit=2, tfinal=2, deltaT=1)
    params = ad.init_params(0)
    res = train(ad, params, data, steps=8, lr=3e-3, evaluate_query=False)
    # at step T - tfinal the mask is forced to target_r * n_modules and kept afterwards
    assert _nonzero_E(res.params) == ad.target_bgt == 8 * len(ad.module_names)
    assert sum(ad.rank_counts(res.params).values()) == ad.target_bgt
    state = res.extra["hook_state"]
    assert state["final"] and state["budget"] == ad.target_bgt
    assert sum(int(v.sum()) for v in state["pattern"].values()) == ad.target_bgt
    # a new run starts from a fresh state: every rank kept, no sensitivities
    fresh = ad.init_state(res.params)
    assert not fresh["scored"] and sum(int(v.sum()) for v in fresh["pattern"].values()) == ad.init_bgt
    # mid-budget: the mask applied at a budgeting step leaves exactly that step's budget
    ad = _adapter(tiny, tinit=1, tfinal=0, deltaT=1, total_step=20)
    p = ad.init_params(0)
    res = train(ad, p, data, steps=4, lr=3e-3, evaluate_query=False)
    budget = res.extra["hook_state"]["budget"]
    assert _nonzero_E(res.params) == ad.schedule(4, 20)[0] == budget
    assert ad.target_bgt < budget < ad.init_bgt


def test_on_step_without_grads(tiny):
    ad = _adapter(tiny, tinit=0, tfinal=0)
    params = ad.init_params(0)
    out, state = ad.on_step(params, None, ad.init_state(params), 1, 10)
    assert _nonzero_E(out) == 0 and not state["scored"]
    out, state = ad.on_step(params, None, state, 10, 10)  # forced mask, no sensitivities: no-op
    assert out is params and not state["final"]


def test_sensitivity_ema_matches_peft(tiny):
    ad = _adapter(tiny)
    params = ad.init_params(0)
    params = tree_map(lambda v: v + 0.1, params)
    grads = tree_map(lambda v: mx.ones_like(v) * 0.5, params)
    _, state = ad.on_step(params, grads, ad.init_state(params), 1, 100)
    g2 = tree_map(lambda v: mx.ones_like(v) * -2.0, params)
    _, state = ad.on_step(params, g2, state, 2, 100)
    k = "model.layers.1.mlp.up_proj.lora_A"
    p = np.array(dict(tree_flatten(params))[k])
    i1, i2 = np.abs(p * 0.5), np.abs(p * -2.0)
    avg1 = 0.15 * i1
    unc1 = 0.15 * np.abs(i1 - avg1)
    avg2 = 0.85 * avg1 + 0.15 * i2
    unc2 = 0.85 * unc1 + 0.15 * np.abs(i2 - avg2)
    np.testing.assert_allclose(np.array(state["ipt"][k]), avg2, rtol=1e-5)
    np.testing.assert_allclose(np.array(state["unc"][k]), unc2, rtol=1e-5)
    # the triplet score combines E's score with the row-mean of A and column-mean of B
    name = "model.layers.1.mlp.up_proj"
    s = {leaf: np.array(state["ipt"][f"{name}.{leaf}"]) * np.array(state["unc"][f"{name}.{leaf}"])
         for leaf in ("lora_A", "lora_E", "lora_B")}
    want = s["lora_E"][:, 0] + s["lora_A"].mean(axis=1) + s["lora_B"].mean(axis=0)
    np.testing.assert_allclose(np.array(ad.triplet_scores(state)[name]), want, rtol=1e-5)


def test_loss_decreases(tiny, data):
    from metapeft.train import train

    ad = _adapter(tiny, tinit=2, tfinal=3)
    res = train(ad, ad.init_params(0), data, steps=10, lr=3e-3, evaluate_query=False)
    assert len(res.losses) == 10 and all(np.isfinite(res.losses))
    assert res.losses[-1] < res.losses[0]


def test_save_load_roundtrip(tiny, data, tmp_path):
    from metapeft.train import train

    ad = _adapter(tiny, tinit=1, tfinal=1)
    res = train(ad, ad.init_params(0), data, steps=4, lr=3e-3, evaluate_query=False)
    path = str(tmp_path / "adapters.safetensors")
    mx.save_safetensors(path, ad.flat(res.params), metadata=ad.metadata(res.params))
    loaded, meta = mx.load(path, return_metadata=True)
    params = ad.check_compatible(ad.unflat(loaded), meta, path)
    assert meta["method"] == "adalora" and "rank_pattern" in meta
    b = data.query[0]
    want = np.array(ad.scores(ad.scoring_params(res.params), b))
    ad2 = _adapter(tiny, tinit=1, tfinal=1)  # a fresh adapter instance
    got = np.array(ad2.scores(ad2.scoring_params(params), b))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want, np.array(_base_scores(tiny, b)))

"""Per-layer inner learning rates (MAML++'s LSLR, ``MetaConfig.inner_lr_mode="per-layer"``):
second-order MAML's gradient with respect to the log-multipliers against finite differences, the
first-order hypergradient's sign, storage with the published weights (``inner_lr.*``), their use
by ``adapt``, and old weights without them."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from typer.testing import CliRunner

from metapeft.adapters import get_adapter_class
from metapeft.data.synthetic import generate_task
from metapeft.meta.batch import encode_episode, stack_episodes
from metapeft.meta.learner import (LOG_LR_CLIP, MetaConfig, MetaLearner, init_log_lr,
                                   inner_adapt, task_contribution)
from metapeft.train import batch_loss


def _episode(tok, seed=0, shots=2):
    return encode_episode(generate_task(seed, family="topic", ways=3, shots=shots, query=2,
                                        length=6), tok)


def _perturbed(adapter, scale=0.05):
    th = adapter.init_params(0)
    return tree_map(lambda x: x + scale * mx.random.normal(x.shape, key=mx.random.key(1)), th)


def test_maml_log_lr_gradient_matches_finite_differences(tiny):
    """Second-order MAML differentiates the query loss through the unrolled inner loop with
    respect to every leaf's log-multiplier s: checked against a central difference along a
    random direction in s, at s ≠ 0."""
    ad = get_adapter_class("lora").attach(tiny)
    th = _perturbed(ad)
    e = _episode(tiny.tokenizer)
    cfg = MetaConfig(algorithm="maml", inner_steps=2, inner_lr=0.1, inner_optimizer="sgd",
                     inner_lr_mode="per-layer")
    flat = tree_flatten(init_log_lr(th))
    keys = mx.random.split(mx.random.key(7), 2 * len(flat))
    s0 = {k: 0.3 * mx.random.normal((), key=keys[i]) for i, (k, _) in enumerate(flat)}
    d = {k: mx.random.normal((), key=keys[len(flat) + i]) for i, (k, _) in enumerate(flat)}
    log_lr = tree_unflatten(list(s0.items()))
    _, _, g = task_contribution(ad, cfg, th, e.support, e.query, log_lr=log_lr)
    assert set(g) == {"theta", "log_lr"}
    an = sum(float(v.item() * d[k].item()) for k, v in tree_flatten(g["log_lr"]))

    def outer(s: dict) -> float:
        return batch_loss(ad, inner_adapt(ad, th, e.support, cfg, tree_unflatten(list(s.items()))),
                          e.query).item()

    h = 1e-2
    fd = (outer({k: v + h * d[k] for k, v in s0.items()})
          - outer({k: v - h * d[k] for k, v in s0.items()})) / (2 * h)
    assert abs(fd) > 1e-4, fd  # the test measures something
    assert abs(an - fd) <= 0.03 * abs(fd) + 1e-4, (an, fd)
    # θ's gradient in per-layer mode at s = 0 is plain MAML's
    _, _, g_plain = task_contribution(ad, MetaConfig(algorithm="maml", inner_steps=2,
                                                     inner_lr=0.1, inner_optimizer="sgd"),
                                      th, e.support, e.query)
    _, _, g_zero = task_contribution(ad, cfg, th, e.support, e.query, log_lr=init_log_lr(th))
    zero = dict(tree_flatten(g_zero["theta"]))
    for k, a in tree_flatten(g_plain):
        assert np.allclose(np.array(a), np.array(zero[k]), atol=1e-6), k


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
def test_first_order_hypergradient_raises_a_too_small_lr(tiny, algorithm):
    """A constructed case: an inner lr far too small (Adam, 1e-4, 2 steps) on a task whose query
    is its own support set, so stepping further lowers the query loss. The first-order
    hypergradient dL_q/ds is then negative (truly: raising every multiplier ×e^0.5 lowers the
    adapted loss), and one meta-step raises the multipliers."""
    ad = get_adapter_class("lora").attach(tiny)
    th = _perturbed(ad)
    e = _episode(tiny.tokenizer, seed=3, shots=3)
    cfg = MetaConfig(algorithm=algorithm, inner_steps=2, inner_lr=1e-4,
                     inner_lr_mode="per-layer", inner_lr_meta_lr=0.1)
    s0 = init_log_lr(th)
    _, _, g = task_contribution(ad, cfg, th, e.support, e.support, log_lr=s0)
    total = sum(v.item() for _, v in tree_flatten(g["log_lr"]))
    assert total < 0, total

    def adapted_loss(s):
        return batch_loss(ad, inner_adapt(ad, th, e.support, cfg, s), e.support).item()

    assert adapted_loss(tree_map(lambda v: v + 0.5, s0)) < adapted_loss(s0)
    ml = MetaLearner(ad, cfg, vectorise=False)
    ml.init_outer(th)
    ml.step(th, [(stack_episodes([e])[0], stack_episodes([e])[0])], 0, 10)
    after = [v.item() for _, v in tree_flatten(ml.log_lr)]
    assert np.mean(after) > 0 and max(abs(v) for v in after) <= LOG_LR_CLIP


def test_shared_mode_is_unchanged(tiny):
    """The default (shared) mode holds no multipliers and its meta-step is the old one."""
    ad = get_adapter_class("prompt").attach(tiny)
    th = ad.init_params(0)
    e = _episode(tiny.tokenizer)
    S, Q = stack_episodes([e])
    cfg = MetaConfig(algorithm="reptile", inner_steps=2, inner_lr=0.01, outer_lr=0.8)
    ml = MetaLearner(ad, cfg, vectorise=False)
    ml.init_outer(th)
    new, _, _ = ml.step(th, [(S, Q)], 0, 10)
    assert ml.log_lr is None
    phi = inner_adapt(ad, th, e.support, cfg)
    want = th["prompt"] + 0.8 * (phi["prompt"] - th["prompt"])
    assert np.allclose(np.array(new["prompt"]), np.array(want), atol=1e-5)


def test_multipliers_are_published_loaded_and_applied(tiny, tmp_path):
    from metapeft import api, registry as reg
    from metapeft.adapter_io import init_lr_scales, resolve_init
    from metapeft.artifacts import load_safetensors, read_metadata
    from metapeft.cli import app

    root = tmp_path / "reg"
    rep = api.meta_train("synthetic", model="tiny", name="ls", registry=root, meta_steps=3,
                         meta_batch=2, inner_steps=2, eval_every=1, eval_episodes=2,
                         calibrate_lr=False, algorithm="fomaml", inner_lr_mode="per-layer",
                         inner_lr_meta_lr=0.3)
    arrays, meta = load_safetensors(rep.path)
    stored = {k: v for k, v in arrays.items() if k.startswith("inner_lr.")}
    ad = get_adapter_class("lora").attach(tiny)
    names = {k for k, _ in tree_flatten(ad.init_params(0))}
    assert {k[len("inner_lr."):] for k in stored} == names
    want = {k: float(np.exp(v.item())) for k, v in tree_flatten(rep.result.best_log_lr)}
    scales = init_lr_scales("ls", root)
    assert scales.keys() == want.keys()
    assert all(abs(scales[k] - want[k]) < 1e-5 for k in want)
    assert any(abs(v - 1) > 0.05 for v in scales.values())  # learned, not left at 1
    assert init_lr_scales("library:merge:2+ls", root) == scales  # a merge trains INIT itself
    assert init_lr_scales("library:compose:2+ls", root) is None  # a mixture is not INIT
    assert meta["inner_lr_mode"] == "per-layer"
    shown = reg.show("ls", root)
    assert shown["num_tensors"] == len(names)  # the multipliers are not parameters
    assert set(shown["metadata"]["inner_lr_scales"]) >= {"model.layers.self_attn.q_proj.lora_a"}
    # loaders ignore them: the init is exactly the published θ
    params = resolve_init(str(rep.path), ad)
    assert {k for k, _ in tree_flatten(params)} == names

    # the drift gate adapts a version as adapt would: with its multipliers
    from metapeft.drift import load_contender

    assert load_contender("ls", tiny, root).lr_scales == scales

    # weights show prints the summary
    out = CliRunner().invoke(app, ["weights", "show", "ls", "--registry", str(root)],
                             catch_exceptions=False)
    assert out.exit_code == 0 and "inner lrs" in out.output, out.output

    # the same θ without multipliers (old weights) and with all multipliers 1
    plain = {k: v for k, v in arrays.items() if not k.startswith("inner_lr.")}
    ones = {**plain, **{k: mx.ones_like(v) for k, v in stored.items()}}
    _, old_path = reg.save_version("old", plain, dict(read_metadata(rep.path)), root)
    _, ones_path = reg.save_version("ones", ones, dict(read_metadata(rep.path)), root)
    assert init_lr_scales(str(old_path)) is None
    task = generate_task(123, family="topic", ways=3, shots=4, query=4, length=6)

    def run(init, **kw):
        r = api.adapt(task, model="tiny", init=str(init), steps=4, lr=3e-3, **kw)
        return r, np.array(r.losses)

    r_on, l_on = run(rep.path)
    r_off, l_off = run(rep.path, inner_lr_scales=False)
    r_old, l_old = run(old_path)
    r_one, l_one = run(ones_path)
    assert r_on.to_json()["inner_lr_scales"]["applied"] is True
    assert r_off.to_json()["inner_lr_scales"]["applied"] is False
    assert "inner_lr_scales" not in r_old.to_json()
    assert l_on[0] == l_off[0]  # same init: same first loss
    assert np.abs(l_on[1:] - l_off[1:]).max() > 1e-4  # the multipliers change the steps
    assert np.array_equal(l_off, l_old) and np.array_equal(l_one, l_old)
    assert r_off.accuracies == r_old.accuracies == r_one.accuracies


def test_per_layer_checkpoint_resumes_the_multipliers(tiny, tmp_path):
    """A per-layer run stopped after its first checkpoint and resumed ends where the
    uninterrupted run ends, multipliers included (they and their Adam state are checkpointed)."""
    from metapeft.meta.run import meta_train
    from metapeft.meta.sources import build_meta_sources

    src = build_meta_sources("synthetic", ways=3, shots=2, query=2, val_fraction=0.2, seed=0)
    ad = get_adapter_class("lora").attach(tiny)
    cfg = dict(algorithm="reptile", inner_steps=2, inner_lr=1e-3, inner_lr_mode="per-layer",
               inner_lr_meta_lr=0.2)
    kw = dict(val_source=None, meta_batch=2, seed=0, checkpoint_every=2, vectorise=False)
    full = meta_train(ad, MetaConfig(**cfg), src.train, meta_steps=4,
                      checkpoint=tmp_path / "a.safetensors", **kw)
    # killed during meta-step 3 (the checkpoint of step 2 written), then resumed
    with pytest.raises(_Stop):
        meta_train(ad, MetaConfig(**cfg), src.train, meta_steps=4,
                   checkpoint=tmp_path / "b.safetensors", on_step=_stop_at(3), **kw)
    resumed = meta_train(ad, MetaConfig(**cfg), src.train, meta_steps=4,
                         checkpoint=tmp_path / "b.safetensors", resume=True, **kw)
    # compared by name: a tree read back from a checkpoint flattens in another order
    s_full, s_res = dict(tree_flatten(full.best_log_lr)), dict(tree_flatten(resumed.best_log_lr))
    assert s_full.keys() == s_res.keys()
    assert all(abs(s_full[k].item() - s_res[k].item()) < 1e-6 for k in s_full)
    assert any(abs(v.item()) > 1e-3 for v in s_full.values())
    t_full, t_res = dict(tree_flatten(full.theta)), dict(tree_flatten(resumed.theta))
    assert all(np.allclose(np.array(t_full[k]), np.array(t_res[k]), atol=1e-6) for k in t_full)
    assert resumed.meta_losses == full.meta_losses


class _Stop(Exception):
    pass


def _stop_at(step):
    def on_step(t, *_):
        if t == step:
            raise _Stop
    return on_step

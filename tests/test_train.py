"""The training step: eval-mode scoring, dropout that really resamples under mx.compile, the hook
that both the train loop and the meta-learner's inner loop run, and option validation."""

from __future__ import annotations

import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from metapeft.adapters import get_adapter_class
from metapeft.errors import UserError


@pytest.fixture
def data(tiny, small_task):
    from metapeft.train import encode_task

    return encode_task(small_task, tiny.tokenizer)


def _trained_lora(tiny, data, dropout):
    from metapeft.train import train

    ad = get_adapter_class("lora").attach(tiny, {"dropout": dropout})
    res = train(ad, ad.init_params(0), data, steps=3, lr=1e-2, evaluate_query=False)
    return ad, res.params


def test_scoring_ignores_dropout(tiny, data):
    """Defect 1: with dropout > 0 the query was scored in training mode, so evaluating the same
    parameters three times gave three different accuracies."""
    from metapeft.train import evaluate

    ad, params = _trained_lora(tiny, data, dropout=0.5)
    runs = {evaluate(ad, params, data.query) for _ in range(3)}
    assert len(runs) == 1, runs
    # and it equals the same adapter without dropout (dropout is the identity at eval time)
    plain = get_adapter_class("lora").attach(tiny, {"dropout": 0.0})
    assert evaluate(plain, params, data.query) == runs.pop()


def test_compiled_step_resamples_dropout(tiny, data):
    """Defect 2: the compiled step kept no random state, so the dropout mask was frozen at trace
    time and an unchanged model gave the same loss at every step. With lr = 0 the parameters do not
    move, so differing losses can only come from fresh masks."""
    from metapeft.train import train

    ad = get_adapter_class("lora").attach(tiny, {"dropout": 0.5})
    # dropout acts on A's input, which B = 0 would hide: give B weight first
    params = tree_unflatten([(k, v + 0.05 if k.endswith("lora_b") else v)
                             for k, v in tree_flatten(ad.init_params(0))])
    res = train(ad, params, data, steps=4, lr=0.0, optimizer="sgd", evaluate_query=False,
                compile=True)
    assert len(set(np.round(res.losses, 7))) > 1, res.losses
    again = train(ad, params, data, steps=4, lr=0.0, optimizer="sgd", evaluate_query=False,
                  compile=True)
    assert again.losses == res.losses  # same seed, same masks: reproducible


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
def test_maml_with_inner_adam_is_finite_at_fresh_init(tiny, method):
    """Defect 3: second-order MAML through mlx's Adam is NaN where a gradient is exactly 0 (B = 0
    at a fresh LoRA/DoRA, E = 0 at AdaLoRA): d sqrt(v)/dv is infinite at 0."""
    from metapeft.data.synthetic import generate_task
    from metapeft.meta.batch import encode_episode
    from metapeft.meta.learner import MetaConfig, task_contribution

    ad = get_adapter_class(method).attach(tiny)
    e = encode_episode(generate_task(0, family="topic", ways=3, shots=2, query=2, length=6),
                       tiny.tokenizer)
    cfg = MetaConfig(algorithm="maml", inner_steps=2, inner_lr=1e-3, inner_optimizer="adam")
    loss, _, grads = task_contribution(ad, cfg, ad.init_params(0), e.support, e.query)
    flat = [np.array(v) for _, v in tree_flatten(grads)]
    assert np.isfinite(float(loss))
    assert all(np.isfinite(g).all() for g in flat)
    assert any(np.abs(g).max() > 0 for g in flat)


def test_adalora_allocates_inside_the_meta_inner_loop(tiny):
    """Defect 4: the rank allocator never ran in the meta-learner's inner loop, so meta-training
    adapted a different AdaLoRA than test time. Now inner_adapt masks to the target budget as
    ``adapt`` does, also under mx.vmap."""
    from metapeft.data.synthetic import generate_task
    from metapeft.meta.batch import encode_episode, stack_episodes
    from metapeft.meta.learner import MetaConfig, MetaLearner, inner_adapt

    ad = get_adapter_class("adalora").attach(tiny, {"tinit": 0, "tfinal": 1})
    eps = [encode_episode(generate_task(s, family="topic", ways=3, shots=2, query=2, length=6),
                          tiny.tokenizer) for s in range(2)]
    cfg = MetaConfig(algorithm="reptile", inner_steps=3, inner_lr=1e-2)
    phi = inner_adapt(ad, ad.init_params(0), eps[0].support, cfg)
    kept = sum(int(np.count_nonzero(np.array(v))) for k, v in tree_flatten(phi)
               if k.endswith("lora_E"))
    assert kept == ad.target_bgt
    # vectorised (and compiled) meta-steps run it too, or fall back without crashing
    for compile_ in (False, True):
        ml = MetaLearner(ad, cfg, vectorise=True, compile=compile_)
        theta, loss, _ = ml.step(ad.init_params(0), [stack_episodes(eps)], 0, 4)
        assert np.isfinite(loss)
        assert all(np.isfinite(np.array(v)).all() for _, v in tree_flatten(theta))


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_num_layers_zero_is_refused(tiny, method):
    """Defect 6b: num_layers=0 adapted every block for LoRA (mlx-lm reads layers[-0:]) and none for
    AdaLoRA. It is refused for both; -1 means every block."""
    with pytest.raises(UserError) as e:
        get_adapter_class(method).attach(tiny, {"num_layers": 0})
    assert e.value.field == "num_layers"
    ad = get_adapter_class(method).attach(tiny, {"num_layers": 1})
    names = {k.split(".layers.")[1].split(".")[0] for k, _ in tree_flatten(ad.init_params(0))}
    assert names == {str(tiny.num_layers - 1)}


def test_support_is_tokenised_once(tiny, small_task):
    """Minibatches are sliced from the support set without calling the tokenizer again."""
    from metapeft.train import encode_task, train

    data = encode_task(small_task, tiny.tokenizer)
    calls = []

    class Counting:
        def encode(self, *a, **k):
            calls.append(1)
            return tiny.tokenizer.encode(*a, **k)

    data.encoder.tokenizer = Counting()
    ad = get_adapter_class("prompt").attach(tiny)
    train(ad, ad.init_params(0), data, steps=3, batch_size=4, evaluate_query=False)
    assert calls == []

"""``adapt --switch auto`` (issue 17 item 3): the plateau rule, the two-stage stack that keeps
what the first method learned, and the run end to end (CLI, JSON, the saved stack read back)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from metapeft.adapters import get_adapter_class
from metapeft.adapters.stacked import Stacked, can_stack
from metapeft.cli import app
from metapeft.switching import Candidate, noise, plateaued, train_with_switching
from metapeft.train import encode_task, evaluate, train


def test_plateau_rule():
    assert not plateaued([0.2, 0.3], 3, 0.01)  # too short to tell
    assert plateaued([0.2, 0.4, 0.4, 0.4, 0.4], 3, 0.01)
    assert not plateaued([0.2, 0.4, 0.4, 0.4, 0.42], 3, 0.01)  # a gain above the tolerance
    assert plateaued([0.2, 0.4, 0.4, 0.4, 0.405], 3, 0.01)
    assert plateaued([0.5, 0.3, 0.3, 0.3], 3, 0.0)  # a fall is no gain
    assert noise(0.5, 100) == pytest.approx(0.05)
    assert noise(1.0, 20) == pytest.approx(0.05)  # never below one example


def _scores(adapter, params, batches):
    return mx.concatenate([adapter.scores(adapter.scoring_params(params), b) for b in batches])


@pytest.mark.parametrize("first,second,options", [
    ("lora", "lora", ({}, {})), ("prompt", "lora", ({}, {})), ("adalora", "lora", ({}, {})),
    ("lora", "prompt", ({}, {})),
    # the new stage's trunk runs through a block the frozen stage adapted: the cached trunk states
    # must come from the frozen stage's model, not the base model's (which are cached first)
    ("lora", "lora", ({"num_layers": 2}, {"num_layers": 1}))])
def test_stack_keeps_what_the_first_stage_learned(tiny, small_task, first, second, options):
    data = encode_task(small_task, tiny.tokenizer)
    plain = get_adapter_class("lora").attach(tiny, {"num_layers": 1})
    data.prepared(plain, "query")  # the base model's trunk states, cached under the base's key
    cls0 = get_adapter_class(first)
    frozen = cls0.attach(tiny, options[0])
    trained = train(frozen, frozen.init_params(0), data, steps=3, lr=cls0.default_lr).params
    before = _scores(frozen, trained, data.prepared(frozen, "query"))
    kept = {k: mx.array(v) for k, v in tree_flatten(trained)}
    stack = Stacked(frozen, trained, get_adapter_class(second),
                    get_adapter_class(second).Config.from_dict(options[1]))
    fresh = stack.init_params(0)
    after = _scores(stack, fresh, data.prepared(stack, "query"))
    if get_adapter_class(second).swaps_layers:  # a fresh LoRA stage is a no-op
        assert float(mx.abs(after - before).max()) < 1e-4
    res = train(stack, fresh, data, steps=2, lr=stack.default_lr)
    assert set(dict(tree_flatten(res.params))) == set(dict(tree_flatten(fresh)))  # new stage only
    for k, v in tree_flatten(trained):  # the frozen stage is untouched by training on top
        assert mx.array_equal(v, kept[k])
    moved = max(float(mx.abs(a - b).max()) for (_, a), (_, b)
                in zip(tree_flatten(res.params), tree_flatten(fresh)))
    assert moved > 0


def test_two_virtual_token_methods_do_not_stack(tiny):
    prompt = get_adapter_class("prompt").attach(tiny, {})
    assert "both add virtual inputs" in can_stack(prompt, get_adapter_class("prefix"))
    assert can_stack(prompt, get_adapter_class("lora")) is None
    assert "training-free" in can_stack(prompt, get_adapter_class("prototype"))


def test_switch_on_plateau_passes_over_what_cannot_stack(tiny, small_task):
    data = encode_task(small_task, tiny.tokenizer)
    prompt = get_adapter_class("prompt").attach(tiny, {})
    asked = []

    def candidates():
        asked.append(1)
        return [Candidate("prefix"), Candidate("lora", lr=3e-3)]

    # a zero tolerance and a 1-step window: the first step without a gain is a plateau
    final, res, switches = train_with_switching(
        prompt, prompt.init_params(0), data, steps=12, lr=1e-6, candidates=candidates,
        window=1, tolerance=0.0, target=None)
    assert asked == [1]
    (sw,) = switches
    assert sw["from"] == "prompt" and sw["to"] == "lora" and sw["lr"] == 3e-3
    assert [p["method"] for p in sw["passed_over"]] == ["prefix"]
    assert sw["accuracy_after"] == pytest.approx(sw["accuracy_before"])  # LoRA starts as a no-op
    assert len(res.losses) == 12 and len(res.accuracies) == 13  # one curve over every step
    assert res.accuracies[sw["step"]] == pytest.approx(sw["accuracy_before"])
    assert isinstance(final, Stacked) and final.stage_methods == ["prompt", "lora"]
    acc, _ = evaluate(final, res.params, data.prepared(final, "query"))
    assert acc == pytest.approx(res.accuracies[-1])


def test_no_switch_without_plateau_or_once_the_target_is_reached(tiny, small_task):
    data = encode_task(small_task, tiny.tokenizer)
    lora = get_adapter_class("lora").attach(tiny, {})
    never = []
    _, res, switches = train_with_switching(
        lora, lora.init_params(0), data, steps=4, lr=1e-6,
        candidates=lambda: never.append(1) or [], window=1, tolerance=0.0, target=0.0)
    assert switches == [] and never == [] and len(res.losses) == 4


def test_cli_switch_auto_end_to_end(tmp_path, tiny, monkeypatch):
    # an empty experience store: the ranking is the documented priors, not whatever the other
    # tests recorded in the session's store (a selector trained on those may rank AdaLoRA first)
    monkeypatch.setenv("METAPEFT_HOME", str(tmp_path / "home"))
    from metapeft.data.synthetic import generate_task
    from metapeft.quickstart import write_task_dir

    task = write_task_dir(generate_task(5, family="topic", ways=3, shots=4, query=5),
                          tmp_path / "task")
    out = tmp_path / "stack"
    r = CliRunner().invoke(app, ["adapt", str(task), "--model", "tiny", "--method", "prompt",
                                 "--steps", "12", "--switch", "auto", "--switch-window", "2",
                                 "--switch-tolerance", "0.5", "--out", str(out), "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    (sw,) = report["switches"]
    assert sw["from"] == "prompt" and sw["to"] == "lora"  # the priors' first trainable method
    assert len(report["accuracies"]) == 13
    assert sw["accuracy_after"] >= sw["accuracy_before"] - noise(sw["accuracy_before"], 15)
    from metapeft.adapter_io import load_adapter

    adapter, params = load_adapter(out)
    assert adapter.stage_methods == ["prompt", "lora"]
    r = CliRunner().invoke(app, ["evaluate", str(out), str(task / "valid.jsonl"), "--json"],
                           catch_exceptions=False)
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(report["final_accuracy"])
    r = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "peft")])
    assert r.exit_code == 2 and "two-stage" in r.output

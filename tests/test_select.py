"""Task features, the embedder/selector, priors, and the select/profile/experience commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from metapeft.experience import ExperienceRecord, ExperienceStore
from metapeft.select.features import FEATURE_NAMES, task_features

METHODS3 = ["lora", "prefix", "prompt"]


def synthetic_experience(n_tasks: int, seed: int = 0) -> list[ExperienceRecord]:
    """Records where the winner depends on one feature: prompt wins with many shots (> 25),
    LoRA otherwise; prefix is never best."""
    rng = np.random.default_rng(seed)
    recs = []
    for t in range(n_tasks):
        shots = int(rng.integers(1, 51))
        f = {k: float(rng.normal(0, 1)) for k in FEATURE_NAMES}
        f.update(shots_mean=float(shots), shots_min=float(shots), num_classes=5.0,
                 n_support=5.0 * shots)
        acc = {"lora": 0.6, "prefix": 0.5, "prompt": 0.75 if shots > 25 else 0.45}
        for m in METHODS3:
            a = float(np.clip(acc[m] + rng.normal(0, 0.03), 0, 1))
            recs.append(ExperienceRecord(task=f"t{t}", domain=f"d{t % 3}", method=m,
                                         features=[f[k] for k in FEATURE_NAMES],
                                         final_accuracy=a, id=f"r{t}-{m}", source="sweep",
                                         hyperparameters={"lr": 0.01 * (1 + t % 3)}))
    return recs


def runner_app():
    from metapeft.cli.select import register

    app = typer.Typer()
    register(app)
    return app


def invoke(*args):
    return CliRunner().invoke(runner_app(), list(map(str, args)), env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from metapeft.data.synthetic import generate_task
    from metapeft.quickstart import write_task_dir

    d = tmp_path_factory.mktemp("task") / "t"
    write_task_dir(generate_task(7, family="sentiment", ways=3, shots=4, query=4), d)
    return d


def test_features_deterministic_finite_named(tiny, small_task):
    a = task_features(small_task, tiny)
    b = task_features(small_task, tiny)
    assert list(a) == list(FEATURE_NAMES) and a == b
    assert all(isinstance(v, float) and math.isfinite(v) for v in a.values())
    assert a["num_classes"] == 3 and a["shots_mean"] == 4 and a["label_entropy"] == pytest.approx(1)
    assert 0 <= a["zero_shot_accuracy"] <= 1 and a["fisher_log_trace"] > 0
    c = task_features(small_task, None)  # no model: whitespace words, chance-level model features
    assert list(c) == list(FEATURE_NAMES) and all(math.isfinite(v) for v in c.values())
    assert c["zero_shot_accuracy"] == pytest.approx(1 / 3) and c["fisher_log_trace"] == 0


def test_selector_learns_the_rule_and_round_trips(tmp_path):
    from metapeft.select.selector import MethodSelector, answer, train_selector

    recs = synthetic_experience(100)
    train, test = recs[:60 * 3], recs[60 * 3:]
    sel = train_selector(train, epochs=250, embed_epochs=150, deviation_penalty=(0.01, 0.3))
    assert sel.methods == sorted(METHODS3)
    by_task: dict = {}
    for r in test:
        by_task.setdefault(r.task, {})[r.method] = (r.final_accuracy, r.features)
    hits = lora_hits = 0
    for accs in by_task.values():
        truth = max(accs, key=lambda m: accs[m][0])
        feats = dict(zip(FEATURE_NAMES, next(iter(accs.values()))[1]))
        res = answer(sel, feats)
        hits += res["ranking"][0]["method"] == truth
        lora_hits += truth == "lora"
        assert abs(sum(r["confidence"] for r in res["ranking"]) - 1) < 1e-3
    assert hits >= lora_hits + 5 and hits / len(by_task) >= 0.7
    # the embedding separates the regimes: a many-shot task's nearest neighbours won with prompt
    many = next(a for a in by_task.values() if a["prompt"][1][FEATURE_NAMES.index("shots_mean")] > 40)
    res = answer(sel, dict(zip(FEATURE_NAMES, many["prompt"][1])), k=3)
    assert [s["best_method"] for s in res["similar_tasks"]].count("prompt") >= 2
    assert res["ranking"][0]["hyperparameters"]["lr"] in (0.01, 0.02, 0.03)
    sel.save(tmp_path / "sel")
    again = MethodSelector.load(tmp_path / "sel")
    x = np.array([test[0].features])
    np.testing.assert_allclose(again.predict(x)[0], sel.predict(x)[0], rtol=1e-5)
    assert again.temperature == sel.temperature


def test_empty_store_answers_from_priors(home, tiny, small_task):
    from metapeft.adapters import PRIOR_ORDER
    from metapeft.select.selector import select

    res = select(task_features(small_task, tiny))
    assert res["source"] == "priors" and "priors" in res["reason"]
    assert [r["method"] for r in res["ranking"]] == list(PRIOR_ORDER)
    assert max(r["confidence"] for r in res["ranking"]) <= 0.3
    assert all(r["predicted_accuracy"] is None for r in res["ranking"])
    assert res["ranking"][0]["hyperparameters"]["lr"] == 1e-3  # configs/default.yaml's LoRA lr


def test_select_json_schema_cli(home, task_dir):
    r = invoke("select", task_dir, "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output)
    assert set(obj) == {"features", "ranking", "similar_tasks", "init_sources"}
    assert obj["similar_tasks"] == [] and obj["init_sources"]["chosen"] == "fresh"
    ExperienceStore().append(synthetic_experience(30))
    r = invoke("train-selector", "--epochs", 100)
    assert r.exit_code == 0, r.output
    assert (home / "selector" / "selector.safetensors").exists()
    r = invoke("select", task_dir, "--json", "--top", 2, "--k", 3)
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output)
    assert set(obj) == {"features", "ranking", "similar_tasks", "init_sources"}
    assert list(obj["features"]) == list(FEATURE_NAMES)
    assert len(obj["ranking"]) == 2 and len(obj["similar_tasks"]) == 3
    for row in obj["ranking"]:
        assert set(row) == {"method", "predicted_accuracy", "confidence", "uncertainty",
                            "hyperparameters"}
        assert 0 <= row["predicted_accuracy"] <= 1 and row["uncertainty"] >= 0
    for s in obj["similar_tasks"]:
        assert set(s) == {"id", "distance", "best_method"} and s["distance"] >= 0
    r = invoke("select", task_dir, "--top", 3)  # the table
    assert r.exit_code == 0 and "nearest past tasks" in r.output and "reason:" in r.output


def test_experience_commands_and_bad_file(home, tmp_path):
    ExperienceStore().append(synthetic_experience(2))
    r = invoke("experience", "list")
    assert r.exit_code == 0 and "6 records" in r.output
    r = invoke("experience", "show", "r1-prompt")
    assert r.exit_code == 0 and json.loads(r.output)["method"] == "prompt"
    out = tmp_path / "x.jsonl"
    assert invoke("experience", "export", "--format", "jsonl", "--out", out).exit_code == 0
    assert len(out.read_text().splitlines()) == 6
    r = invoke("experience", "import", out, "--experience", tmp_path / "other.safetensors")
    assert r.exit_code == 0 and "imported 6" in r.output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    for args in (("experience", "list", "--experience", bad),
                 ("train-selector", "--experience", bad, "--out", tmp_path / "s")):
        r = invoke(*args)
        assert r.exit_code == 2
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0]
    r = invoke("experience", "export", "--format", "csv", "--out", out)
    assert r.exit_code == 2 and "format" in r.output


def test_profile_cli(task_dir):
    r = invoke("profile", task_dir, "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output)
    assert obj["domain"] == "sentiment" and list(obj["features"]) == list(FEATURE_NAMES)


def test_default_hyperparameters_are_the_adapters():
    """Without experience, select recommends exactly what adapt runs: the adapter's own lr and
    options, with the run-level steps and optimizer of configs/default.yaml."""
    from metapeft.adapters import METHODS, get_adapter_class
    from metapeft.config import run_defaults
    from metapeft.select.selector import default_hyperparameters

    for m in METHODS:
        hp = default_hyperparameters(m)
        cls = get_adapter_class(m)
        assert {k: hp[k] for k in cls.Config.defaults()} == cls.Config.defaults()
        if cls.training_free:  # prototype: no learning rate, no step
            assert "lr" not in hp and hp["steps"] == 0
            continue
        assert hp["lr"] == cls.default_lr
        assert hp["steps"] == run_defaults()["steps"]
    assert default_hyperparameters("prompt")["num_virtual_tokens"] == 8


def test_method_accuracy_comes_from_runs_of_its_own_init():
    """A run from a meta-init or the library measures the init as much as the method: a task's
    method accuracy is the mean of its fresh (or unknown-init) runs, the others only when it
    has no such run."""
    from metapeft.experience import ExperienceRecord
    from metapeft.select.embedder import task_table

    def rec(method, acc, source):
        run = None if source is None else {"init_source": source}
        return ExperienceRecord(task="t", method=method, features=[1.0, 2.0],
                                final_accuracy=acc, run=run)

    rows = task_table([rec("lora", 0.5, "fresh"), rec("lora", 0.9, "route"),
                       rec("lora", 0.7, None), rec("dora", 0.8, "compose")])
    assert len(rows) == 1
    assert rows[0].accuracy["lora"] == pytest.approx(0.6)  # fresh + unknown; route left out
    assert rows[0].accuracy["dora"] == pytest.approx(0.8)  # no own-init run: library run counts

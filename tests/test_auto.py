"""adapt --method auto (issue 16 item 7): profile + select + the newest matching registry init,
then adapt; the decision is printed, returned and recorded with the outcome; --budget-seconds
bounds the whole run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from metapeft.experience import ExperienceRecord, ExperienceStore
from metapeft.select.features import FEATURE_NAMES

DECISION_KEYS = {"method", "confidence", "predicted_accuracy", "source", "alternatives",
                 "hyperparameters", "hyperparameters_from", "init", "init_source",
                 "init_reason", "reason"}


def cli(*args):
    from metapeft.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_auto_on_an_empty_store_uses_the_priors(home, task_dir):
    from metapeft import api
    from metapeft.adapters import PRIOR_ORDER

    r = cli("adapt", task_dir, "--method", "auto", "--steps", "3", "--json")
    assert r.exit_code == 0, r.stderr
    obj = json.loads(r.stdout)
    d = obj["decision"]
    assert set(d) == DECISION_KEYS
    assert d["method"] == obj["method"] == PRIOR_ORDER[0] and d["source"] == "priors"
    assert [a["method"] for a in d["alternatives"]] == list(PRIOR_ORDER[1:])
    assert d["confidence"] <= 0.3 and "priors" in d["reason"]
    assert d["init"] is None and "no lora meta-weights" in d["init_reason"]
    assert d["hyperparameters"]["steps"] == 3 == len(obj["losses"])  # --steps wins
    assert "your options" in d["hyperparameters_from"]
    assert "auto: lora" in r.stderr  # the decision is shown before training, on stderr here
    # the decision and the outcome are one record of the store
    rec = ExperienceStore().load()[-1]
    assert rec.method == "lora" and rec.source == "adapt"
    assert rec.run["decision"]["method"] == "lora" and rec.run["decision"]["source"] == "priors"
    assert rec.final_accuracy == pytest.approx(obj["final_accuracy"], abs=1e-6)
    # the human output says it too
    h = cli("adapt", task_dir, "--method", "auto", "--steps", "1")
    assert h.exit_code == 0 and "auto: lora" in h.stdout and "init: fresh" in h.stdout
    assert len(ExperienceStore().load()) == 2
    with pytest.raises(Exception, match="unknown method"):
        api.meta_train("synthetic", method="auto", name="x", meta_steps=1)


def _experience(n_tasks: int) -> list[ExperienceRecord]:
    """Past tasks on which prototype always won clearly."""
    rng = np.random.default_rng(0)
    recs = []
    for t in range(n_tasks):
        f = [float(v) for v in rng.normal(0, 1, len(FEATURE_NAMES))]
        for m, acc in (("lora", 0.45), ("prefix", 0.3), ("prototype", 0.9)):
            recs.append(ExperienceRecord(task=f"t{t}", domain="d", method=m, features=f,
                                         final_accuracy=acc + float(rng.normal(0, 0.02)),
                                         source="sweep", hyperparameters={"lr": 1e-3}))
    return recs


def test_auto_learns_from_a_populated_store(home, task_dir, tmp_path):
    from metapeft import api

    ExperienceStore().append(_experience(8))
    decisions = []
    rep = api.adapt(task_dir, method="auto", record_experience=True, out=tmp_path / "a",
                    on_decision=decisions.append)
    d = rep.extra["decision"]
    assert decisions == [d] and rep.method == d["method"] == "prototype"
    assert d["source"].startswith("experience") and d["predicted_accuracy"] > 0.7
    assert d["confidence"] > max(a["confidence"] for a in d["alternatives"])
    assert d["init"] is None and "training-free" in d["init_reason"]
    assert d["hyperparameters"]["steps"] == 0 and "lr" not in d["hyperparameters"]
    assert len(rep.losses) == 0 and len(rep.accuracies) == 1
    rec = ExperienceStore().load()[-1]
    assert rec.method == "prototype" and rec.run["decision"]["method"] == "prototype"
    assert rec.run["decision"]["predicted_accuracy"] == d["predicted_accuracy"]
    # the adapter directory says how it was chosen, and evaluates to what adapt reported
    from metapeft.adapter_io import read_adapter_info

    assert read_adapter_info(tmp_path / "a").provenance["decision"]["method"] == "prototype"
    ev = api.evaluate(tmp_path / "a", task_dir / "valid.jsonl")
    assert ev.accuracy == rep.final_accuracy


def test_auto_takes_the_newest_valid_registry_init(home, task_dir):
    from metapeft import api, registry
    from metapeft.artifacts import load_safetensors

    kw = dict(meta_steps=1, meta_batch=1, inner_steps=1, eval_every=0, ways=3, shots=2, query=2)
    api.meta_train("synthetic", name="mine", **kw)  # mine@1, on the tiny model
    arrays, meta = load_safetensors(registry.resolve("mine@1"))
    # newer versions that must be passed over: another model's, and one whose shapes are wrong
    registry.save_version("mine", dict(arrays), {**meta, "base_model_hash": "0" * 16,
                                                 "created": "2999-01-01T00:00:00+00:00"})
    broken = {k: v[..., :1] if k.endswith("lora_a") else v for k, v in arrays.items()}
    registry.save_version("mine", broken, {**meta, "created": "2999-01-02T00:00:00+00:00"})
    r = cli("adapt", task_dir, "--method", "auto", "--steps", "1", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)["decision"]
    assert d["method"] == "lora" and d["init"] == "mine@1"
    assert "mine@3" in d["init_reason"]  # said why it was passed over
    rec = ExperienceStore().load()[-1]
    assert rec.run["init"] == "mine@1" and rec.run["decision"]["init"] == "mine@1"
    # a version rolled back from is withdrawn: after rollback to 1, 2 and 3 are not candidates
    registry.rollback("mine", 1)
    d2 = json.loads(cli("adapt", task_dir, "--method", "auto", "--steps", "1",
                        "--json").stdout)["decision"]
    assert d2["init"] == "mine@1" and "mine@3" not in d2["init_reason"]


def test_budget_seconds_bounds_the_run(home, task_dir):
    from metapeft import api

    tight = api.adapt(task_dir, method="auto", steps=50, budget_seconds=0.01)
    b = tight.extra["budget"]
    assert b["exceeded"] and b["stopped_after_step"] == 0 and len(tight.losses) == 0
    assert tight.to_json()["budget"] == b
    roomy = api.adapt(task_dir, steps=3, budget_seconds=600)
    b = roomy.extra["budget"]
    assert not b["exceeded"] and b["stopped_after_step"] is None and len(roomy.losses) == 3
    assert "decision" not in roomy.to_json()
    r = cli("adapt", task_dir, "--steps", "2", "--budget-seconds", "600")
    assert r.exit_code == 0 and "budget 600 s:" in r.stdout, r.stderr
    r = cli("adapt", task_dir, "--budget-seconds", "0")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--budget-seconds must be > 0" in lines[0]

"""``metapeft --track mlflow`` (issue 17 item 5): each run record mirrored to a local MLflow file
store; tested when the ``mlflow`` extra is installed, skipped otherwise."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from metapeft.cli import app
from metapeft.tracking import ENV


def _task(tmp_path):
    from metapeft.data.synthetic import generate_task
    from metapeft.quickstart import write_task_dir

    return write_task_dir(generate_task(5, family="topic", ways=3, shots=3, query=3),
                          tmp_path / "task")


def test_unknown_tracker_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "none")  # restored after the test: --track sets it in-process
    r = CliRunner().invoke(app, ["--track", "wandb", "adapt", str(_task(tmp_path)), "--model",
                                 "tiny", "--steps", "1"])
    assert r.exit_code == 2 and "--track must be one of mlflow" in r.output


def test_missing_extra_is_one_line_exit_2(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv(ENV, "none")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    r = CliRunner().invoke(app, ["--track", "mlflow", "adapt", str(_task(tmp_path)), "--model",
                                 "tiny", "--steps", "1"])
    assert r.exit_code == 2 and "needs the mlflow extra" in r.output


def test_runs_are_mirrored_to_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    monkeypatch.setenv("METAPEFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(ENV, "none")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    task = _task(tmp_path)
    r = CliRunner().invoke(app, ["--track", "mlflow", "adapt", str(task), "--model", "tiny",
                                 "--steps", "3", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    bad = CliRunner().invoke(app, ["--track", "mlflow", "adapt", str(task), "--model", "tiny",
                                   "--lr", "-1"])
    assert bad.exit_code == 2

    from mlflow.tracking import MlflowClient

    from metapeft.runs import list_runs
    from metapeft.tracking import store_uri

    client = MlflowClient(tracking_uri=store_uri(tmp_path / "home"))
    exp = client.get_experiment_by_name("metapeft")
    runs = {r.data.tags["metapeft.run_id"]: r for r in client.search_runs([exp.experiment_id])}
    records = {rec["id"]: rec for rec in list_runs(tmp_path / "home")}
    assert set(runs) == set(records) and len(runs) == 2
    ok = next(r for r in runs.values() if r.data.tags["metapeft.status"] == "ok")
    failed = next(r for r in runs.values() if r.data.tags["metapeft.status"] == "failed")
    assert ok.info.status == "FINISHED" and failed.info.status == "FAILED"
    assert "lr" in failed.data.tags["metapeft.error"]
    history = client.get_metric_history(ok.info.run_id, "adapt.accuracies")
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.value for m in history] == pytest.approx(report["accuracies"], abs=1e-6)
    assert ok.data.params["steps"] == "3" and ok.data.tags["metapeft.command"] == "adapt"

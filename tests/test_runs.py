"""Run records (``metapeft.runs``, written by the CLI layer for every command that trains or
evaluates) and ``metapeft runs list | show``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metapeft import runs
from metapeft.errors import UserError

META = ["--meta-steps", "2", "--ways", "3", "--shots", "2", "--query", "2", "--inner-steps", "1",
        "--meta-batch", "2", "--eval-every", "1", "--eval-episodes", "2",
        "--lr-decays", "0"]  # constant-lr calibration: half the time; the grid is test_meta's


def run(*args, home, env=None):
    return subprocess.run([sys.executable, "-m", "metapeft.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200", "METAPEFT_HOME": str(home),
                               **(env or {})})


def records(root) -> list[dict]:
    return runs.list_runs(root)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from metapeft.data.synthetic import generate_task
    from metapeft.quickstart import write_task_dir

    return write_task_dir(generate_task(2, family="topic", ways=3, shots=3, query=3),
                          tmp_path_factory.mktemp("task"))


def test_adapt_leaves_a_record_with_its_curves(task_dir, tmp_path):
    r = run("adapt", task_dir, "--steps", "2", "--out", tmp_path / "a", home=tmp_path)
    assert r.returncode == 0, r.stderr
    [rec] = records(tmp_path)
    assert rec["command"] == "adapt" and rec["status"] == "ok" and rec["exit_status"] == 0
    assert rec["argv"] == ["adapt", str(task_dir), "--steps", "2", "--out", str(tmp_path / "a")]
    assert rec["params"]["steps"] == 2 and rec["params"]["method"] == "lora"
    assert rec["params"]["model"] == "tiny"  # defaults too
    assert rec["versions"]["metapeft"] and rec["versions"]["python"]
    assert rec["error"] is None and rec["duration_seconds"] > 0 and rec["pid"] > 0
    [call] = rec["calls"]
    assert call["call"] == "adapt"
    assert len(call["curves"]["accuracies"]) == 3 and len(call["curves"]["losses"]) == 2
    assert call["result"]["final_accuracy"] == pytest.approx(call["curves"]["accuracies"][-1],
                                                             abs=1e-6)
    path = runs.runs_dir(tmp_path) / f"{rec['id']}.json"
    assert json.loads(path.read_text()) == rec  # one file per run, plain JSON
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_a_bad_input_is_recorded_with_its_error_line(task_dir, tmp_path):
    r = run("adapt", task_dir, "--method", "nope", home=tmp_path)
    assert r.returncode == 2
    [rec] = records(tmp_path)
    assert rec["status"] == "failed" and rec["exit_status"] == 2
    assert rec["error"] and r.stderr.strip() == f"error: {rec['error']}"
    assert rec["calls"] == []


def test_meta_train_and_weights_check_record_under_their_registry(tmp_path):
    reg = tmp_path / "reg"
    r = run("meta-train", "--name", "m", "--registry", reg, *META, home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    r = run("weights", "check", "m", "--against", "m@1", "--data", "synthetic", "--tasks", "2",
            "--steps", "1", "--ways", "3", "--shots", "2", "--query", "2", "--max-drift", "-1",
            "--registry", reg, home=tmp_path / "home")
    assert r.returncode == 2  # a bad threshold: still a run, recorded
    r = run("weights", "check", "m", "--against", "m@1", "--data", "synthetic", "--tasks", "2",
            "--steps", "1", "--ways", "3", "--shots", "2", "--query", "2", "--registry", reg,
            home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    assert records(tmp_path / "home") == []  # --registry decides where the records go
    meta, bad, check = records(reg)
    assert meta["command"] == "meta-train" and meta["status"] == "ok"
    curves = meta["calls"][0]["curves"]
    assert len(curves["meta_loss"]) == 2 and curves["val_steps"] == [1, 2]
    assert meta["calls"][0]["result"]["version"] == 1
    assert bad["command"] == "weights check" and bad["exit_status"] == 2
    assert "max-drift" in bad["error"]
    assert check["status"] == "ok" and check["calls"][0]["result"]["drift"] == 0.0
    assert check["calls"][0]["result"]["delta"]["mean"] == 0.0

    out = run("runs", "list", "--registry", reg, "--json", home=tmp_path / "home")
    assert [r["id"] for r in json.loads(out.stdout)] == [meta["id"], bad["id"], check["id"]]
    out = run("runs", "list", "--registry", reg, "--command", "meta-train", "--json",
              home=tmp_path / "home")
    assert [r["command"] for r in json.loads(out.stdout)] == ["meta-train"]
    out = run("runs", "list", "--registry", reg, home=tmp_path / "home")
    assert out.returncode == 0 and "weights check" in out.stdout and "m@1" in out.stdout
    shown = run("runs", "show", meta["id"][:18], "--registry", reg, "--json",
                home=tmp_path / "home")
    assert json.loads(shown.stdout)["id"] == meta["id"]
    text = run("runs", "show", meta["id"], "--registry", reg, home=tmp_path / "home")
    assert "meta_loss" in text.stdout and "status      ok (exit 0)" in text.stdout


def test_commands_that_neither_train_nor_evaluate_leave_no_record(tmp_path):
    assert run("weights", "list", home=tmp_path).returncode == 0
    assert run("runs", "list", home=tmp_path).returncode == 0
    assert records(tmp_path) == []


def test_recording_can_be_turned_off_and_ranks_do_not_record(task_dir, tmp_path):
    for env in ({"METAPEFT_RUNS": "off"}, {"MLX_RANK": "1"}):
        assert run("adapt", task_dir, "--steps", "1", home=tmp_path, env=env).returncode == 0
    assert records(tmp_path) == []


def test_a_crash_is_recorded(tmp_path, monkeypatch, task_dir):
    from typer.testing import CliRunner

    from metapeft import api
    from metapeft.cli import app

    def boom(*a, **k):
        raise RuntimeError("something broke\nbadly")

    monkeypatch.setattr(api, "adapt", boom)
    res = CliRunner().invoke(app, ["adapt", str(task_dir), "--steps", "1"],
                             env={"METAPEFT_HOME": str(tmp_path)})
    assert isinstance(res.exception, RuntimeError)
    [rec] = records(tmp_path)
    assert rec["status"] == "crashed" and rec["exit_status"] == 1
    assert rec["error"] == "RuntimeError: something broke badly"
    assert rec["argv"] == ["adapt", str(task_dir), "--steps", "1"]
    assert api.adapt is boom  # the api is restored after the command


def test_a_run_whose_process_is_gone_reads_as_died(tmp_path):
    rec = runs.Recorder("adapt", argv=["adapt", "x"], params={}, registry=tmp_path)
    rec.record["pid"] = 2**22 + 12345  # above the default pid_max: no such process
    rec.start()
    assert records(tmp_path)[0]["status"] == "died"
    rec.record["pid"] = os.getpid()
    rec.start()
    assert records(tmp_path)[0]["status"] == "running"
    rec.finish(0)
    assert records(tmp_path)[0]["status"] == "ok"


def test_get_run_errors(tmp_path):
    with pytest.raises(UserError, match="no run"):
        runs.get_run("2026", tmp_path)
    with pytest.raises(UserError, match="invalid run id"):
        runs.get_run("../x", tmp_path)
    for _ in range(2):
        runs.Recorder("adapt", argv=[], params={}, registry=tmp_path).start()
    with pytest.raises(UserError, match="ambiguous"):
        runs.get_run("2", tmp_path)
    r = run("runs", "show", "nope", "--registry", tmp_path, home=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_summarise():
    s = runs.summarise({"a": 1, "b": "x", "c": [0.5, None, 0.7], "d": {"mean": 0.1, "ci": None},
                        "e": [{"x": 1}], "f": float("nan"), "g": [], "h": {"deep": {"x": 1}}})
    assert s == {"result": {"a": 1, "b": "x", "d": {"mean": 0.1, "ci": None}, "f": None},
                 "curves": {"c": [0.5, None, 0.7]}}
    assert runs.summarise([1, 2]) == {"result": {}, "curves": {}}


def test_an_unwritable_registry_never_fails_the_command(task_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rec = runs.Recorder("adapt", argv=[], params={}, registry=blocker)
    rec.start()
    assert rec.path is None
    rec.finish(0)
    assert not Path(blocker).is_dir()


def test_runs_started_within_one_second_list_in_start_order(tmp_path):
    made = []
    for _ in range(6):
        rec = runs.Recorder("adapt", argv=[], params={}, registry=tmp_path)
        rec.start()
        made.append(rec.id)
    assert [r["id"] for r in records(tmp_path)] == made
    assert [r["id"] for r in runs.list_runs(tmp_path, limit=2)] == made[-2:]

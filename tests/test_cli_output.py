"""What users notice (issue 15, friction): progress without a terminal, output that reads at 80
columns, summaries before detail, a confirmation before deleting, --version, the umask, a
resumed study's own --trials, and a tune recommendation that ranks accuracy first."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
from typer.testing import CliRunner

NARROW = {"COLUMNS": "80", "METAPEFT_EXPERIENCE": "off"}


@pytest.fixture(autouse=True)
def fresh_consoles():
    """rich reads COLUMNS when a Console is made, and metapeft makes its consoles once per
    process: drop them so each in-process run here sees its own 80 columns."""
    from metapeft.console import err_console, out_console

    out_console._console = err_console._console = None
    yield
    out_console._console = err_console._console = None


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A registry with two versions of `a-rather-long-meta-weights-name`, and a task."""
    from metapeft import api
    from metapeft.data.synthetic import generate_task
    from metapeft.quickstart import write_task_dir

    root = tmp_path_factory.mktemp("out")
    kw = dict(registry=root, ways=3, shots=2, query=2, inner_steps=1, meta_batch=1,
              meta_steps=1, eval_every=1, eval_episodes=1)
    for seed in (0, 1):
        api.meta_train("synthetic", name="a-rather-long-meta-weights-name", seed=seed, **kw)
    write_task_dir(generate_task(4, family="topic", ways=3, shots=3, query=3), root / "task")
    return root


def invoke(home, *args, env=None):
    from metapeft.cli import app

    return CliRunner().invoke(app, [str(a) for a in args],
                              env={"METAPEFT_HOME": str(home), **NARROW, **(env or {})})


def test_version_flag():
    from metapeft import __version__

    r = invoke("/nonexistent", "--version")
    assert r.exit_code == 0 and r.stdout.strip() == __version__


def test_plain_progress_lines_without_a_terminal(home):
    r = invoke(home, "adapt", home / "task", "--steps", "3",
               env={"METAPEFT_PROGRESS_SECONDS": "0"})
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("adapt lora:")]
    assert lines[0].startswith("adapt lora: 0/3") and lines[0].endswith("started")
    assert lines[-1].startswith("adapt lora: 3/3") and "loss" in lines[-1]
    assert not any("━" in ln for ln in lines)  # no bar drawn into a file


def test_weights_list_reads_at_80_columns(home):
    r = invoke(home, "weights", "list")
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout
    assert "a-rather-long-meta-weights-name@2" in r.stdout.replace("\n", "")
    assert all(len(ln) <= 80 for ln in r.stdout.splitlines()[1:]), r.stdout


def test_experience_list_shows_whole_ids_at_80_columns(home, tmp_path):
    from metapeft.experience import ExperienceStore, make_record

    from metapeft.select.features import FEATURE_NAMES

    store = tmp_path / "e.safetensors"
    ids = ExperienceStore(store).append([make_record(
        {"task": "a-task-with-a-long-name", "method": "lora", "final_accuracy": 0.5,
         "features": [0.0] * len(FEATURE_NAMES), "source": "adapt"})])
    r = invoke(home, "experience", "list", "--experience", store)
    assert r.exit_code == 0, r.output
    assert ids[0] in r.stdout and "…" not in r.stdout


def test_weights_show_and_compare_summarise_first(home):
    r = invoke(home, "weights", "show", "a-rather-long-meta-weights-name")
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) <= 12 and "parameters" in r.stdout and "--full" in r.stdout
    full = invoke(home, "weights", "show", "a-rather-long-meta-weights-name", "--full")
    assert full.exit_code == 0 and "tensors" in full.stdout
    assert len(full.stdout.splitlines()) > len(r.stdout.splitlines())
    c = invoke(home, "weights", "compare", "a-rather-long-meta-weights-name@1",
               "a-rather-long-meta-weights-name@2")
    assert c.exit_code == 0, c.output
    assert len(c.stdout.splitlines()) <= 20 and "L2 distance" in c.stdout
    assert "data.seed" in c.stdout or "hyperparameters.seed" in c.stdout


def test_weights_delete_asks_first_and_says_what_happened(home, tmp_path):
    import shutil

    reg = tmp_path / "reg"
    shutil.copytree(home / "weights", reg / "weights")
    name = "a-rather-long-meta-weights-name"
    invoke(reg, "weights", "rollback", name, "1")
    r = invoke(reg, "weights", "delete", f"{name}@1")  # stdin is not a terminal
    assert r.exit_code == 2 and "pass --yes" in r.stderr
    assert "latest becomes v2" in r.stderr  # deleting the rolled-back version says so
    assert (reg / "weights" / name / "v0001.safetensors").exists()
    r = invoke(reg, "weights", "delete", f"{name}@1", "--yes")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"deleted {name}@1; {name}: latest is v2"
    assert not (reg / "weights" / name / "v0001.safetensors").exists()


def test_artifacts_follow_the_umask(tmp_path):
    from metapeft.artifacts import atomic_write_text, save_safetensors

    old = os.umask(0o022)
    try:
        a = atomic_write_text(tmp_path / "a.txt", "x")
        b = save_safetensors(tmp_path / "b.safetensors", {"x": [1.0]})
        os.umask(0o077)
        c = atomic_write_text(tmp_path / "c.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(a.stat().st_mode) == 0o644 == stat.S_IMODE(b.stat().st_mode)
    assert stat.S_IMODE(c.stat().st_mode) == 0o600


def test_next_command_is_one_unbroken_line(home, tmp_path):
    r = invoke(home, "meta-train", "--name", "a-rather-long-meta-weights-name-for-a-test",
               "--registry", tmp_path / "a-long-registry-directory-name", "--ways", "3",
               "--shots", "2", "--query", "2", "--meta-steps", "1", "--inner-steps", "1",
               "--meta-batch", "1", "--eval-every", "0")
    assert r.exit_code == 0, r.output
    nxt = [ln for ln in r.stdout.splitlines() if ln.startswith("next:")]
    assert len(nxt) == 1 and nxt[0].endswith("--init a-rather-long-meta-weights-name-for-a-test")
    published = [ln for ln in r.stdout.splitlines() if ln.startswith("published")]
    assert published[0].endswith("v0001.safetensors")  # a long path is not broken either


def test_select_hyperparameters_are_lines_to_paste(home):
    r = invoke(home, "select", home / "task", "--experience", home / "none.safetensors")
    assert r.exit_code == 0, r.output
    table = r.stdout.split("recommended hyperparameters")[0]
    assert all(len(ln) <= 80 for ln in table.splitlines()), table
    assert re.search(r"^  lora: ", r.stdout, re.M)


def test_resumed_study_keeps_its_trials(small_task, tmp_path):
    from metapeft.tune.search import tune

    calls = []

    def evaluate(method, params):
        calls.append(method)
        return {"accuracy": 0.5, "seconds": 1.0 + len(calls), "memory_mb": 1.0}

    kw = dict(registry=tmp_path, methods="lora", steps=1, warm_start=False, record=False,
              evaluate=evaluate)
    tune(small_task, name="s", trials=2, **kw)
    assert len(calls) == 2
    r = tune(small_task, resume="s", **kw)  # no --trials: the study's own 2, nothing to run
    assert len(calls) == 2 and len(r.study.trials) == 2
    r = tune(small_task, resume="s", trials=3, **kw)  # given: it becomes the study's
    assert len(calls) == 3 and r.study.target_trials == 3


def test_recommendation_ranks_accuracy_first():
    from metapeft.tune.space import load_space
    from metapeft.tune.study import Study

    def trial(i, method, acc, sec, mem):
        return {"index": i, "method": method, "params": {}, "x": [i], "status": "ok",
                "accuracy": acc, "seconds": sec, "memory_mb": mem}

    s = Study(name="r", path=None, space=load_space(None, "lora,prompt"),
              objectives=["accuracy", "seconds", "memory"], task={})
    # the case: the knee picked prompt tuning at 56% over LoRA at 84%
    s.trials = [trial(0, "prompt", 0.56, 1.00, 10.0), trial(1, "lora", 0.84, 1.01, 10.1)]
    assert s.recommended() == 1
    # within 1 point of the best, the faster one wins
    s.trials = [trial(0, "lora", 0.845, 2.0, 10.0), trial(1, "lora", 0.84, 1.0, 10.0)]
    assert s.recommended() == 1
    s.objectives = ["seconds", "memory"]  # without accuracy: the knee, as before
    assert s.recommended() in (0, 1)
    json.dumps(s.summary())

"""The CLI end to end: help speed, --json contract, bad input -> one line, exit 2. In subprocesses,
or in-process (tests/_cli.py) where a case ends before any real work."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli import in_process

EXE = [sys.executable, "-m", "metapeft.cli"]


def run(*args, env=None):
    return subprocess.run(EXE + list(args), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_help_is_fast_and_lazy():
    best = min(_timed_help() for _ in range(3))
    assert best < 1.0  # budget 0.5 s on an idle machine; generous here for loaded CI runners
    for module in ("metapeft.cli", "metapeft.api"):  # the api loads MLX inside its calls
        out = subprocess.run([sys.executable, "-c", f"import {module}, sys; "
                              "print('mlx_lm' in sys.modules, 'transformers' in sys.modules, "
                              "'mlx.core' in sys.modules)"], capture_output=True, text=True)
        assert out.stdout.split() == ["False", "False", "False"], (module, out.stderr)


def _timed_help():
    t = time.perf_counter()
    r = run("--help")
    assert r.returncode == 0 and "adapt" in r.stdout
    return time.perf_counter() - t


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from metapeft.data.synthetic import generate_task
    from metapeft.quickstart import write_task_dir

    return write_task_dir(generate_task(2, family="topic", ways=3, shots=3, query=3),
                          tmp_path_factory.mktemp("task"))


def test_adapt_json_contract(task_dir, tmp_path):
    r = run("adapt", str(task_dir), "--steps", "2", "--json", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert set(obj) == {"steps_to_target", "final_accuracy", "accuracies", "losses",
                        "target_reached", "num_support", "num_query", "seconds", "method"}
    assert len(obj["accuracies"]) == 3 and len(obj["losses"]) == 2
    assert obj["num_support"] == 9 and obj["num_query"] == 9 and obj["method"] == "lora"
    assert (tmp_path / "o" / "adapters.safetensors").exists()
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["fine_tune_type"] == "lora"


@pytest.mark.parametrize("args,needle", [
    (["adapt", "{bad}"], "bad.jsonl:2"),
    (["adapt", "{task}", "--method", "nope"], "unknown method"),
    (["adapt", "{task}", "--loss", "nope"], "unknown loss"),
    (["adapt", "{task}", "--model", "/no/such/model"], "model path does not exist"),
    (["adapt", "{task}", "--set", "rank=0"], "rank"),
    (["adapt", "{task}", "--init", "{bad}"], "not a safetensors"),
    (["adapt", "{missing}"], "does not exist"),
    (["adapt", "{empty}"], "empty"),
    (["adapt", "{single}"], "at least 2 classes"),
    (["adapt", "{few}", "--shots", "5"], "needs"),
    (["adapt", "{latin1}"], "UTF-8"),
])
def test_bad_input_is_one_line_exit_2(task_dir, tmp_path, args, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "single.jsonl").write_text('{"text": "a", "label": "x"}\n' * 4)
    (tmp_path / "few.jsonl").write_text("".join(
        f'{{"text": "t{i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(6)))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "a"}\n')
    subs = {"{bad}": str(bad), "{task}": str(task_dir), "{missing}": str(tmp_path / "nope.jsonl"),
            "{empty}": str(tmp_path / "empty.jsonl"), "{single}": str(tmp_path / "single.jsonl"),
            "{few}": str(tmp_path / "few.jsonl"), "{latin1}": str(tmp_path / "latin1.jsonl")}
    # --shots draws an episode from a file; on a task directory it is refused, not ignored
    shots = [] if "{task}" in args else ["--shots", "1"]
    r = run(*[subs.get(a, a) for a in args], *shots, "--steps", "1")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr
    assert not r.stdout.strip(), r.stdout  # no progress bar starts before the input is valid


def test_init_from_adapter_and_mismatch(task_dir, tmp_path):
    assert in_process("adapt", task_dir, "--steps", "1", "--out", tmp_path / "a").returncode == 0
    ok = in_process("adapt", task_dir, "--steps", "1", "--init", tmp_path / "a", "--json")
    assert ok.returncode == 0, ok.stderr
    mismatch = in_process("adapt", str(task_dir), "--steps", "1", "--init", str(tmp_path / "a"),
                          "--set", "rank=4")
    assert mismatch.returncode == 2 and "shape" in mismatch.stderr


def test_quickstart_and_export(tmp_path):
    r = run("quickstart", "--out", str(tmp_path / "q"), "--steps", "2", "--tasks", "2",
            "--meta-steps", "2", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert Path(obj["adapter"], "adapters.safetensors").exists()
    assert set(obj["accuracy"]) == {"fresh", "meta"} and Path(obj["meta_weights"]).exists()
    e = run("export", obj["adapter"], "--out", str(tmp_path / "peft"))
    assert e.returncode == 0, e.stderr
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    from safetensors.numpy import load_file

    w = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    a = w["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (8, 64)


def _commands(cmd, path=()):
    """(command path, click command) for every leaf command of the app."""
    subs = getattr(cmd, "commands", None)
    if subs is None:
        yield " ".join(path), cmd
        return
    for name, sub in subs.items():
        yield from _commands(sub, (*path, name))


def test_every_command_that_loads_a_model_takes_dequantize():
    import typer

    from metapeft.cli import app

    with_model = set()
    for path, cmd in _commands(typer.main.get_command(app)):
        opts = {o for p in cmd.params for o in p.opts}
        if "--model" in opts:
            with_model.add(path)
            assert "--dequantize" in opts, path
    assert with_model == {"adapt", "meta-train", "profile", "select", "sweep", "tune",
                          "predict", "evaluate", "serve", "weights check", "library add",
                          "library build", "library calibrate", "library train-generator"}


def test_dequantize_flag(task_dir):
    ok = run("adapt", str(task_dir), "--steps", "1", "--dequantize", "never", "--json")
    assert ok.returncode == 0, ok.stderr
    bad = run("adapt", str(task_dir), "--steps", "1", "--dequantize", "sometimes")
    assert bad.returncode == 2 and "dequantize" in bad.stderr and "Traceback" not in bad.stderr


META = ["--meta-steps", "1", "--ways", "3", "--shots", "2", "--query", "2", "--inner-steps", "1",
        "--meta-batch", "2", "--eval-every", "1", "--eval-episodes", "2",
        "--lr-decays", "0"]  # constant-lr calibration: half the time; the grid is test_meta's


def test_meta_train_json_is_the_api_report(tmp_path):
    """`meta-train --json` prints the api report's to_json(), with the keys it always had."""
    from metapeft import api
    from metapeft.meta.sources import MetaSources
    from metapeft.train import AdaptResult

    r = run("meta-train", "--name", "j", "--registry", str(tmp_path / "reg"), *META, "--json",
            env={"METAPEFT_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert list(obj) == ["name", "version", "path", "method", "algorithm", "meta_steps",
                         "best_step", "meta_loss", "meta_accuracy", "val_steps", "val_accuracy",
                         "seconds", "vectorised", "adapt_lr"]
    assert obj["adapt_lr"] > 0  # chosen on the validation tasks (meta.stepsize)
    assert obj["version"] == 1 and obj["meta_steps"] == 1 and obj["vectorised"] is True
    rep = api.meta_train("synthetic", name="j", registry=tmp_path / "reg", ways=3, shots=2,
                         query=2, inner_steps=1, meta_batch=2, meta_steps=1, eval_every=1,
                         eval_episodes=2)
    assert isinstance(rep.sources, MetaSources) and rep.sources.num_validation > 0
    assert rep.meta_losses is rep.result.meta_losses  # the run's result reads through
    got = rep.to_json()
    assert got["version"] == 2 and got["meta_loss"] == obj["meta_loss"]
    assert set(got) == set(obj)
    # the adapt report wraps the training loop's result; its JSON keeps the documented keys
    a = api.adapt(rep.sources.train.sample(0), steps=1, init=rep.path)
    assert isinstance(a.result, AdaptResult) and a.accuracies is a.result.accuracies
    assert list(a.to_json()) == list(a.JSON_KEYS)

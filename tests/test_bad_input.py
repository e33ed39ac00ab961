"""Bad input and faults (issue 15): every case gives one line on stderr, no traceback, and the
documented exit status (2 for bad input); none loses a result or leaves debris behind.

The table runs the Typer app in-process (typer's CliRunner: no 2 s import per case); a few
cases also run as real processes, end to end. Cases marked "lost data" each have an assertion
that failed before their fix (the result written, the directory left, the run not refused).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

META = ["--meta-steps", "1", "--shots", "2", "--query", "2", "--inner-steps", "1",
        "--meta-batch", "1", "--eval-episodes", "1",
        "--lr-decays", "0"]  # constant-lr calibration: half the time; the grid is test_meta's
FAST = ["--steps", "1"]


# --------------------------------------------------------------------------------------------
# fixtures: a home with meta-weights, a task directory, pools, adapters, a checkpoint
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything the cases refer to, as {placeholder: path}."""
    import mlx.core as mx

    from metapeft import api
    from metapeft.data.synthetic import generate_pool, generate_task
    from metapeft.quickstart import write_task_dir

    root = tmp_path_factory.mktemp("bad")
    home = root / "home"
    task = write_task_dir(generate_task(2, family="topic", ways=3, shots=3, query=3),
                          root / "task")
    pool = root / "pool.jsonl"  # two domains, 4 + 4 labels, 6 rows each
    rows = [e for fam in ("sentiment", "urgency") for e in generate_pool(fam, 0, 6)]
    pool.write_text("".join(json.dumps({"text": e.text, "label": e.label, **e.extra}) + "\n"
                            for e in rows))
    kw = dict(registry=home, ways=3, shots=2, query=2, inner_steps=1, meta_batch=1,
              meta_steps=1, eval_every=0)
    api.meta_train("synthetic", name="w", **kw)
    api.meta_train("synthetic", name="w", seed=1, **kw)

    class Kill(Exception):
        pass

    def killer(t, *a):
        if t == 2:
            raise Kill  # "kill -9" in step 2, after step 1's checkpoint

    with pytest.raises(Kill):
        api.meta_train("synthetic", name="ck", checkpoint_every=1, on_step=killer,
                       **{**kw, "meta_steps": 3})
    adapter = root / "adapter"
    api.adapt(str(task), steps=1, out=adapter)
    # an adapter whose A and B no longer pair up: one lora_b cut to rank 4
    from metapeft.artifacts import load_safetensors, save_safetensors

    arrays, meta = load_safetensors(adapter / "adapters.safetensors")
    key = next(k for k in sorted(arrays) if k.endswith("lora_b"))
    arrays[key] = mx.zeros((4, arrays[key].shape[1]))
    broken = root / "broken"
    broken.mkdir()
    save_safetensors(broken / "adapters.safetensors", arrays, meta)
    files = {
        "bad.jsonl": '{"text": "a", "label": "x"}\n{"text": oops}\n',
        "empty.jsonl": "",
        "single.jsonl": '{"text": "a", "label": "x"}\n' * 4,
        "nolabel.jsonl": '{"text": "a"}\n{"text": "b", "label": "y"}\n',
        "list.yaml": "- 1\n- 2\n",
        "bad.yaml": "rank: [1, 2\n",
        "records.jsonl": '{"task": "t"\n',
        "file.txt": "a file, not a directory\n",
        "noheader.csv": "\n\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "a"}\n')
    places = {"{root}": root, "{home}": home, "{task}": task, "{pool}": pool,
              "{adapter}": adapter, "{broken}": broken, "{missing}": root / "nope.jsonl"}
    places.update({"{" + n + "}": root / n for n in files})
    places["{latin1.jsonl}"] = root / "latin1.jsonl"
    return {k: str(v) for k, v in places.items()}


def invoke(world, *args, env=None):
    from metapeft.cli import app

    argv = []
    for a in args:
        for k, v in world.items():
            a = a.replace(k, v)
        argv.append(a)
    return CliRunner().invoke(app, argv, env={"METAPEFT_HOME": world["{home}"],
                                              "COLUMNS": "200", "METAPEFT_EXPERIENCE": "off",
                                              **(env or {})})


def assert_one_line(r, code: int = 2, needle: str | None = None) -> str:
    """Exit ``code``, exactly one non-empty line on stderr (``error: ...``), no traceback."""
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == code, (r.exit_code, r.stdout[-500:], r.stderr[-500:])
    assert "Traceback" not in r.output
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    if needle is not None:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# the table: (command line, text the one line must contain)
# --------------------------------------------------------------------------------------------

CASES = [
    # --- the issue: lost data or resources
    ("tune {task} --name out/studyz", "name"),
    ("tune {task} --name ../../y", "name"),
    ("export {adapter} --out {adapter}", "must differ"),
    ("meta-train --data {pool} --ways 500 --name a " + " ".join(META), "--ways 500 but only"),
    ("meta-train --data {pool} --ways 7 --name a " + " ".join(META), "meta-train classes"),
    # --- the issue: tracebacks
    ("adapt {task} --set rank=abc", "field 'rank': expected an integer, got 'abc'"),
    ("adapt {task} --set rank=2.5", "field 'rank': expected an integer, got 2.5"),
    ("weights rollback w abc", "version"),
    ("adapt {task} --out {file.txt}/sub", "not a directory"),
    ("experience export --out {file.txt}/x.jsonl", "not a directory"),
    # --- the issue: exit 0 with a wrong or empty result
    ("adapt {pool} --shots 0", "--shots must be at least 1"),
    ("adapt {task} --batch-size 0", "--batch-size must be >= 1"),
    ("adapt {task} --lr -1", "--lr must be a positive number"),
    ("adapt {task} --lr 0", "--lr must be a positive number"),
    ("adapt {task} --lr nan", "--lr must be a positive number"),
    ("export {broken} --out {root}/peft-broken", "do not pair up"),
    ("sweep --tasks 0", "--tasks must be at least 1"),
    ("adapt {task} --set target_modules=foo", "['foo'] not found"),
    ("weights rollback nosuch 1", "field 'name': no meta-weights named 'nosuch'"),
    ("weights rollback w 9", "field 'name'"),
    ("weights show nosuch", "field 'spec'"),
    ("weights compare w@1 nosuch", "field 'spec'"),
    ("weights delete nosuch --yes", "field 'spec'"),
    ("meta-train --name ck --resume --ways 3 " + " ".join(META).replace("--meta-steps 1",
                                                                       "--meta-steps 5"),
     "--meta-steps 3"),
    ("adapt {task} --shots 2", "--shots"),
    ("adapt {task} --query 2", "--query"),
    ("adapt {task} --ways 2", "--ways"),
    # --- more of our own
    ("adapt {task} --set rank=true", "expected an integer, got True"),
    ("adapt {task} --set dropout=abc", "field 'dropout': expected a number"),
    ("adapt {task} --set dropout=1.5", "dropout must be in [0, 1)"),
    ("adapt {task} --set use_rslora=maybe", "field 'use_rslora': expected a boolean"),
    ("adapt {task} --set alpha=.inf", "field 'alpha': expected a number"),
    ("adapt {task} --set nosuch=1", "unknown option(s) ['nosuch']"),
    ("adapt {task} --set rank", "--set expects key=value"),
    ("adapt {task} --set rank=[1,2", "expected an integer"),
    ("adapt {task} --set 'target_modules={a: 1}'", "expected a list of strings"),
    ("adapt {task} --set num_layers=0", "num_layers"),
    ("adapt {task} --set lr=abc", "field 'lr': expected a number"),
    ("adapt {task} --set lr=0.01 --lr 0.1", "disagrees with --lr 0.1"),
    ("adapt {task} --set steps=2.5", "field 'steps': expected an integer"),
    ("adapt {task} --method prompt --set num_virtual_tokens=abc", "num_virtual_tokens"),
    ("adapt {task} --method prefix --set init=true", "field 'init': expected a string"),
    ("adapt {task} --config {missing}", "config file does not exist"),
    ("adapt {task} --config {bad.yaml}", "invalid YAML"),
    ("adapt {task} --config {list.yaml}", "mapping"),
    ("adapt {task} --optimizer nope", "unknown optimizer"),
    ("adapt {task} --target 1.5", "target must be in [0, 1]"),
    ("adapt {task} --steps -1", "--steps must be >= 0"),
    ("adapt {task} --loss nope", "unknown loss"),
    ("adapt {task} --init nosuch", "no meta-weights named 'nosuch'"),
    ("adapt {task} --init w@9", "not found"),
    ("adapt {task} --out {file.txt}", "exists and is not a directory"),
    ("adapt {pool} --shots 2 --ways 1", "--ways must be at least 2"),
    ("adapt {pool} --shots 2 --ways 500", "--ways 500 but only 7 labels are available"),
    ("adapt {pool} --shots 2 --query -1", "--query must be non-negative"),
    ("adapt {pool} --shots 9", "needs 19"),
    ("adapt {pool} --shots 2 --text-field body", "field 'body'"),
    ("adapt {bad.jsonl} --shots 1", "bad.jsonl:2"),
    ("adapt {empty.jsonl} --shots 1", "empty"),
    ("adapt {single.jsonl} --shots 1", "at least 2 classes"),
    ("adapt {nolabel.jsonl} --shots 1", "missing label"),
    ("adapt {latin1.jsonl} --shots 1", "UTF-8"),
    ("adapt {noheader.csv} --shots 1", "empty"),
    ("adapt {missing} --shots 1", "does not exist"),
    ("adapt {task} --model /no/such/model", "model path does not exist"),
    ("adapt {task} --method nope", "unknown method"),
    ("adapt {task} --method prototype --init w", "training-free: it starts from no init"),
    ("adapt {task} --budget-seconds -5", "--budget-seconds must be > 0"),
    ("adapt {task} --method prototype --set pooling=max", "pooling must be one of mean, last"),
    ("meta-train --name a --method prototype " + " ".join(META), "training-free"),
    ("meta-train --name bad/name " + " ".join(META), "invalid meta-weights name"),
    ("meta-train --name a --meta-steps 0 --ways 3 --shots 2 --query 2", "meta-steps"),
    ("meta-train --name a --algorithm nope " + " ".join(META), "unknown algorithm"),
    ("meta-train --name a --inner-lr -1 " + " ".join(META), "learning rates must be positive"),
    ("meta-train --name a --val-fraction 1.5 " + " ".join(META), "val fraction"),
    ("meta-train --name a --val-domains nope " + " ".join(META), "unknown validation domain"),
    ("meta-train --name a --data {task} --val-domains x " + " ".join(META), "needs a pool file"),
    ("meta-train --name a --data {missing} " + " ".join(META), "does not exist"),
    ("meta-train --name fresh --resume " + " ".join(META), "nothing to resume"),
    ("meta-train --name a --registry {file.txt} " + " ".join(META), "not a directory"),
    ("weights show nope@3", "no meta-weights named 'nope'"),
    ("weights show w@0", "invalid version"),
    ("weights show 'bad name'", "invalid meta-weights spec"),
    ("weights delete w@1", "pass --yes"),
    ("weights rollback w 0", "version"),
    ("experience show nosuch-id", "no record"),
    ("experience stats --by task", "--by must be one of method, domain, project, init"),
    ("experience stats --since soon", "--since must be a duration"),
    ("experience import {missing}", "does not exist"),
    ("experience import {records.jsonl}", "records.jsonl:1"),
    ("experience export --format csv --out {root}/x.csv", "unknown format"),
    ("experience export --out {root}", "is a directory"),
    ("export {adapter} --out {root}/peft --format onnx", "unknown format"),
    ("export {root}/nope --out {root}/peft", "does not exist"),
    ("sweep --methods nope --tasks 1", "unknown method"),
    ("sweep --max-ways 1 --tasks 1", "--max-ways must be at least 2"),
    ("sweep --query 0 --tasks 1", "--query must be at least 1"),
    ("select {task} --top 0", "--top must be at least 1"),
    ("tune {task} --name s --trials 0", "trials must be >= 1"),
    ("tune", "give a TASK"),
    ("tune --resume nosuch", "no such study"),
    ("tune {task} --name s --objectives speed", "unknown objective"),
    ("tune {task} --name s --acq-func nope", "acq_func"),
    ("tune {task} --name s --plot {file.txt}/p.png", "not a directory"),
    ("train-selector --out {file.txt}", "exists and is not a directory"),
    ("profile {pool}", "needs --shots"),
    # click's own errors are one line too
    ("adapt", "Missing argument"),
    ("adapt {task} --steps abc", "Invalid value for '--steps'"),
    ("adapt {task} --nope", "No such option: --nope"),
    ("nosuchcmd", "No such command"),
    ("meta-train --name a --dequantize sometimes", "dequantize"),
]
if Path("/proc").is_dir() and sys.platform.startswith("linux"):
    CASES += [("adapt {task} --out /proc/nope", "cannot write here"),
              ("experience export --out /proc/nope/x.jsonl", "cannot write here")]


def _split(line: str) -> list[str]:
    import shlex

    return shlex.split(line)


@pytest.mark.parametrize("line,needle", CASES, ids=[c[0][:60] for c in CASES])
def test_bad_input_is_one_line_exit_2(world, line, needle):
    args = _split(line)
    if args[0] == "adapt" and "--steps" not in args:
        args += FAST
    r = invoke(world, *args)
    assert_one_line(r, 2, needle)
    if args[0] == "adapt":
        assert "started" not in r.stdout  # refused before any training began


def test_the_table_has_every_case_and_more():
    assert len(CASES) >= 60


# --------------------------------------------------------------------------------------------
# lost data: each assertion below failed before its fix
# --------------------------------------------------------------------------------------------

def test_out_not_writable_is_refused_before_training(world, tmp_path):
    out = tmp_path / "f"
    out.write_text("x")
    r = invoke(world, "adapt", world["{task}"], "--steps", "1", "--out", str(out / "sub"),
               "--json")
    assert_one_line(r, 2, "not a directory")
    assert "started" not in r.stderr and not r.stdout.strip()  # no training was lost


def test_diverging_lr_stops_and_writes_no_adapter(world, tmp_path):
    out = tmp_path / "a"
    r = invoke(world, "adapt", world["{task}"], "--steps", "3", "--lr", "1e6", "--out", str(out))
    assert_one_line(r, 2, "training diverged")
    assert not (out / "adapters.safetensors").exists()


def test_rollback_of_a_missing_name_leaves_no_directory(world):
    r = invoke(world, "weights", "rollback", "ghost", "1")
    assert_one_line(r, 2, "field 'name'")
    assert not (Path(world["{home}"]) / "weights" / "ghost").exists()


def test_meta_train_ways_above_the_classes_is_refused_not_capped(world):
    r = invoke(world, "meta-train", "--data", world["{pool}"], "--ways", "500", "--name", "cap",
               *META)
    assert_one_line(r, 2, "--ways 500 but only")
    assert not (Path(world["{home}"]) / "weights" / "cap").exists()


def test_a_step_that_cannot_fit_in_memory_is_refused(world):
    env = {"METAPEFT_MAX_MEMORY_GB": "0.0001"}
    r = invoke(world, "meta-train", "--name", "mem", "--ways", "3", *META, env=env)
    assert_one_line(r, 2, "by estimate, over METAPEFT_MAX_MEMORY_GB")
    r = invoke(world, "adapt", world["{task}"], *FAST, env=env)
    assert_one_line(r, 2, "lower --batch-size")


def test_memory_estimate_grows_as_examples_times_labels(tiny):
    from metapeft.scoring import pair_bytes

    one = pair_bytes(tiny.model, 32, 3)
    assert one > 0 and pair_bytes(tiny.model, 64, 3) > one  # longer prompts cost more
    # CLINC150 at --ways 90 (the 23 GB run): 4 tasks x 900 examples x 90 labels
    assert 4 * 900 * 90 * one > 1e9


def test_resume_with_other_settings_is_refused_and_the_checkpoint_kept(world):
    ck = Path(world["{home}"]) / "weights" / "ck" / "checkpoint.safetensors"
    before = ck.read_bytes()
    r = invoke(world, "meta-train", "--name", "ck", "--resume", "--ways", "3", *META[2:],
               "--meta-steps", "7")
    assert_one_line(r, 2, "--meta-steps 3, this run has 7")
    assert ck.read_bytes() == before


def test_resume_without_a_checkpoint_fails_before_any_work(world):
    r = invoke(world, "meta-train", "--name", "never-ran", "--resume", "--ways", "3", *META[2:])
    assert_one_line(r, 2, "nothing to resume")
    assert "started" not in r.output  # refused before the model loads and the bar starts


def test_query_0_json_is_valid_json_with_null(world):
    r = invoke(world, "adapt", world["{pool}"], "--shots", "2", "--query", "0", "--json", *FAST)
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert obj["final_accuracy"] is None and obj["accuracies"] == [] and obj["num_query"] == 0
    r = invoke(world, "adapt", world["{pool}"], "--shots", "2", "--query", "0", *FAST)
    assert r.exit_code == 0 and "no query set to score" in r.stdout


def test_set_lr_and_run_options_are_accepted(world):
    """What `select` prints (lr, steps, optimizer) goes straight into --set."""
    r = invoke(world, "adapt", world["{task}"], "--set", "lr=0.01", "--set", "steps=2",
               "--set", "optimizer=sgd", "--set", "target_modules=self_attn.q_proj,"
               "self_attn.v_proj", "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["losses"]) == 2


def test_every_meta_train_records_experience_labelled_with_its_domains(world, tmp_path):
    from metapeft.experience import ExperienceStore

    home = tmp_path / "h"
    env = {"METAPEFT_HOME": str(home), "METAPEFT_EXPERIENCE": ""}
    r = invoke(world, "meta-train", "--name", "e0", "--ways", "3", "--eval-every", "0", *META,
               env=env)
    assert r.exit_code == 0, r.output
    r = invoke(world, "meta-train", "--name", "md", "--data", world["{pool}"], "--ways", "3",
               "--val-fraction", "0.3", *META, env=env)
    assert r.exit_code == 0, r.output
    recs = ExperienceStore(home / "experience.safetensors").load()
    assert [r.source for r in recs] == ["meta-train", "meta-train"]
    assert recs[0].hyperparameters["accuracy_on"] == "validation episodes"
    assert recs[1].domain == "mixed"
    assert recs[1].hyperparameters["domains"] == ["sentiment", "urgency"]


def test_registry_argument_errors_name_their_argument_not_init(world):
    for args in (["weights", "show", "nosuch"], ["weights", "compare", "w", "nosuch"],
                 ["weights", "delete", "nosuch", "--yes"], ["weights", "rollback", "nosuch", "1"]):
        line = assert_one_line(invoke(world, *args), 2)
        assert "field 'init'" not in line, line


# --------------------------------------------------------------------------------------------
# end to end, as real processes: no traceback anywhere
# --------------------------------------------------------------------------------------------

E2E = [
    "adapt {task} --steps 1 --set rank=abc",
    "adapt {task} --steps 1 --out {file.txt}/sub",
    "weights rollback w abc",
    "experience export --out {file.txt}/x.jsonl",
    "meta-train --data {pool} --ways 500 --name a --meta-steps 1",
]


def test_end_to_end_in_processes(world):
    for line in E2E:
        args = []
        for a in _split(line):
            for k, v in world.items():
                a = a.replace(k, v)
            args.append(a)
        r = subprocess.run([sys.executable, "-m", "metapeft.cli", *args], capture_output=True,
                           text=True, timeout=300,
                           env={**os.environ, "METAPEFT_HOME": world["{home}"],
                                "METAPEFT_EXPERIENCE": "off"})
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, \
            (line, r.returncode, r.stderr[-800:])


# --------------------------------------------------------------------------------------------
# faults: kill -9 in the middle of a run
# --------------------------------------------------------------------------------------------

KILLED_RUN = """
import sys, time
from metapeft import api

def on_step(t, *a):
    if t == 3:  # steps 1-2 are checkpointed; stop here, mid-run, and wait for SIGKILL
        print("ready", flush=True)
        time.sleep(120)

api.meta_train("synthetic", name="k", registry=sys.argv[1], ways=3, shots=2, query=2,
               inner_steps=1, meta_batch=1, meta_steps=4, eval_every=0, checkpoint_every=1,
               on_step=on_step, record_experience=True)
"""


def test_kill_9_keeps_every_earlier_artifact_and_resume_finishes(world, tmp_path):
    import shutil
    import signal

    from metapeft import api
    from metapeft import registry as reg
    from metapeft.artifacts import load_safetensors

    home = tmp_path / "home"
    shutil.copytree(world["{home}"], home)
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(home)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "METAPEFT_HOME": str(home)})
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    for p, data in before.items():  # every earlier artifact is byte-identical
        assert p.read_bytes() == data, p
    ck = reg.checkpoint_path("k", home)
    arrays, meta = load_safetensors(ck)  # the last checkpoint is whole
    assert meta["step"] == "2" and not reg.list_versions("k", home)
    res = api.meta_train("synthetic", name="k", registry=home, ways=3, shots=2, query=2,
                         inner_steps=1, meta_batch=1, meta_steps=4, eval_every=0, resume=True)
    assert res.version == 1 and len(res.meta_losses) == 4 and not ck.exists()

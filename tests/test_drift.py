"""The drift gate (``metapeft weights check`` and ``meta-train --gate``): a version against itself
passes with drift 0 and delta 0; a damaged version fails with exit 3 and the rollback command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import metapeft  # noqa: F401  (preloads OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import pytest
from _cli import in_process

from metapeft import drift
from metapeft import registry as reg
from metapeft.artifacts import load_safetensors
from metapeft.errors import UserError

SMALL = dict(ways=3, shots=2, query=2)
PROBE = ["--tasks", "4", "--steps", "2", "--ways", "3", "--shots", "2", "--query", "2"]
META = dict(ways=3, shots=2, query=2, inner_steps=2, meta_batch=2, meta_steps=3, eval_every=1,
            eval_episodes=2, calibrate_decays=(0.0,))  # constant lrs: half the calibration time


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "metapeft.cli", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "COLUMNS": "200",
                                                       **(env or {})})


def damage(root, spec: str = "d@1", scale: float = 1.0, name: str = "d") -> int:
    """A new version of ``name``: ``spec``'s weights with Gaussian noise of std ``scale``."""
    arrays, meta = load_safetensors(reg.resolve(spec, root))
    mx.random.seed(0)
    noisy = {k: v + scale * mx.random.normal(v.shape) for k, v in arrays.items()}
    return reg.save_version(name, noisy, meta, root)[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A registry with d@1 (meta-trained on the synthetic families) and d@2 (d@1 + noise)."""
    from metapeft import api

    root = tmp_path_factory.mktemp("reg")
    api.meta_train("synthetic", name="d", registry=root, **META)
    assert damage(root) == 2
    return root


def test_a_version_against_itself_passes_with_zero_drift(root):
    r = drift.check("d@1", "d@1", "synthetic", registry=root, tasks=4, steps=2, **SMALL)
    assert r.passed and r.reasons == [] and r.rollback is None
    assert r.drift == 0.0 and r.agreement == 1.0
    assert r.delta["mean"] == 0.0 and r.delta["ci"] == 0.0
    assert r.accuracy_new == r.accuracy_old
    assert r.num_tasks == 4 and r.num_queries == 4 * 3 * 2
    # the stored test-time lr is the one each version adapts with
    meta = load_safetensors(reg.resolve("d@1", root))[1]
    assert r.new["lr"] == pytest.approx(float(meta["adapt_lr"])) and r.new["lr_from"] == "adapt_lr"
    json.dumps(r.to_json(), allow_nan=False)


def test_a_damaged_version_fails(root):
    r = drift.check("d", "d@1", "synthetic", registry=root, tasks=4, steps=2, **SMALL)
    assert r.new["version"] == 2 and not r.passed
    assert r.drift > drift.DEFAULT_MAX_DRIFT
    assert any("drift" in why for why in r.reasons)
    assert r.rollback == f"metapeft weights rollback d 1 --registry {root}"
    # every per-task row is paired: the delta is the mean of the per-task deltas
    deltas = [row["delta"] for row in r.per_task]
    assert r.delta["mean"] == pytest.approx(sum(deltas) / len(deltas))
    assert r.delta["low"] <= r.delta["mean"] <= r.delta["high"]
    # generous thresholds let it pass
    ok = drift.check("d", "d@1", "synthetic", registry=root, tasks=4, steps=2, tolerance=1.0,
                     max_drift=100.0, **SMALL)
    assert ok.passed and ok.drift == pytest.approx(r.drift)


def test_a_slightly_perturbed_version_drifts_a_little(root):
    v = damage(root, scale=0.01, name="small")
    r = drift.check(f"small@{v}", "d@1", "synthetic", registry=root, tasks=4, steps=2, **SMALL)
    assert 0.0 < r.drift < 0.05 and r.agreement > 0.8
    assert r.rollback is None  # another name: no rollback command, whatever the verdict


def test_probe_tasks_are_fixed():
    a = drift.probe_tasks("synthetic", tasks=3, **SMALL)
    b = drift.probe_tasks("synthetic", tasks=3, **SMALL)
    assert [t.name for t in a] == [t.name for t in b]
    assert [[e.text for e in t.query] for t in a] == [[e.text for e in t.query] for t in b]
    c = drift.probe_tasks("synthetic", tasks=3, seed=1, **SMALL)
    assert [t.name for t in c] != [t.name for t in a]


def test_without_a_stored_lr_the_method_default_is_used(root, tiny):
    from metapeft.adapters import get_adapter_class

    arrays, meta = load_safetensors(reg.resolve("d@1", root))
    meta = {k: v for k, v in meta.items() if k not in ("adapt_lr", "adapt_lr_calibration")}
    v, _ = reg.save_version("nolr", arrays, meta, root)
    c = drift.load_contender(f"nolr@{v}", tiny, root)
    assert c.lr_from == "method default"
    assert c.lr == get_adapter_class(meta["method"]).default_lr


@pytest.mark.parametrize("kwargs,needle", [
    ({"tolerance": -0.1}, "tolerance"), ({"max_drift": float("nan")}, "max-drift"),
    ({"steps": -1}, "steps"), ({"tasks": 0}, "tasks"), ({"ways": 99}, "ways"),
])
def test_bad_options(root, kwargs, needle):
    args = {"tasks": 2, "steps": 1, **SMALL, **kwargs}
    with pytest.raises(UserError, match=needle):
        drift.check("d@1", "d@1", "synthetic", registry=root, **args)


def test_cli_exit_codes(root):
    ok = run("weights", "check", "d@1", "--against", "d@1", "--data", "synthetic",
             "--registry", str(root), *PROBE)
    assert ok.returncode == 0, ok.stderr
    assert "passed" in ok.stdout and "drift      0.000" in ok.stdout

    bad = run("weights", "check", "d", "--against", "d@1", "--data", "synthetic",
              "--registry", str(root), *PROBE)
    assert bad.returncode == drift.GATE_FAILED == 3, bad.stderr
    assert "failed" in bad.stdout
    assert f"roll back with: metapeft weights rollback d 1 --registry {root}" in bad.stdout

    js = run("weights", "check", "d", "--against", "d@1", "--data", "synthetic",
             "--registry", str(root), *PROBE, "--json")
    assert js.returncode == 3
    obj = json.loads(js.stdout)
    assert obj["passed"] is False and obj["rollback"].startswith("metapeft weights rollback d 1")

    for args, needle in ((["d@9", "--against", "d@1", "--data", "synthetic"], "d@9"),
                         (["d", "--against", "d@1", "--data", "/no/such.jsonl"], "probe data"),
                         (["d", "--against", "d@1"], "--data")):
        r = in_process("weights", "check", *args, "--registry", str(root), *PROBE)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- meta-train --gate

CLI_META = ["--meta-steps", "3", "--ways", "3", "--shots", "2", "--query", "2", "--inner-steps",
            "2", "--meta-batch", "2", "--eval-every", "1", "--eval-episodes", "2",
            "--lr-decays", "0"]
CLI_GATE = ["--gate", "--gate-tasks", "4", "--gate-steps", "2"]


def test_meta_train_gate(tmp_path):
    """The first version has nothing to check against; the same run again passes (drift 0); a
    run whose latest version is damaged fails: exit 3, nothing published, the candidate kept."""
    reg_dir = tmp_path / "reg"
    home = {"METAPEFT_HOME": str(tmp_path / "home")}
    first = run("meta-train", "--name", "g", "--registry", str(reg_dir), *CLI_META, *CLI_GATE,
                env=home)
    assert first.returncode == 0, first.stderr
    assert "gate: no earlier version of g" in first.stdout and "published g@1" in first.stdout

    again = run("meta-train", "--name", "g", "--registry", str(reg_dir), *CLI_META, *CLI_GATE,
                "--json", env=home)
    assert again.returncode == 0, again.stderr
    obj = json.loads(again.stdout)
    assert obj["published"] is True and obj["version"] == 2
    g = obj["gate"]
    assert g["against"] == "g@1" and g["passed"] and g["drift"] == 0.0
    assert g["delta"]["mean"] == 0.0 and g["tasks"] == 4 and g["steps"] == 2
    shown = reg.show("g@2", reg_dir)["metadata"]["gate"]  # the published version says so
    assert shown["against"] == "g@1" and shown["passed"] is True
    assert "gate    " in run("weights", "show", "g@2", "--registry", str(reg_dir)).stdout

    v = damage(reg_dir, "g@2", name="g")  # the latest is now a damaged g@3
    failed = run("meta-train", "--name", "g", "--registry", str(reg_dir), *CLI_META, *CLI_GATE,
                 env=home)
    assert failed.returncode == drift.GATE_FAILED, failed.stderr
    assert f"gate against g@{v}" in failed.stdout and "gate failed: drift" in failed.stdout
    assert "not published" in failed.stdout and "published g@" not in failed.stdout
    assert reg.list_versions("g", reg_dir) == [1, 2, 3] and reg.latest_version("g", reg_dir) == 3
    assert not reg.checkpoint_path("g", reg_dir).exists()
    [kept] = sorted((reg_dir / "candidates" / "g").glob("*.safetensors"))
    arrays, meta = load_safetensors(kept)
    assert json.loads(meta["gate"])["passed"] is False and meta["candidate"] == "true"
    assert json.loads(kept.with_suffix(".json").read_text())["passed"] is False
    assert str(kept) in failed.stdout
    # the kept candidate equals the honest g@2 (same data, settings and seed)
    same = drift.check("g@2", "g@2", "synthetic", registry=reg_dir, tasks=1, steps=0, **SMALL)
    assert same.passed
    a2, _ = load_safetensors(reg.resolve("g@2", reg_dir))
    assert all(bool(mx.array_equal(a2[k], arrays[k])) for k in a2)

    js = run("meta-train", "--name", "g", "--registry", str(reg_dir), *CLI_META, *CLI_GATE,
             "--json", env=home)
    assert js.returncode == 3
    obj = json.loads(js.stdout)
    assert obj["published"] is False and obj["version"] is None
    assert obj["path"].startswith(str(reg_dir / "candidates" / "g"))


def test_meta_train_gate_bad_input_fails_before_training(tmp_path):
    reg_dir = tmp_path / "reg"
    from metapeft import api

    api.meta_train("synthetic", name="b", registry=reg_dir, **META)
    for extra, needle in ((["--gate-data", str(tmp_path / "nope.jsonl")], "probe data"),
                          (["--gate-tolerance", "-1"], "tolerance"),
                          (["--gate-tasks", "0"], "tasks"),
                          (["--method", "dora"], "this run trains dora")):
        r = in_process("meta-train", "--name", "b", "--registry", str(reg_dir), *CLI_META,
                       *CLI_GATE, *extra)
        assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "meta-train lora" not in r.stdout + r.stderr  # no progress: nothing trained
    assert reg.list_versions("b", reg_dir) == [1]

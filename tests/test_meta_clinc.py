"""benchmarks/meta_clinc.py on stories260K with a 1-meta-step recipe: --meta-start multitask
meta-learns from the multitask init (and the version says so), and a step-size calibration cached
under --calibrate DIR is refused for other weights or other validation classes (it once could be
silently reused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
pytestmark = pytest.mark.skipif(not (SHARED / "models" / "stories260K").exists()
                                or not (SHARED / "data" / "clinc150").exists(),
                                reason="needs ../shared (stories260K and CLINC150)")
TINY = ["--meta-steps", "1", "--meta-batch", "1", "--inner-steps", "1", "--tasks", "0",
        "--baselines", "", "--multitask-steps", "2"]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "meta_clinc.py"), *args],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "METAPEFT_EXPERIENCE": "off"})


def test_meta_start_multitask_and_the_calibration_cache_guard(tmp_path):
    mt = tmp_path / "M.safetensors"
    missing = bench(*TINY, "--inits", "meta", "--meta-start", "multitask",
                    "--multitask-weights", str(mt))
    assert missing.returncode == 2 and "no multitask init at" in missing.stderr

    assert bench(*TINY, "--inits", "multitask", "--multitask-weights", str(mt)).returncode == 0
    cal = ["--calibrate", str(tmp_path / "CAL"), "--calibrate-inits", "meta",
           "--calibrate-tasks", "1", "--calibrate-factors", "1", "--calibrate-decays", "0"]
    p = bench(*TINY, "--inits", "meta", "--registry", str(tmp_path / "R"), "--meta-start",
              "multitask", "--multitask-weights", str(mt), *cal)
    assert p.returncode == 0, p.stderr
    from metapeft.artifacts import load_safetensors

    _, meta = load_safetensors(tmp_path / "R" / "weights" / "bench" / "v0001.safetensors")
    assert json.loads(meta["start"])["file"] == "M.safetensors"
    assert "init_digest" in json.loads((tmp_path / "CAL" / "meta.json").read_text())

    other = bench(*TINY, "--inits", "meta", "--registry", str(tmp_path / "R2"), *cal)
    lines = [ln for ln in other.stderr.splitlines() if ln.strip()]
    assert other.returncode == 2 and "calibrated for other meta weights" in lines[-1], other.stderr

    # the same weights, asked for a horizon the cached calibration did not choose for
    hz = bench(*TINY, "--inits", "meta", "--meta-weights",
               str(tmp_path / "R" / "weights" / "bench" / "v0001.safetensors"), *cal,
               "--calibrate-horizons", "5", "--horizon", "5")
    lines = [ln for ln in hz.stderr.splitlines() if ln.strip()]
    assert hz.returncode == 2 and "no choice for horizon(s) 5" in lines[-1], hz.stderr

    # the same weights, validated on whole held-out domains: not the cached calibration's tasks
    same = bench(*TINY, "--inits", "meta", "--meta-weights",
                 str(tmp_path / "R" / "weights" / "bench" / "v0001.safetensors"),
                 "--val-domains", "work", *cal)
    lines = [ln for ln in same.stderr.splitlines() if ln.strip()]
    assert same.returncode == 2 and "other validation classes" in lines[-1], same.stderr

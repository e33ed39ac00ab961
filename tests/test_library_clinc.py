"""benchmarks/library_clinc.py's task identity: the library's domains are checked before anything
is trained, and ``--merge`` refuses runs on other tasks (another corpus, other held-out domains)
instead of pairing their task i with this run's task i."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "library_clinc.py"), *args],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "METAPEFT_EXPERIENCE": "off"})


@pytest.mark.skipif(not (SHARED / "models" / "stories260K").exists()
                    or not (SHARED / "data" / "clinc150").exists(),
                    reason="needs ../shared (stories260K and CLINC150)")
def test_unknown_library_domain_is_one_line_before_any_training(tmp_path):
    p = bench("--tasks", "0", "--registry", str(tmp_path / "LIB"), "--library-domains",
              "banking,bankng")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "unknown domain 'bankng'" in lines[0] and "travel" in lines[0]
    assert not list((tmp_path / "LIB").rglob("*.safetensors"))  # nothing was built

    p = bench("--tasks", "0", "--registry", str(tmp_path / "LIB"), "--held-out", "bankin")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1
    assert "--held-out: unknown domain 'bankin'" in lines[0]


def run_record(path: Path, **args) -> str:
    """A minimal ``--json`` record of one task's run, as the benchmark writes it."""
    base = {"task_seed": 30000, "model": "m", "steps": [0, 1], "arm_list": ["meta"]}
    path.write_text(json.dumps({"info": {"adapters": 1, "disk_bytes": 0}, "load": "",
                                "args": {**base, **args},
                                "results": [{"i": 0, "meta": {"acc": [0.5, 0.6], "seconds": 1}}]}))
    return str(path)


@pytest.mark.parametrize("field, other", [("data", "/elsewhere/wordnet"), ("held_out", "verb"),
                                          ("task_seed", 7)])
def test_merge_refuses_runs_on_other_tasks(tmp_path, field, other):
    a = run_record(tmp_path / "a.json")  # a run from before --data: CLINC150, banking,travel
    b = run_record(tmp_path / "b.json", **{field: other})
    p = bench("--merge", f"{a},{b}")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0] == f"--merge: the runs differ in {field}; they are not the same tasks"


def test_merge_treats_a_run_from_before_data_as_clinc150(tmp_path):
    a = run_record(tmp_path / "a.json")
    b = run_record(tmp_path / "b.json", data=str(SHARED / "data" / "clinc150"),
                   held_out="banking,travel", arm_list=["compose-meta"])
    b_rec = json.loads(Path(b).read_text())
    row = {"acc": [0.7, 0.8], "seconds": 2, "search_seconds": 1.0}
    b_rec["results"] = [{"i": 0, "compose-meta": row}]
    Path(b).write_text(json.dumps(b_rec))
    p = bench("--merge", f"{a},{b}", "--json", str(tmp_path / "m.json"))
    assert p.returncode == 0, p.stderr
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["results"] == [{"i": 0, "meta": {"acc": [0.5, 0.6], "seconds": 1},
                                  "compose-meta": row}]
    assert "compose-meta − meta | +20.0" in p.stdout  # the paired row: 0.7 - 0.5


@pytest.mark.skipif(not (SHARED / "models" / "stories260K").exists()
                    or not (SHARED / "data" / "clinc150").exists(),
                    reason="needs ../shared (stories260K and CLINC150)")
def test_calibration_input_is_checked_before_any_training(tmp_path):
    for args, message in ((["--calibrate-split", "dev"], "clinc150 has no dev.jsonl"),
                          (["--calibrate-factors", "1,x"], "--calibrate-factors must be")):
        p = bench("--tasks", "0", "--registry", str(tmp_path / "LIB"), "--calibrate", "2", *args)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, p.stderr
        assert message in lines[0]
    assert not list((tmp_path / "LIB").rglob("*.safetensors"))  # nothing was built

"""Benchmarks over MLX's distributed engine (``benchmarks/_ranks.py``): ``select_eval.py`` and
``hpo_eval.py --processes 2`` split their tasks over two ring ranks and must report what one
process reports (tiny model, a few short runs each), and ``meta.distributed.alone()`` makes a
rank's own library calls see one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CLINC_TEST = ROOT.parent / "shared" / "data" / "clinc150" / "test.jsonl"


def _ring_missing() -> str | None:
    import mlx.core as mx

    return None if mx.distributed.is_available("ring") else "this MLX has no ring backend"


needs_ring = pytest.mark.skipif(_ring_missing() is not None, reason=str(_ring_missing()))


def bench(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    p = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                       text=True, env={**env, "METAPEFT_RUNS": "off"}, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_alone_is_a_group_of_one_and_nests():
    from metapeft.meta import distributed as dist

    with dist.alone():
        with dist.alone():
            assert (dist.world().size(), dist.world().rank()) == (1, 0)
        assert dist.size_of(dist.world()) == 1
        assert dist.gather_slots({0: 2.5}, 2, dist.world()) == [2.5, 0.0]
    assert not isinstance(dist.world(), dist._Alone)


def test_ranks_strip_their_flag():
    from metapeft.cli.launch import without

    assert without(["--a", "1", "--processes", "2", "--b", "--processes=3"],
                   "--processes") == ["--a", "1", "--b"]


@needs_ring
def test_select_eval_two_processes_report_what_one_does(tmp_path):
    args = ["--groups", "synthetic", "--per-domain", "1", "--steps", "1", "--methods",
            "lora,prompt", "--epochs", "10"]
    one = bench("select_eval.py", *args, "--cache", str(tmp_path / "c1"))
    two = bench("select_eval.py", *args, "--cache", str(tmp_path / "c2"), "--processes", "2")
    # both ranks ran tasks (their appends interleave in the store), rank 0 alone reported
    assert "(rank 0)" in two.stderr and "(rank 1)" in two.stderr
    assert two.stdout.count("### synthetic") == 1
    assert two.stdout == one.stdout  # same records, put back in the one-process order


@needs_ring
@pytest.mark.skipif(not CLINC_TEST.exists(), reason=f"{CLINC_TEST} is absent")
def test_hpo_eval_two_processes_gather_what_one_measures(tmp_path):
    args = ["--model", "tiny", "--tasks", "2", "--trials", "1", "--steps", "1", "--test", "2",
            "--query", "2", "--shots", "2", "--ways", "3"]
    bench("hpo_eval.py", *args, "--out", str(tmp_path / "one.json"))
    two = bench("hpo_eval.py", *args, "--out", str(tmp_path / "two.json"), "--processes", "2")
    assert "Wall time (2 processes)" in two.stdout
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    assert b["processes"] == 2 and not list(tmp_path.glob("two.json.rank*"))

    def key(rows, arm):
        return [[(t.get("method"), t.get("params"), t.get("accuracy")) for t in r[arm]]
                for r in rows]

    assert [r["task"] for r in b["rows"]] == [r["task"] for r in a["rows"]]
    # bo-warm's store depends on which tasks the other rank has finished: every other arm,
    # and the test-set scores of their chosen configurations, are what one process measures
    for arm in ("default", "random", "bo-cold"):
        assert key(b["rows"], arm) == key(a["rows"], arm), arm
        assert [r["test"][arm] for r in b["rows"]] == [r["test"][arm] for r in a["rows"]]
    assert [len(r["bo-warm"]) for r in b["rows"]] == [1, 1]

"""Data-parallel meta-training on mx.distributed: `meta-train --processes 2` runs two ranks under
mlx.launch (ring backend, localhost) and must publish the θ a single process publishes, for
Reptile and FOMAML; a rank killed mid-run ends the run with one line and a checkpoint that
resumes (here with one process) into the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from metapeft.cli.launch import launcher


def _ring_unavailable() -> str | None:
    import mlx.core as mx

    if launcher() is None:
        return "this MLX has no mlx.launch"
    if not mx.distributed.is_available("ring"):
        return "this MLX has no ring backend"
    return None


needs_ring = pytest.mark.skipif(_ring_unavailable() is not None,
                                reason=str(_ring_unavailable()))

SMALL = ["--ways", "3", "--shots", "2", "--query", "2", "--inner-steps", "2", "--seed", "1"]


def in_process(*args) -> dict:
    """The one-process reference: the same command line, in this process (world size 1)."""
    from metapeft.cli import app

    r = CliRunner().invoke(app, ["meta-train", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def launched(*args, processes=2, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metapeft.cli", "meta-train", *args,
                             "--processes", str(processes), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200", **(env or {})}, **kw)


def weights(path) -> tuple[dict, dict]:
    from metapeft.artifacts import load_safetensors

    arrays, meta = load_safetensors(path)
    return {k: np.array(v) for k, v in arrays.items()}, meta


@needs_ring
@pytest.mark.parametrize("algorithm,extra", [
    # Reptile: 3 tasks split 2+1 (rank 1's single task runs without vmap), validation
    # (3 episodes: 2+1) and the lr calibration (3 tasks: 2+1) split too
    ("reptile", ["--meta-batch", "3", "--eval-every", "2", "--eval-episodes", "3"]),
    # FOMAML (outer Adam): 4 tasks split 2+2, no validation or calibration
    ("fomaml", ["--meta-batch", "4", "--eval-every", "0", "--no-calibrate-lr"]),
    # pretraining first: rank 0 alone pretrains and hands θ to rank 1 (one all-reduce)
    ("reptile", ["--meta-batch", "2", "--eval-every", "0", "--no-calibrate-lr",
                 "--pretrain-steps", "3"]),
])
def test_two_processes_publish_the_one_process_theta(tmp_path, algorithm, extra):
    args = [*SMALL, "--algorithm", algorithm, "--meta-steps", "3", "--name", "d", *extra]
    p = launched(*args, "--registry", str(tmp_path / "two"))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # rank 0 alone prints
    two = json.loads(lines[0])
    one = in_process(*args, "--registry", str(tmp_path / "one"))
    assert two["version"] == 1 and not (tmp_path / "two/weights/d/checkpoint.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "two/weights/d").glob("v*")) == ["v0001.safetensors"]
    assert two["meta_loss"] == pytest.approx(one["meta_loss"], abs=1e-4)
    assert two["meta_accuracy"] == pytest.approx(one["meta_accuracy"], abs=1e-6)
    assert two["val_accuracy"] == one["val_accuracy"] and two["best_step"] == one["best_step"]
    w2, m2 = weights(two["path"])
    w1, m1 = weights(one["path"])
    assert sorted(w2) == sorted(w1)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-5, err_msg=k)
    assert two["adapt_lr"] == one["adapt_lr"]
    if "--no-calibrate-lr" not in extra:  # the calibration table gathered from both ranks
        cal1, cal2 = (json.loads(m["adapt_lr_calibration"]) for m in (m1, m2))
        assert cal2["table"] == cal1["table"] and cal2["num_tasks"] == 3


def _rank_pid(root: int, rank: int) -> int | None:
    """The pid of rank ``rank`` among ``root``'s descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo, found = [root], []
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            todo.append(c)
            try:
                env = Path(f"/proc/{c}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{c}/cmdline").read_bytes()
            except OSError:
                continue
            if f"MLX_RANK={rank}".encode() in env and b"metapeft.cli" in cmd:
                found.append(c)
    return found[0] if found else None


@needs_ring
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_killed_rank_ends_the_run_with_one_line_and_a_resumable_checkpoint(tmp_path):
    from metapeft import api
    from metapeft import registry as reg
    from metapeft.artifacts import load_safetensors

    home = tmp_path / "home"
    steps = 12  # checkpoints every 5 meta-steps
    args = [*SMALL, "--meta-batch", "2", "--meta-steps", str(steps), "--eval-every", "0",
            "--no-calibrate-lr", "--name", "k", "--registry", str(home)]
    ck = reg.checkpoint_path("k", home)
    p = launched(*args)
    killed = None
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline and killed is None:
        if ck.exists():
            killed = _rank_pid(p.pid, 1)
            if killed:
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    out, err = p.communicate(timeout=120)
    if killed is None:
        pytest.skip("the run ended before rank 1 could be killed (machine too fast for this "
                    "test's timing)")
    assert p.returncode == 1, (out, err)
    last = err.strip().splitlines()[-1]
    assert "process 1 of 2 was killed by signal 9" in last and "--resume" in last, err
    assert "[ring]" not in err and not out.strip()
    assert not reg.list_versions("k", home)
    arrays, meta = load_safetensors(ck)  # whole, and it says where it stopped
    stopped = int(meta["step"])
    assert 5 <= stopped < steps and f"meta-step {stopped}" in last
    # it resumes, here with one process, into the run that was never interrupted
    kw = dict(name="k", registry=home, ways=3, shots=2, query=2, inner_steps=2, seed=1,
              meta_batch=2, meta_steps=steps, eval_every=0, calibrate_lr=False)
    resumed = api.meta_train("synthetic", resume=True, **kw)
    full = api.meta_train("synthetic", **{**kw, "name": "full"})
    assert resumed.meta_losses == pytest.approx(full.meta_losses, abs=1e-4)
    w1, _ = weights(resumed.path)
    w2, _ = weights(full.path)
    # the two ranks adapted one task each without vmap, the full run both under vmap: float
    # rounding apart (tests/test_meta.py bounds vmap against the loop), the same run; a wrong
    # step, schedule or task stream would be off by orders of magnitude more
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], rtol=0, atol=1e-3, err_msg=k)


@pytest.mark.parametrize("env,value,message", [
    ({}, "0", "--processes must be >= 1"),
    ({"MLX_RANK": "1"}, "2", "already is a process of a distributed run"),
])
def test_processes_refuses_in_one_line(env, value, message):
    from metapeft.cli import app

    r = CliRunner().invoke(app, ["meta-train", "--name", "x", "--processes", value], env=env)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1


@needs_ring
def test_two_processes_continue_from_a_version_as_one_does(tmp_path):
    """meta-train --init under mlx.launch: the Fisher, the replay tasks and the forgetting/gain
    measures come out as in one process, and rank 0 alone publishes."""
    base = [*SMALL, "--meta-batch", "4", "--eval-every", "2", "--eval-episodes", "3",
            "--meta-steps", "2", "--val-fraction", "0.34", "--no-calibrate-lr", "--name", "c"]
    for reg in ("one", "two"):
        in_process(*base, "--domains", "topic", "--registry", str(tmp_path / reg))
    args = [*base, "--domains", "intent", "--init", "c@1"]
    p = launched(*args, "--registry", str(tmp_path / "two"))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    two = json.loads(out.strip().splitlines()[-1])
    one = in_process(*args, "--registry", str(tmp_path / "one"))
    assert two["version"] == one["version"] == 2 and two["parent"] == "c@1"
    assert sorted(p.name for p in (tmp_path / "two/weights/c").glob("v*")) == [
        "v0001.safetensors", "v0002.safetensors"]
    assert two["forgetting"] == one["forgetting"] and two["gain"] == one["gain"]
    w2, _ = weights(two["path"])
    w1, _ = weights(one["path"])
    assert sorted(w2) == sorted(w1) and any(k.startswith("fisher.") for k in w1)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-5, err_msg=k)


WAITER = """
import json, os, sys, time
import metapeft
import mlx.core as mx
from metapeft.meta import distributed as dist
g = dist.world()
x = mx.ones((1000,))
dist.all_sum([x], g)
if g.rank() == 0:
    time.sleep(2.0)  # the slow rank; the other waits for it in the next all-reduce
c, t = time.process_time(), time.perf_counter()
(y,) = dist.all_sum([x], g)
out = {"cpu": time.process_time() - c, "wall": time.perf_counter() - t, "sum": y[0].item(),
       "left": sorted(os.listdir(os.environ[dist.LOCAL_ENV]))}
open(sys.argv[1] + f".{g.rank()}", "w").write(json.dumps(out))
"""


@needs_ring
def test_a_rank_waiting_for_a_slower_one_sleeps(tmp_path):
    """Ranks started on this machine meet before each all-reduce asleep: MLX's ring backend
    would busy-poll a core for the whole wait."""
    from metapeft.cli.launch import run_local_ring

    script = tmp_path / "waiter.py"
    script.write_text(WAITER)
    assert run_local_ring(2, [sys.executable, str(script), str(tmp_path / "out")], {},
                          tmp_path) == []
    waited = json.loads((tmp_path / "out.1").read_text())
    assert waited["wall"] > 1.5 and waited["cpu"] < 0.5 * waited["wall"], waited
    assert waited["sum"] == 2.0
    # each rank removes its file once the all-reduce is done (the peer may still read it before)
    assert all(f"reduce2.{r}" not in json.loads((tmp_path / f"out.{r}").read_text())["left"]
               for r in (0, 1))


def test_waiting_for_a_dead_peer_ends_in_one_line(tmp_path, monkeypatch):
    """A peer that died before reaching the all-reduce: the waiting rank notices (its pid file
    names a process that is gone) and raises instead of waiting for ever."""
    from metapeft.meta import distributed as dist

    class Group:  # rank 0 of 2; rank 1 never arrives
        def rank(self):
            return 0

        def size(self):
            return 2

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    (tmp_path / "pid.1").write_text(str(dead.pid))
    monkeypatch.setenv(dist.LOCAL_ENV, str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(dist.DistributedError, match=f"rank 1, pid {dead.pid}"):
        dist._arrive(Group())
    assert time.perf_counter() - t0 < 10
    assert (tmp_path / "pid.0").read_text() == str(os.getpid())

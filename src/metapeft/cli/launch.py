"""``meta-train --processes N`` and ``tune --workers N``: re-run this very command as N ranks of
MLX's ring backend on localhost.

``metapeft meta-train --processes 2 ARGS`` starts ``python -m metapeft.cli meta-train ARGS``
twice, as ``mlx.launch -n 2 --backend ring --hosts 127.0.0.1`` would: each process gets
``MLX_RANK`` and ``MLX_HOSTFILE`` (a ring hostfile of free ports on 127.0.0.1, the file
``mlx.launch`` writes), and ``mx.distributed.init()`` connects them (``meta.distributed``
explains the split). The processes are started here rather than through ``mlx.launch`` because
MLX 0.32's launcher polls its children's pipes in a busy loop: on our 2-core machine it took
half a core, and ``tune --workers 2`` under it ran 10 trials in 112 s against 50 s when started
directly (README, Hyperparameter search). ``mlx.launch`` by hand (several hosts) runs the same
commands; ``ring_command`` builds that command line (``benchmarks/meta_distributed.py``).

Rank 0 prints as a one-process run does; the other ranks print nothing. Each rank leaves its
outcome (done, or its one-line error) in a temporary folder (``METAPEFT_DIST_STATUS``), so the
command ends with one line and a meaningful exit status: 0 when rank 0 finished, 2 with the error
line of a user error, 1 when a process died (killed, crashed, out of memory), naming what is
kept (meta-train: the last checkpoint to ``--resume`` from; tune: the study, saved by rank 0
after every batch). When a process ends badly the others are stopped (SIGTERM), as
``mlx.launch`` does. The ring backend's own complaints about the lost connection are left out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import typer

from metapeft.errors import UserError

STATUS_ENV = "METAPEFT_DIST_STATUS"
_NOISE = ("[ring]",)  # the backend's lines about a lost peer


def launcher() -> list[str] | None:
    """The ``mlx.launch`` command of the MLX this Python runs (None where MLX has none)."""
    here = Path(sys.executable).parent / "mlx.launch"
    if here.exists():
        return [str(here)]
    found = shutil.which("mlx.launch")
    if found:
        return [found]
    try:
        import mlx._distributed_utils.launch  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]


def free_ports(count: int) -> int:
    """A port P with P..P+count-1 free on 127.0.0.1 (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for p in range(base, base + count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise UserError(f"found no {count} consecutive free ports on 127.0.0.1 for the ring backend",
                    field="processes")


def ring_command(processes: int, command: list[str]) -> list[str]:
    """``mlx.launch`` running ``command`` as ``processes`` ranks, ring backend, on 127.0.0.1."""
    return [*launcher(), "-n", str(processes), "--backend", "ring", "--hosts", "127.0.0.1",
            "--starting-port", str(free_ports(processes)), "--", *command]


def _command_args(argv: list[str], command: str, flag: str = "--processes") -> list[str]:
    """The arguments after ``command`` (its last word: ``library calibrate``) in ``argv``,
    without ``flag N``."""
    command = command.split()[-1]
    if command not in argv:
        raise UserError(f"{flag} re-runs the command line, and this one has no "
                        f"'{command}' in it; run mlx.launch yourself", field=flag.lstrip("-"))
    return without(argv[argv.index(command) + 1:], flag)


def without(argv: list[str], flag: str) -> list[str]:
    """``argv`` less ``flag N`` / ``flag=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _checkpoint_line(checkpoint: Path | None) -> str:
    if checkpoint is None or not Path(checkpoint).exists():
        return "no checkpoint was written yet"
    try:
        from metapeft.artifacts import load_safetensors

        step = load_safetensors(checkpoint)[1].get("step", "?")
    except Exception:  # noqa: BLE001 - a report line, never the reason to fail
        step = "?"
    return f"the last checkpoint (meta-step {step}, {checkpoint}) is kept: rerun with --resume"


def relaunch(processes: int, command: str = "meta-train", *, checkpoint: Path | None = None,
             argv: list[str] | None = None, flag: str = "--processes",
             kept: Callable[[], str] | None = None) -> int:
    """Run ``metapeft COMMAND ...`` (this process's own arguments, less ``flag N``) as
    ``processes`` ranks of the ring backend on localhost (``run_local_ring``); returns the exit
    status. ``kept()``: what survives a dead process, for the last line (default: the
    meta-train ``checkpoint``)."""
    from metapeft.meta.distributed import world

    field = flag.lstrip("-")
    if processes < 1:
        raise UserError(f"{flag} must be >= 1, got {processes}", field=field)
    if STATUS_ENV in os.environ or "MLX_RANK" in os.environ or world().size() > 1:
        raise UserError(f"{flag}: this already is a process of a distributed run; give "
                        f"{flag} to the first command only", field=field)
    import mlx.core as mx

    if not mx.distributed.is_available("ring"):
        raise UserError(f"{flag} needs MLX's ring backend, which this MLX does not have",
                        field=field)
    args = _command_args(sys.argv if argv is None else argv, command, flag)
    cmd = [sys.executable, "-m", "metapeft.cli", *command.split(), *args]
    with tempfile.TemporaryDirectory(prefix="metapeft-ranks-") as status:
        exits = run_local_ring(processes, cmd, {STATUS_ENV: status}, Path(status))
        outcome = {}
        for r in range(processes):
            f = Path(status) / f"rank{r}.json"
            if f.exists():
                outcome[r] = json.loads(f.read_text())
    return _report(outcome, processes, checkpoint, exits, label=f"{command} {flag}",
                   kept=kept)


def ring_hostfile(processes: int, folder: Path) -> Path:
    """The ring hostfile ``mlx.launch --backend ring --hosts 127.0.0.1 -n N`` writes: one
    ``["127.0.0.1:PORT"]`` per rank, on free ports."""
    port = free_ports(processes)
    path = Path(folder) / "ring-hosts.json"
    path.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(processes)]))
    return path


def run_local_ring(processes: int, command: list[str], env: dict, folder: Path,
                   poll: float = 0.1) -> list[tuple[int, int]]:
    """Run ``command`` as ``processes`` ranks of the ring backend on 127.0.0.1 and wait for them;
    returns ``(rank, exit status)`` of those that ended badly, in the order seen. Their stdout is
    this process's; their stderr is copied here without the ring backend's lines. The first to
    end badly stops the others (SIGTERM). Waiting is a 10 Hz poll, not a busy loop."""
    import threading
    import time

    from metapeft.meta.distributed import LOCAL_ENV

    hostfile = ring_hostfile(processes, folder)
    meet = Path(folder) / "reduces"  # where the ranks wait for each other asleep
    meet.mkdir(exist_ok=True)
    procs = [subprocess.Popen(command, env={**os.environ, **env, "MLX_HOSTFILE": str(hostfile),
                                            "MLX_RANK": str(r), LOCAL_ENV: str(meet)},
                              stderr=subprocess.PIPE, text=True, errors="replace")
             for r in range(processes)]

    def copy(stream):
        for line in stream:
            if not any(n in line for n in _NOISE):
                sys.stderr.write(line)
                sys.stderr.flush()

    copiers = [threading.Thread(target=copy, args=(p.stderr,), daemon=True) for p in procs]
    for t in copiers:
        t.start()
    exits, seen, stopped = [], set(), False
    try:
        while len(seen) < processes:
            for r, p in enumerate(procs):
                if r not in seen and p.poll() is not None:
                    seen.add(r)
                    if p.returncode != 0:
                        exits.append((r, p.returncode))
            if exits and not stopped:
                stopped = True
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            if len(seen) < processes:
                time.sleep(poll)
    except KeyboardInterrupt:  # Ctrl-C reached the ranks too (same process group)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    for t in copiers:
        t.join(timeout=5)
    return exits


def _how(code: int | None) -> str:
    if code is None:
        return "was killed"
    if code < 0:
        try:
            name = f" ({signal.Signals(-code).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {-code}{name}"
    return f"exited with status {code}"


def _report(outcome: dict, processes: int, checkpoint: Path | None, exits=(),
            label: str = "meta-train --processes", kept: Callable[[], str] | None = None) -> int:
    from metapeft.cli._common import error_line

    if outcome.get(0, {}).get("ok"):
        return 0
    errors = {r: o for r, o in outcome.items() if not o.get("ok")}
    real = [r for r, o in sorted(errors.items()) if not o.get("peer_lost")]
    if real:  # a user error (every rank usually has the same one): rank 0's, else the first
        r = real[0]
        prefix = "" if r == 0 or all(errors[x]["error"] == errors[r]["error"] for x in real) \
            else f"process {r} of {processes}: "
        error_line(prefix + errors[r]["error"])
        return 2
    dead = [r for r in range(processes) if r not in outcome]
    first = [(r, c) for r, c in exits if r in dead]
    if first:  # the first to end badly; then the others were stopped (SIGTERM)
        r, code = first[0]
        who = f"process {r} of {processes} {_how(code)}" + (
            ", so the others were stopped" if processes > 1 else "")
    elif dead:
        who = (f"process{'es' if len(dead) > 1 else ''} {', '.join(map(str, dead))} of "
               f"{processes} ended without finishing (killed or crashed)")
    else:
        who = f"the {processes} processes lost each other"
    error_line(f"{label} {processes}: {who}; "
               f"{kept() if kept is not None else _checkpoint_line(checkpoint)}")
    return 1


def silent_console():
    """The console of a rank other than 0: it prints nothing (rank 0 speaks for the run)."""
    from rich.console import Console

    return Console(file=open(os.devnull, "w"), quiet=True)  # noqa: SIM115


@contextlib.contextmanager
def rank_outcome(rank: int):
    """Under ``--processes``: leave this rank's outcome for the launching process, which prints
    the one line (so no rank prints its error). Under a plain ``mlx.launch``: ranks other than 0
    print only errors of their own (prefixed with the rank); rank 0 prints as usual."""
    from metapeft.cli._common import error_line
    from metapeft.meta.distributed import DistributedError

    status = os.environ.get(STATUS_ENV)

    def leave(**outcome):
        if status:
            Path(status, f"rank{rank}.json").write_text(json.dumps(outcome))

    try:
        yield
    except UserError as e:
        peer_lost = isinstance(e, DistributedError)
        leave(ok=False, error=e.one_line(), peer_lost=peer_lost)
        if status:
            raise typer.Exit(2) from None
        if rank != 0:
            if not peer_lost:
                error_line(f"process {rank}: {e.one_line()}")
            raise typer.Exit(2) from None
        raise
    except typer.Exit as e:
        leave(ok=e.exit_code == 0, error=f"exit status {e.exit_code}", peer_lost=False)
        raise
    else:
        leave(ok=True)

"""``meta-train --processes N``: re-run this very command under ``mlx.launch`` on localhost.

``metapeft meta-train --processes 2 ARGS`` runs

    mlx.launch -n 2 --backend ring --hosts 127.0.0.1 --starting-port P -- \\
        python -m metapeft.cli meta-train ARGS

with P a free port, i.e. MLX's own launcher and ring backend (``meta.distributed`` explains the
split). Rank 0 prints as a one-process run does; the other ranks print nothing. Each rank leaves
its outcome (done, or its one-line error) in a temporary folder (``METAPEFT_DIST_STATUS``), so
the command ends with one line and a meaningful exit status even though ``mlx.launch`` itself
exits 0 whatever its processes did: 0 when rank 0 published, 2 with the error line of a user
error, 1 when a process died (killed, crashed, out of memory), naming the last checkpoint to
``--resume`` from. The ring backend's own complaints about the lost connection are left out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import typer

from metapeft.errors import UserError

STATUS_ENV = "METAPEFT_DIST_STATUS"
_NOISE = ("[ring]", "Node with rank")  # the backend's and the launcher's lines about a lost rank
_EXIT = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


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


def _command_args(argv: list[str], command: str) -> list[str]:
    """The arguments after ``command`` in ``argv``, without ``--processes N``."""
    if command not in argv:
        raise UserError(f"--processes re-runs the command line, and this one has no "
                        f"'{command}' in it; run mlx.launch yourself", field="processes")
    rest, out = argv[argv.index(command) + 1:], []
    skip = False
    for a in rest:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
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
             argv: list[str] | None = None) -> int:
    """Run ``metapeft COMMAND ...`` (this process's own arguments) as ``processes`` ranks under
    ``mlx.launch`` with the ring backend on localhost; returns the exit status."""
    from metapeft.meta.distributed import world

    if processes < 1:
        raise UserError(f"--processes must be >= 1, got {processes}", field="processes")
    if STATUS_ENV in os.environ or "MLX_RANK" in os.environ or world().size() > 1:
        raise UserError("--processes: this already is a process of a distributed run; give "
                        "--processes to the first command only", field="processes")
    import mlx.core as mx

    if launcher() is None or not mx.distributed.is_available("ring"):
        raise UserError("--processes needs mlx.launch and MLX's ring backend, which this MLX "
                        "does not have", field="processes")
    args = _command_args(sys.argv if argv is None else argv, command)
    cmd = ring_command(processes, [sys.executable, "-m", "metapeft.cli", command, *args])
    with tempfile.TemporaryDirectory(prefix="metapeft-ranks-") as status:
        env = {**os.environ, STATUS_ENV: status}
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
        exits = []  # (rank, exit code or None) in the order mlx.launch saw them end badly
        try:
            for line in proc.stderr:
                m = _EXIT.search(line)
                if m:
                    exits.append((int(m.group(1)), None if m.group(2) is None else
                                  int(m.group(2))))
                if not any(n in line for n in _NOISE):
                    sys.stderr.write(line)
                    sys.stderr.flush()
            proc.wait()
        except KeyboardInterrupt:
            proc.wait(timeout=30)
            raise
        outcome = {}
        for r in range(processes):
            f = Path(status) / f"rank{r}.json"
            if f.exists():
                outcome[r] = json.loads(f.read_text())
    return _report(outcome, processes, checkpoint, exits)


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


def _report(outcome: dict, processes: int, checkpoint: Path | None, exits=()) -> int:
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
    if first:  # the first to end badly; mlx.launch then stopped the others (SIGTERM)
        r, code = first[0]
        who = f"process {r} of {processes} {_how(code)}" + (
            ", so the others were stopped" if processes > 1 else "")
    elif dead:
        who = (f"process{'es' if len(dead) > 1 else ''} {', '.join(map(str, dead))} of "
               f"{processes} ended without finishing (killed or crashed)")
    else:
        who = f"the {processes} processes lost each other"
    error_line(f"meta-train --processes {processes}: {who}; {_checkpoint_line(checkpoint)}")
    return 1


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

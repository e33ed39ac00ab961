"""A benchmark's tasks over MLX's distributed engine (``--processes N``), as ``meta-train
--processes`` and ``tune --workers`` run theirs.

``launch(N)`` re-runs the script (its own command line less ``--processes N``) as N ranks of the
ring backend on 127.0.0.1, started directly (``cli.launch.run_local_ring``: ``MLX_RANK`` and a
ring hostfile, a 10 Hz wait, the others stopped when one ends badly). In a rank, ``group()`` is
the global group; ``share(items, group)`` is the items i with i % N == rank; inside ``alone()``
(``meta.distributed.alone``) the library's own calls (``tune``, ``api.meta_train``) see one
process, so they do not split themselves over the benchmark's ranks; ``gather(obj, group)``
brings every rank's JSON-able results to every rank (one all_sum of bytes,
``meta.distributed.gather_json``), and rank 0 writes the output and prints the report.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import metapeft  # noqa: F401  (OpenBLAS before mlx)


def in_rank() -> bool:
    """True in a process started by ``launch`` (or by mlx.launch)."""
    return "MLX_RANK" in os.environ


def launch(processes: int, extra: list[str] = (), flag: str = "--processes") -> int:
    """Run this script again as ``processes`` ranks (its arguments less ``flag N``, plus
    ``extra``) and wait for them; returns 0, or 1 after a line naming the rank that failed."""
    from metapeft.cli.launch import run_local_ring, without

    cmd = [sys.executable, os.path.abspath(sys.argv[0]), *without(sys.argv[1:], flag), *extra]
    with tempfile.TemporaryDirectory(prefix="metapeft-bench-ranks-") as d:
        bad = run_local_ring(processes, cmd, {}, Path(d))
    if bad:
        r, code = bad[0]
        print(f"error: {Path(sys.argv[0]).name} {flag} {processes}: process {r} of {processes} "
              f"ended with status {code}, so the others were stopped", file=sys.stderr)
        return 1
    return 0


def group():
    from metapeft.meta.distributed import world

    return world()


def share(items: list, grp) -> list:
    """The items i with i % size == rank (all of them in one process)."""
    from metapeft.meta.distributed import rank_of, size_of

    return items[rank_of(grp)::size_of(grp)]


def gather(obj, grp) -> list:
    """Every rank's JSON-able ``obj``, in rank order (one process: ``[obj]``)."""
    from metapeft.meta.distributed import gather_json

    return gather_json(obj, grp)


def alone():
    """``meta.distributed.alone()``: the library's calls inside see this process alone."""
    from metapeft.meta.distributed import alone as _alone

    return _alone()

"""Run the CLI in this process (typer's CliRunner) and answer like ``subprocess.run`` does.

A real process costs 2.5-4 s of imports (mlx_lm pulls in transformers) before it can refuse a
bad option; cases that end before any training (bad input, exit codes) run here instead. Cases
that need a real process (stdin, signals, ``mlx.launch``, a script) keep ``subprocess``.
"""

from __future__ import annotations

import subprocess

from typer.testing import CliRunner


def in_process(*args, home=None, env=None) -> subprocess.CompletedProcess:
    from metapeft.cli import app

    env = {"COLUMNS": "200", **({"METAPEFT_HOME": str(home)} if home is not None else {}),
           **(env or {})}
    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        # an escaped exception is a traceback in a real process: show it, never pass as exit 1
        raise AssertionError(f"{' '.join(map(str, args))} raised {r.exception!r}") from r.exception
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)

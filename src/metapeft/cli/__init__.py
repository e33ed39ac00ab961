"""The ``metapeft`` command line: thin Typer commands over ``metapeft.api``.

Each module registers one group of commands (``register(app)``): ``adapt`` (adapt, export),
``predict`` (predict, evaluate), ``serve``, ``meta`` (meta-train, quickstart), ``weights`` (the
meta-weights registry and its drift gate), ``select`` (profile, select, train-selector, sweep,
experience), ``tune``, ``runs`` (the run records) and ``schedule`` (recurring runs); ``_common``
holds what they share, including the run record every command that trains or evaluates
leaves (``record_runs``). A command parses its arguments, makes one ``api``
call and prints the result (``--json``: the report's ``to_json()``).

Only typer loads at import; rich, MLX, mlx-lm and transformers load inside the commands, so
``metapeft --help`` answers instantly. Every ``UserError`` becomes one line on stderr and exit
status 2.
"""

from __future__ import annotations

import os
from typing import Optional

# Typer renders help with rich when it can, which costs ~1 s of imports and layout on our 2-core
# machines; plain help keeps `metapeft --help` under 0.5 s. TYPER_USE_RICH=1 brings rich help back.
os.environ.setdefault("TYPER_USE_RICH", "0")

import typer  # noqa: E402
import typer.core  # noqa: E402

from metapeft.cli import (adapt, library, meta, predict, runs, schedule, select,  # noqa: E402
                          serve, tune, weights)
from metapeft.cli._common import record_runs  # noqa: E402

class _OneLineErrors(typer.core.TyperGroup):
    """Click's own errors (a missing argument, an unknown option, a bad number) as one line on
    stderr too, exit status 2, like every UserError: ``error: Missing argument 'TASK'. (see
    'metapeft adapt --help')``. No arguments at all still prints the help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        # Typer vendors its own click (typer._click), so its exceptions are recognised by what
        # they are (a ClickException has format_message and exit_code), not by import.
        import sys

        from metapeft.cli import _common

        _common.ARGV = list(sys.argv[1:] if args is None else args)  # for the run records
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as e:
            kinds = {c.__name__ for c in type(e).__mro__}
            if "NoArgsIsHelpError" in kinds:
                e.show()
                sys.exit(e.exit_code)
            if "ClickException" in kinds:
                from metapeft.cli._common import error_line

                ctx = getattr(e, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                error_line(e.format_message() + hint)
                sys.exit(e.exit_code)
            if "Abort" in kinds:
                print("aborted", file=sys.stderr)
                sys.exit(1)
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Meta-learned PEFT for MLX: pick a method, start from a meta-learned "
                       "init, tune it.")
for _module in (adapt, predict, serve, meta, weights, library, select, tune, runs, schedule):
    _module.register(app)
record_runs(app)  # every command that trains or evaluates leaves a run record (runs list)


def _print_version(value: bool) -> None:
    if value:
        from metapeft import __version__

        print(__version__)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version,
                                          is_eager=True, help="Print the version and exit."),
             track: Optional[str] = typer.Option(
                 None, "--track", metavar="mlflow", help="Also mirror each run record to a "
                 "local MLflow file store under the registry root (<root>/mlruns; needs the "
                 "mlflow extra).")):
    """Meta-learned PEFT for MLX: pick a method, start from a meta-learned init, tune it."""
    if track is not None:
        from metapeft.cli._common import user_errors
        from metapeft.tracking import ENV, check_tracker

        with user_errors():
            os.environ[ENV] = check_tracker(track.strip().lower()) or "none"


@app.command()
def version():
    """Print the metapeft version (as does --version)."""
    from metapeft import __version__

    print(__version__)


def main() -> None:
    app()

"""What the command modules share: the one-line error handler, the lazy progress bar, adapter
options from ``--set``/``--config``, and the options several commands take (task, model,
``--dequantize``, ``--json``, ...).

Only typer (and metapeft's light modules) load here; rich, MLX and mlx-lm load inside the
commands, so ``metapeft --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from metapeft.adapters import DEFAULT_METHOD, METHODS
from metapeft.console import err_console, out_console  # noqa: F401 (re-exported to the commands)
from metapeft.models import DEFAULT_MODEL, DEQUANTIZE

METHOD_HELP = ", ".join(METHODS[:-1]) + " or " + METHODS[-1]


# --dequantize's choices, from models.load_base_model's modes (typer shows an Enum as choices)
Dequantize = Enum("Dequantize", {mode: mode for mode in DEQUANTIZE}, type=str)


# Options that several commands take, declared once (typer accepts one OptionInfo in many places).
TASK_ARG = typer.Argument(..., help="Task: a directory (train.jsonl + valid/test.jsonl) or a "
                                    "JSONL/CSV pool (with --shots).")
MODEL_OPT = typer.Option(DEFAULT_MODEL, "--model", "-m", help="mlx-lm model path or HF id; "
                         f"'{DEFAULT_MODEL}' is the embedded default.")
DEQUANTIZE_OPT = typer.Option(Dequantize.auto, "--dequantize", help="Quantized checkpoints: "
                              "auto (dequantise to float32 on CPU, where MLX has no fast "
                              "quantized matmul), always or never.")
METHOD_OPT = typer.Option(DEFAULT_METHOD, "--method", help=METHOD_HELP)
SHOTS_OPT = typer.Option(None, "--shots", help="Single-file tasks: examples per class.")
QUERY_OPT = typer.Option(None, "--query", help="Single-file tasks: query examples per class.")
WAYS_OPT = typer.Option(None, "--ways", help="Single-file tasks: number of classes.")
TEXT_FIELD_OPT = typer.Option("text", "--text-field", help="Name of the text field.")
LABEL_FIELD_OPT = typer.Option("label", "--label-field", help="Name of the label field.")
CONFIG_OPT = typer.Option(None, "--config", help="YAML/JSON file of adapter options.")
SET_OPT = typer.Option(None, "--set", help="Adapter option key=value (repeatable), e.g. rank=4.")
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object.")
REGISTRY_OPT = typer.Option(None, "--registry", help="Registry dir (default $METAPEFT_HOME or "
                                                     "the user data dir).")
EXPERIENCE_OPT = typer.Option(None, "--experience", "-e", help="Experience store (default "
                              "<METAPEFT_HOME or user data dir>/experience.safetensors).")


def option_group(into: str, options: dict, *, after_arguments: bool = False):
    """A decorator giving a command the ``options`` ({name: (type, typer option)}), declared
    once here instead of in every command that takes them. The command receives their values as
    one dict in its parameter ``into`` (enums as their strings), ready to pass to the api."""
    keyword = inspect.Parameter.KEYWORD_ONLY

    def decorate(command):
        sig = inspect.signature(command)
        own = [p.replace(kind=keyword) for p in sig.parameters.values() if p.name != into]
        added = [inspect.Parameter(name, keyword, default=option, annotation=kind)
                 for name, (kind, option) in options.items()]
        at = (sum(isinstance(p.default, typer.models.ArgumentInfo) for p in own)
              if after_arguments else len(own))

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {name: kwargs.pop(name) for name in options}
            return command(**{into: {k: v.value if isinstance(v, Enum) else v
                                     for k, v in values.items()}}, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own[:at] + added + own[at:])
        return wrapper

    return decorate


# Every command that loads a model takes --model and --dequantize (passed on as `model_options`).
with_model_options = option_group("model_options", {"model": (str, MODEL_OPT),
                                                    "dequantize": (Dequantize, DEQUANTIZE_OPT)},
                                  after_arguments=True)
# Every command that reads a TASK path takes how to read it (passed on as `task_options`).
with_task_options = option_group("task_options", {
    "shots": (Optional[int], SHOTS_OPT), "query": (Optional[int], QUERY_OPT),
    "ways": (Optional[int], WAYS_OPT), "text_field": (str, TEXT_FIELD_OPT),
    "label_field": (str, LABEL_FIELD_OPT)})


def error_line(text: str) -> None:
    """``error: TEXT`` as one line on stderr (the text is the user's, never rich markup); the
    run record of the command (``recorded``) keeps it as its ``error``."""
    from rich.markup import escape

    line = " ".join(text.split())
    if _RUNS:
        _RUNS[-1].error = line
    err_console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def user_errors():
    """Turn expected failures into a one-line message and exit status 2 (no traceback)."""
    from metapeft.errors import UserError

    try:
        yield
    except UserError as e:
        error_line(e.one_line())
        raise typer.Exit(2) from None
    except OSError as e:  # a path the checks could not foresee (disk full, permissions, ...)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        error_line(f"{where}{e.strerror or e}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]; artifacts saved so far are intact")
        raise typer.Exit(130) from None


# --------------------------------------------------------------------------------------------
# Run records (metapeft.runs): every command that trains or evaluates leaves runs/ID.json
# --------------------------------------------------------------------------------------------

_RUNS: list = []  # the runs.Recorder of the command running in this process (at most one)
ARGV: list[str] | None = None  # the command line after `metapeft`, set by the app's main()


def _observed(recorder, name: str, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        if hasattr(out, "to_json"):
            recorder.call(name, out)
        return out

    return call


@contextlib.contextmanager
def _observe_api(recorder):
    """While a recorded command runs, every ``metapeft.api`` call it makes hands its report to
    ``recorder`` (the curves and results of the record), then the api is restored."""
    from metapeft import api

    originals = {n: getattr(api, n) for n in api.__all__
                 if inspect.isfunction(getattr(api, n, None))}
    for n, fn in originals.items():
        setattr(api, n, _observed(recorder, n, fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(api, n, fn)


def _distributed_rank() -> bool:
    """A process of a distributed run that is not the one recording it: a rank started by
    ``--processes`` (the launching command records) or a rank other than 0 of ``mlx.launch``."""
    import os

    return "METAPEFT_DIST_STATUS" in os.environ or os.environ.get("MLX_RANK", "0") != "0"


@contextlib.contextmanager
def run_record(command: str, params: dict):
    """Record the command's run (``metapeft.runs``) under the registry root of its
    ``--registry`` (else the default): written when it starts and when it ends, with the
    outcome (exit status, the one-line error) and the reports of its api calls. Yields the
    ``runs.Recorder``, or None when recording is off (``METAPEFT_RUNS=off``)."""
    import sys

    from metapeft import runs

    if not runs.enabled() or _distributed_rank():
        yield None
        return
    rec = runs.Recorder(command, argv=ARGV if ARGV is not None else sys.argv[1:],
                        params=params, registry=params.get("registry"))
    rec.start()
    _RUNS.append(rec)
    code, error, status = 0, None, None
    try:
        with _observe_api(rec):
            yield rec
    except typer.Exit as e:
        code = e.exit_code
        raise
    except KeyboardInterrupt:
        code = 130
        raise
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    except BaseException as e:  # a bug: the traceback follows; the record keeps its last line
        code, status = 1, "crashed"
        error = f"{type(e).__name__}: {' '.join(str(e).split())}"[:1000]
        raise
    finally:
        _RUNS.remove(rec)
        rec.finish(code, error, status)


def recorded(command: str):
    """A decorator: the command's run is recorded (``run_record``) with its parameters."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with run_record(command, kwargs):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


# The commands that train or evaluate, whose runs are recorded.
RECORDED = ("adapt", "meta-train", "quickstart", "sweep", "train-selector", "tune", "evaluate",
            "predict", "weights check", "library build")


def record_runs(app: typer.Typer, commands=RECORDED, prefix: str = "") -> None:
    """Wrap every registered command of ``app`` named in ``commands`` (``group sub`` for a
    group's) in ``recorded``: once, here, for all of them."""
    for info in app.registered_commands:
        name = prefix + (info.name or info.callback.__name__.replace("_", "-"))
        if name in commands and info.callback is not None:
            info.callback = recorded(name)(info.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None and group.name:
            record_runs(group.typer_instance, commands, f"{prefix}{group.name} ")


def compact_table(title: str | None, columns) -> "rich.table.Table":  # noqa: F821
    """A rich Table that reads at 80 columns: light rules, one space between columns, and cells
    that fold onto a second line rather than being cut to "…". A column is a name or
    (name, justify) or (name, justify, no_wrap)."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), title_justify="left",
              collapse_padding=True, pad_edge=False)
    for c in columns:
        name, justify, no_wrap = (c, "left", False) if isinstance(c, str) else (*c, False)[:3]
        t.add_column(name, justify=justify, no_wrap=no_wrap, overflow="fold")
    return t


def short_time(iso) -> str:
    """``2026-05-01T14:02:33+00:00`` -> ``2026-05-01 14:02`` (UTC, as stored)."""
    text = str(iso or "")
    return text[:16].replace("T", " ") if len(text) >= 16 else text or "-"


def print_json(obj) -> None:
    """One line of strict JSON: non-finite numbers are printed as null, never NaN."""
    from metapeft.reports import json_safe

    print(json.dumps(json_safe(obj), default=str, allow_nan=False))


def parse_sets(values: list[str] | None, config_file: Path | None) -> dict:
    """Adapter options from --config FILE (YAML/JSON) and repeated --set key=value."""
    import yaml

    from metapeft.errors import UserError

    out: dict = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise UserError("config file does not exist", path=str(config_file)) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise UserError(f"invalid YAML: {getattr(e, 'problem', e)}", path=str(config_file),
                            line=None if mark is None else mark.line + 1) from None
        if not isinstance(loaded, dict):
            raise UserError("config must be a mapping of option: value", path=str(config_file))
        out.update(loaded)
    for item in values or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}", field="set")
        k, v = item.split("=", 1)
        try:  # typed as YAML (4, 0.1, true, [a, b]); what YAML cannot read stays a string
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def decay_note(cal: dict) -> str:
    """", decaying as 1/(1 + d(t-1))" for a calibration that chose a step-size decay, else ""."""
    d = cal.get("adapt_lr_decay")
    return f", decaying as 1/(1 + {d:g}(t-1))" if d else ""


def csv_list(values: list[str] | None) -> list[str] | None:
    """Repeated and/or comma-separated values as one list (None when none given)."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def parse_numbers(text: str | None, field: str, *, positive: bool) -> tuple[float, ...] | None:
    """``--lr-decays 0,1`` / ``--lr-factors 1,0.5`` (the option ``field`` names) as floats, each
    >= 0 (> 0 when ``positive``), a one-line error otherwise; None (the model's recipe) when not
    given. meta-train and benchmarks/meta_clinc.py parse their lr grids with it."""
    import math

    from metapeft.errors import UserError

    if text is None:
        return None
    try:
        out = tuple(float(x) for x in csv_list([text]) or ())
    except ValueError:
        out = ()
    if not out or not all(math.isfinite(x) and (x > 0 if positive else x >= 0) for x in out):
        raise UserError(f"--{field.replace('_', '-')} must be comma-separated numbers "
                        f"{'> 0' if positive else '>= 0'} (got {text!r})", field=field)
    return out


class PlainProgress:
    """Progress as plain lines, for when the console is not a terminal (a log file, a pipe, CI):
    one line when a task starts, then at most one every ``METAPEFT_PROGRESS_SECONDS`` (default
    10) seconds, and one when it ends, as pip and uv do. The part of rich's ``Progress`` API
    that metapeft uses: ``add_task``, ``update``, ``start``, ``stop`` and the context manager."""

    def __init__(self, console):
        import os
        import time

        self.file = getattr(getattr(console, "real", console), "file", None)
        try:
            self.every = float(os.environ.get("METAPEFT_PROGRESS_SECONDS", "10"))
        except ValueError:
            self.every = 10.0
        self.clock = time.monotonic
        self.tasks: list[dict] = []

    def add_task(self, description: str, total=None, completed=0, **fields) -> int:
        now = self.clock()
        self.tasks.append({"description": description, "total": total, "completed": completed,
                           "fields": fields, "start": now, "printed": now, "dirty": False})
        self._line(self.tasks[-1], "started")
        return len(self.tasks) - 1

    def update(self, task_id: int, *, completed=None, advance=None, total=None,
               description=None, **fields):
        t = self.tasks[task_id]
        if description is not None:  # as rich's Progress.update takes it
            t["description"] = description
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = completed
        if advance:
            t["completed"] += advance
        t["fields"].update(fields)
        t["dirty"] = True
        if self.clock() - t["printed"] >= self.every:
            self._line(t)

    def _line(self, t: dict, note: str = "") -> None:
        t["printed"], t["dirty"] = self.clock(), False
        total = "?" if t["total"] is None else t["total"]
        f = t["fields"]
        extra = "" if note else "".join(f"  {k} {f[k]}" for k in ("loss", "acc") if k in f)
        seconds = self.clock() - t["start"]
        print(f"{t['description']}: {t['completed']}/{total}{extra}  {seconds:.0f} s"
              + (f"  {note}" if note else ""), file=self.file, flush=True)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for t in self.tasks:
            if t["dirty"]:
                self._line(t)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def is_terminal(console) -> bool:
    return bool(getattr(getattr(console, "real", console), "is_terminal", False))


def progress(total: int, description: str, console):
    """A rich progress bar with ``loss`` and ``acc`` fields (rich loads here, not at import);
    plain periodic lines (``PlainProgress``) when the console is not a terminal."""
    if not is_terminal(console):
        return PlainProgress(console)
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=getattr(console, "real", console), transient=False)


class LazyBar:
    """A progress bar that appears only when the run calls ``start`` (once its inputs are
    validated and work begins), so a bad input's one-line error never follows an empty bar.
    ``total`` may be given at ``start`` when only the run knows it."""

    def __init__(self, total: int | None, description: str, console):
        self.total, self.description, self.console = total, description, console
        self.progress = self.task = None

    def start(self, total: int | None = None, completed: int = 0) -> None:
        """``completed``: where a resumed run starts (its bar shows 5/10, not 0/10)."""
        if self.task is None:
            self.progress = progress(total or self.total, self.description, self.console)
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=total or self.total,
                                               completed=completed, loss="-", acc="-")

    def update(self, **fields) -> None:
        self.start()
        self.progress.update(self.task, **fields)

    def close(self) -> None:
        """Stop the bar now (rich shows one live display at a time: close one phase's bar
        before the next phase's starts)."""
        if self.task is not None:
            self.progress.stop()
            self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

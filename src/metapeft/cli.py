"""The ``metapeft`` command line: a thin Typer layer over ``metapeft.api``.

Only typer and rich are imported at module level; mlx, mlx_lm and transformers load inside the
commands, so ``metapeft --help`` answers instantly. Every ``UserError`` becomes one line on stderr
and exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Meta-learned PEFT for MLX: pick a method, start from a meta-learned "
                       "init, tune it.")
out_console = Console()
err_console = Console(stderr=True)

METHOD_HELP = "lora, dora, adalora, prompt, prefix or ptuning"


@contextlib.contextmanager
def user_errors():
    """Turn expected failures into a one-line message and exit status 2 (no traceback)."""
    from metapeft.errors import UserError

    try:
        yield
    except UserError as e:
        err_console.print(f"[red]error:[/red] {e.one_line()}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]; artifacts saved so far are intact")
        raise typer.Exit(130) from None


def _parse_sets(values: list[str] | None, config_file: Path | None) -> dict:
    """Adapter options from --config FILE (YAML/JSON) and repeated --set key=value."""
    from metapeft.errors import UserError

    out: dict = {}
    if config_file is not None:
        import yaml

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
        import yaml

        out[k.strip()] = yaml.safe_load(v)
    return out


def _progress(total: int, description: str, console: Console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    transient=False)


def _run_adapt(task, *, console: Console, **kwargs):
    from metapeft.api import adapt

    steps = kwargs["steps"]
    with _progress(steps, kwargs.get("method", "lora"), console) as progress:
        bar = progress.add_task(f"adapt {kwargs.get('method', 'lora')}", total=steps, loss="-",
                                acc="-")

        def on_step(i, loss, acc):
            progress.update(bar, completed=i, loss=f"{loss:.3f}",
                            acc="-" if acc is None else f"{acc:.1%}")

        return adapt(task, on_step=on_step, **kwargs)


def _print_report(report, console: Console, out: Path | None) -> None:
    from rich.table import Table

    accs = report.accuracies
    marks = sorted({0, 1, 5, 10, 20, 50, len(accs) - 1} & set(range(len(accs))))
    t = Table(title=f"{report.method}: query accuracy ({report.num_support} support, "
                    f"{report.num_query} query)")
    for m in marks:
        t.add_column(f"step {m}", justify="right")
    t.add_row(*[f"{accs[m]:.1%}" for m in marks])
    console.print(t)
    stt = report.steps_to_target
    console.print(f"steps to target: {'not reached' if stt is None else stt}   "
                  f"final accuracy: {report.final_accuracy:.1%}   seconds: {report.seconds:.1f}   "
                  f"trainable params: {report.extra.get('trainable_parameters')}")
    if out is not None:
        console.print(f"adapter written to [bold]{out}[/bold]")


@app.command()
def adapt(
    task: Path = typer.Argument(..., help="Task: a directory (train.jsonl + valid/test.jsonl) or "
                                          "a JSONL/CSV pool (with --shots)."),
    model: str = typer.Option("tiny", "--model", "-m", help="mlx-lm model path or HF id; "
                              "'tiny' is the embedded default."),
    method: str = typer.Option("lora", help=METHOD_HELP),
    steps: int = typer.Option(20, help="Optimizer steps on the support set."),
    target: float = typer.Option(0.8, help="Query accuracy that counts as reached."),
    init: Optional[str] = typer.Option(None, help="Initial adapter: a safetensors file, an "
                                                  "adapter dir, or registry NAME[@VERSION]."),
    out: Optional[Path] = typer.Option(None, help="Write adapters.safetensors and "
                                                  "adapter_config.json here."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: per method)."),
    optimizer: str = typer.Option("adam", help="adam, adamw or sgd."),
    batch_size: int = typer.Option(64, help="Support examples per step."),
    shots: Optional[int] = typer.Option(None, help="Single-file tasks: examples per class."),
    query: Optional[int] = typer.Option(None, help="Single-file tasks: query examples per class."),
    ways: Optional[int] = typer.Option(None, help="Single-file tasks: number of classes."),
    seed: int = typer.Option(0, help="Seed for the episode, the init and the batch order."),
    text_field: str = typer.Option("text", help="Name of the text field."),
    label_field: str = typer.Option("label", help="Name of the label field."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file of adapter options."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Adapter option key=value "
                                                                 "(repeatable), e.g. rank=4."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Train an adapter on a task's support set and report query accuracy at every step."""
    with user_errors():
        options = _parse_sets(set_, config)
        console = err_console if as_json else out_console
        report = _run_adapt(task, console=console, model=model, method=method, steps=steps,
                            target=target, init=init, out=out, config=options, lr=lr,
                            optimizer=optimizer, batch_size=batch_size, seed=seed, shots=shots,
                            query=query, ways=ways, text_field=text_field,
                            label_field=label_field)
        if as_json:
            print(json.dumps(report.to_json()))
        else:
            _print_report(report, out_console, out)


@app.command()
def quickstart(
    out: Optional[Path] = typer.Option(None, help="Where to write the demo task and adapter "
                                                  "(default: the metapeft cache dir)."),
    steps: int = typer.Option(20, help="Adaptation steps."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """End to end on the embedded default: tiny model, a generated task, adapt, save. No network."""
    with user_errors():
        from metapeft.quickstart import run_quickstart

        console = err_console if as_json else out_console
        result = run_quickstart(out=out, steps=steps, console=console,
                                progress=lambda total, desc: _progress(total, desc, console))
        if as_json:
            print(json.dumps(result))


@app.command()
def export(
    adapter_dir: Path = typer.Argument(..., help="A directory written by `metapeft adapt --out`."),
    out: Path = typer.Option(..., help="Destination directory."),
    fmt: str = typer.Option("peft", "--format", help="peft: HF peft LoRA layout."),
):
    """Convert a LoRA adapter to another ecosystem's layout (HF peft)."""
    with user_errors():
        from metapeft.export import export_peft
        from metapeft.errors import UserError

        if fmt != "peft":
            raise UserError(f"unknown format {fmt!r}; supported: peft", field="format")
        path = export_peft(adapter_dir, out)
        out_console.print(f"wrote [bold]{path}[/bold]")


@app.command()
def version():
    """Print the metapeft version."""
    from metapeft import __version__

    print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())

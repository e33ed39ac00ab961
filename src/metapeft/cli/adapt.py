"""``metapeft adapt`` and ``metapeft export``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from metapeft.cli._common import (CONFIG_OPT, JSON_OPT, METHOD_OPT, SET_OPT, TASK_ARG, LazyBar,
                                  err_console, out_console, parse_sets, print_json, user_errors,
                                  with_model_options, with_task_options)


def _print_report(report, out: Path | None) -> None:
    from rich.table import Table

    accs = report.accuracies
    marks = sorted({0, 1, 5, 10, 20, 50, len(accs) - 1} & set(range(len(accs))))
    if marks:
        t = Table(title=f"{report.method}: query accuracy ({report.num_support} support, "
                        f"{report.num_query} query)")
        for m in marks:
            t.add_column(f"step {m}", justify="right")
        t.add_row(*[f"{accs[m]:.1%}" for m in marks])
        out_console.print(t)
    else:
        out_console.print(f"{report.method}: {report.num_support} support examples, no query "
                          "set to score (--query 0)")
    stt = report.steps_to_target
    final = report.final_accuracy
    out_console.print(f"steps to target: {'not reached' if stt is None else stt}   "
                      f"final accuracy: {'-' if final != final else f'{final:.1%}'}   seconds: "
                      f"{report.seconds:.1f}   trainable params: "
                      f"{report.extra.get('trainable_parameters')}")
    if getattr(report.adapter, "training_free", False):
        out_console.print(f"{report.method} is training-free: its parameters come from the "
                          "support set, no optimizer step ran")
    stopped = report.result.extra.get("stopped_at")
    if stopped is not None:
        out_console.print(f"stopped at step {stopped}: query accuracy reached the target")
    if out is not None:
        out_console.print(f"adapter written to [bold]{out}[/bold]")


@with_model_options
@with_task_options
def adapt(
    task: Path = TASK_ARG,
    method: str = METHOD_OPT,
    steps: int = typer.Option(20, help="Optimizer steps on the support set."),
    target: float = typer.Option(0.8, help="Query accuracy that counts as reached."),
    stop_at_target: bool = typer.Option(False, "--stop-at-target", help="End the run at the "
                                        "first step whose query accuracy reaches --target."),
    init: Optional[str] = typer.Option(None, help="Initial adapter: a safetensors file, an "
                                                  "adapter dir, or registry NAME[@VERSION]."),
    out: Optional[Path] = typer.Option(None, help="Write adapters.safetensors and "
                                                  "adapter_config.json here."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: per method)."),
    optimizer: str = typer.Option("adam", help="adam, adamw or sgd."),
    loss: str = typer.Option("ce", help="Training loss: ce (cross-entropy over the candidates' "
                                        "scores), nll, ce_mean or ce_nll."),
    batch_size: int = typer.Option(64, help="Support examples per step."),
    seed: int = typer.Option(0, help="Seed for the episode, the init and the batch order."),
    config: Optional[Path] = CONFIG_OPT,
    set_: Optional[list[str]] = SET_OPT,
    as_json: bool = JSON_OPT,
    model_options: dict = None,
    task_options: dict = None,
):
    """Train an adapter on a task's support set and report query accuracy at every step."""
    with user_errors():
        from metapeft import api
        from metapeft.adapters import METHODS, get_adapter_class

        options = parse_sets(set_, config)
        # a training-free method runs no optimizer step: no progress bar
        free = method in METHODS and get_adapter_class(method).training_free
        with LazyBar(steps, f"adapt {method}", err_console if as_json else out_console) as bar:
            def on_step(i, loss_, acc):
                bar.update(completed=i, loss=f"{loss_:.3f}",
                           acc="-" if acc is None else f"{acc:.1%}")

            report = api.adapt(task, **model_options, method=method, steps=steps, target=target, init=init, out=out, config=options,
                               lr=lr, optimizer=optimizer, batch_size=batch_size, objective=loss,
                               seed=seed, **task_options,
                               on_start=None if free else bar.start, on_step=on_step,
                               record_experience=True,
                               stop_at_target=stop_at_target)
        if as_json:
            print_json(report.to_json())
        else:
            _print_report(report, out)


def export(
    adapter_dir: Path = typer.Argument(..., help="A directory written by `metapeft adapt --out`."),
    out: Path = typer.Option(..., help="Destination directory."),
    fmt: str = typer.Option("peft", "--format", help="peft: HF peft LoRA layout."),
):
    """Convert a LoRA adapter to another ecosystem's layout (HF peft)."""
    with user_errors():
        from metapeft import api

        out_console.print(f"wrote [bold]{api.export_adapter(adapter_dir, out, fmt)}[/bold]")


def register(app: typer.Typer) -> None:
    app.command()(adapt)
    app.command()(export)

"""Use what you adapted:

    metapeft predict ADAPTER INPUT [--model M] [--out FILE] [--top-k K] [--json]
    metapeft evaluate ADAPTER TEST [--json] [--plot DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from metapeft.cli._common import (DEQUANTIZE_OPT, JSON_OPT, TEXT_FIELD_OPT, LABEL_FIELD_OPT,
                                  Dequantize, err_console, out_console, print_json, user_errors)

ADAPTER_ARG = typer.Argument(..., help="An adapter directory written by `metapeft adapt --out`.")
ADAPTER_MODEL_OPT = typer.Option(None, "--model", "-m", help="Base model (default: the one the "
                                 "adapter was trained on, named in the directory; another "
                                 "model is refused).")
BATCH_OPT = typer.Option(32, "--batch-size", help="Texts scored per batch.")
BAR_FROM = 256  # inputs from which a progress bar is shown (on stderr)


class _Bar:
    """A progress bar on stderr over the texts scored, shown for long inputs only."""

    def __init__(self, description: str):
        self.description, self.progress, self.task = description, None, None

    def start(self, total: int) -> None:
        if total < BAR_FROM:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=err_console.real,
                                 transient=False)
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=total)

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def predict(
    adapter: Path = ADAPTER_ARG,
    inputs: str = typer.Argument(..., metavar="INPUT", help="JSONL or CSV file with a text "
                                 "field (an `id` field is echoed), or - for standard input."),
    model: Optional[str] = ADAPTER_MODEL_OPT,
    dequantize: Dequantize = DEQUANTIZE_OPT,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the JSON lines here "
                                       "instead of standard output."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the K most likely labels' "
                                        "probabilities (default: every label)."),
    batch_size: int = BATCH_OPT,
    text_field: str = TEXT_FIELD_OPT,
    as_json: bool = typer.Option(False, "--json", help="With --out: print a JSON summary "
                                 "(without --out the output is JSON lines already)."),
):
    """Classify texts: one JSON line per input, in input order, with the label and the
    probabilities (softmax over the candidate labels' scores)."""
    with user_errors():
        from metapeft import api

        with _Bar("predict") as bar:
            report = api.predict(adapter, inputs, model=model, dequantize=dequantize.value,
                                 out=out, top_k=top_k, batch_size=batch_size,
                                 text_field=text_field, on_start=bar.start,
                                 on_batch=bar.advance)
        if out is None:
            sys.stdout.write("".join(json.dumps(p, ensure_ascii=False) + "\n"
                                     for p in report.lines()))
        elif as_json:
            print_json(report.to_json())
        else:
            out_console.print(f"{len(report.predictions)} predictions written to "
                              f"[bold]{out}[/bold] ({report.seconds:.1f} s)")


def _print_evaluation(report) -> None:
    from rich.table import Table

    m = report.metrics
    t = Table(title=f"{report.adapter} on {report.test} ({m['num_examples']} examples)")
    for c in ("label", "precision", "recall", "F1", "support"):
        t.add_column(c, justify="left" if c == "label" else "right")
    for r in m["per_class"]:
        t.add_row(r["label"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                  str(r["support"]))
    for name in ("macro", "micro"):
        a = m[name]
        t.add_row(f"[bold]{name} avg[/bold]", f"{a['precision']:.3f}", f"{a['recall']:.3f}",
                  f"{a['f1']:.3f}", str(m["num_examples"]))
    out_console.print(t)
    labels = m["confusion"]["labels"]
    if len(labels) <= 12:
        c = Table(title="confusion matrix (rows gold, columns predicted)")
        c.add_column("")
        for lab in labels:
            c.add_column(lab, justify="right")
        for lab, row in zip(labels, m["confusion"]["matrix"]):
            c.add_row(lab, *[str(v) for v in row])
        out_console.print(c)
    out_console.print(f"accuracy: {m['accuracy']:.1%}   ECE ({m['ece_bins']} equal-width "
                      f"bins): {m['ece']:.4f}   seconds: {report.seconds:.1f}")
    for name, path in report.plots.items():
        out_console.print(f"{name.replace('_', ' ')} written to [bold]{path}[/bold]")


def evaluate(
    adapter: Path = ADAPTER_ARG,
    test: str = typer.Argument(..., metavar="TEST", help="Labelled JSONL or CSV file (- for "
                               "standard input); every label must be one of the adapter's."),
    model: Optional[str] = ADAPTER_MODEL_OPT,
    dequantize: Dequantize = DEQUANTIZE_OPT,
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write confusion_matrix.png and "
                                        "reliability.png here (needs the `plot` extra)."),
    batch_size: int = BATCH_OPT,
    text_field: str = TEXT_FIELD_OPT,
    label_field: str = LABEL_FIELD_OPT,
    as_json: bool = JSON_OPT,
):
    """Measure an adapter on labelled data: accuracy, macro/micro and per-class
    precision/recall/F1, confusion matrix, expected calibration error (15 equal-width bins)."""
    with user_errors():
        from metapeft import api

        with _Bar("evaluate") as bar:
            report = api.evaluate(adapter, test, model=model, dequantize=dequantize.value,
                                  plot=plot, batch_size=batch_size, text_field=text_field,
                                  label_field=label_field, on_start=bar.start,
                                  on_batch=bar.advance)
        if as_json:
            print_json(report.to_json())
        else:
            _print_evaluation(report)


def register(app: typer.Typer) -> None:
    app.command()(predict)
    app.command()(evaluate)

"""``metapeft tune``: the Typer layer over ``metapeft.tune.search.tune``.

``register(app)`` adds the command to a Typer app (``metapeft.cli`` calls it). Only typer and rich
load at import time; skopt and MLX load when the command runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from metapeft.console import err_console, out_console


def _clean(obj):
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _fmt_params(params: dict | None) -> str:
    out = []
    for k, v in sorted((params or {}).items(), key=lambda kv: (kv[0] != "lr", kv[0])):
        if isinstance(v, float):
            v = f"{v:.2e}" if k == "lr" else f"{v:.3g}"
        out.append(f"{k}={v}")
    return " ".join(out)


def _num(v, fmt: str) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "-"
    return format(v, fmt) if math.isfinite(v) else "-"


def trials_table(study, running: dict | None = None, max_rows: int = 30):
    """A rich Table of the study's trials; ★ marks the current Pareto set."""
    from rich.table import Table

    front = set(study.pareto())
    rec = study.recommended()
    t = Table(title=f"study {study.name}: {len(study.trials)} trials, objectives "
                    f"{', '.join(study.objectives)} (★ Pareto, ◆ recommended)")
    for c, j in (("#", "right"), ("", "left"), ("method", "left"), ("source", "left"),
                 ("params", "left"), ("accuracy", "right"), ("seconds", "right"),
                 ("memory MB", "right"), ("status", "left")):
        t.add_column(c, justify=j)
    rows = list(study.trials)
    if len(rows) > max_rows:
        keep = set(range(len(rows) - max_rows + len(front), len(rows))) | front
        rows = [r for i, r in enumerate(rows) if i in keep]
    for tr in rows:
        i = tr["index"]
        mark = ("◆" if i == rec else "★") if i in front else ""
        status = tr.get("status", "")
        if status == "failed":
            status = f"[red]failed[/red] {str(tr.get('reason', ''))[:60]}"
        t.add_row(str(i), mark, tr.get("method", ""), tr.get("source", ""),
                  _fmt_params(tr.get("params")), _num(tr.get("accuracy"), ".1%"),
                  _num(tr.get("seconds"), ".2f"), _num(tr.get("memory_mb"), ".1f"), status,
                  style="bold" if i in front else None)
    if running is not None:
        t.add_row(str(running["index"]), "…", running["method"], running["source"],
                  _fmt_params(running["params"]), "", "", "", "[yellow]running[/yellow]")
    return t


def register(app: typer.Typer) -> None:
    """Add the ``tune`` command to ``app``."""

    @app.command()
    def tune(
        task: Optional[str] = typer.Argument(None, help="Task: a directory (train.jsonl + "
                                             "valid/test.jsonl) or a JSONL/CSV pool (with "
                                             "--shots). Optional with --resume."),
        model: str = typer.Option("tiny", "--model", "-m", help="mlx-lm model path or HF id."),
        methods: str = typer.Option("all", help="Comma list of methods to search over (the "
                                                "method is itself a dimension), or 'all'."),
        trials: int = typer.Option(20, help="Total trials in the study (a resumed study runs "
                                            "only the missing ones)."),
        time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Seconds; no "
                                                    "new trial starts after this."),
        steps: Optional[int] = typer.Option(None, help="Training steps per trial (default: "
                                                       "configs/default.yaml)."),
        objectives: str = typer.Option("accuracy,seconds,memory", help="Comma list of "
                                       "accuracy, seconds, memory; one objective = plain BO."),
        init: Optional[str] = typer.Option(None, help="Initial adapter (file, dir or registry "
                                                      "NAME[@VERSION]) for its method."),
        name: Optional[str] = typer.Option(None, help="Study name (saved under "
                                                      "<registry>/studies/NAME.safetensors), "
                                                      "or a path ending in .safetensors."),
        resume: Optional[str] = typer.Option(None, help="Continue this study (name or path)."),
        registry: Optional[Path] = typer.Option(None, "--registry", help="Registry dir."),
        plot: Optional[Path] = typer.Option(None, help="Write a PNG of the front and best-so-"
                                                       "far curve (needs the 'plot' extra)."),
        space: Optional[Path] = typer.Option(None, help="Search-space YAML (default "
                                                        "configs/search_spaces.yaml)."),
        seed: int = typer.Option(0, help="Seed for the episode, the init and the search."),
        n_initial: Optional[int] = typer.Option(None, help="Points before the GP takes over "
                                                           "(default: trials/3 in [3, 10])."),
        acq_func: str = typer.Option("EI", help="skopt acquisition: EI, PI, LCB or gp_hedge."),
        warm_start: bool = typer.Option(True, help="Seed from similar tasks in the experience "
                                                   "store."),
        k: int = typer.Option(3, help="Similar tasks used for the warm start."),
        record: bool = typer.Option(True, help="Append every trial to the experience store."),
        compile_: bool = typer.Option(False, "--compile", help="Keep mx.compile on (JIT "
                                      "kernel builds then count as training seconds)."),
        shots: Optional[int] = typer.Option(None, help="Single-file tasks: examples per class."),
        query: Optional[int] = typer.Option(None, help="Single-file tasks: query per class."),
        ways: Optional[int] = typer.Option(None, help="Single-file tasks: number of classes."),
        text_field: str = typer.Option("text", help="Name of the text field."),
        label_field: str = typer.Option("label", help="Name of the label field."),
        as_json: bool = typer.Option(False, "--json", help="Print {pareto, recommended, "
                                                           "trials} as one JSON object."),
    ):
        """Bayesian search (skopt GP, ParEGO for several objectives) over PEFT configurations."""
        from metapeft.cli import user_errors

        with user_errors():
            from rich.live import Live

            from metapeft.errors import UserError
            from metapeft.tune import plot as tune_plot, search

            if resume is None and task is None:
                raise UserError("give a TASK (or --resume STUDY)", field="task")
            if resume is None and not name:
                raise UserError("a new study needs --name (or continue one with --resume)",
                                field="name")
            console = err_console if as_json else out_console
            console.print("[dim]loading the optimiser and the model…[/dim]")
            live = Live(console=getattr(console, "real", console), refresh_per_second=2,
                        transient=False)
            state: dict = {}

            def on_start(study, trial):
                state["study"] = study
                live.update(trials_table(study, running=trial))

            def on_trial(study, trial):
                live.update(trials_table(study))

            with live:
                res = search.tune(task, model=model, methods=methods, trials=trials,
                                  time_budget=time_budget, steps=steps, objectives=objectives,
                                  init=init, name=name, resume=resume, registry=registry,
                                  space_file=space, seed=seed, n_initial=n_initial,
                                  acq_func=acq_func, warm_start=warm_start, k=k, record=record,
                                  compile=compile_, shots=shots, query=query, ways=ways,
                                  text_field=text_field, label_field=label_field,
                                  on_trial=on_trial, on_start=on_start)
                live.update(trials_table(res.study))
            console.print()
            summary = res.summary
            plot_msg = None
            if plot is not None:
                written = tune_plot.plot_study(res.study, plot)
                plot_msg = (f"plot written to [bold]{written}[/bold]" if written else
                            "no plot: matplotlib is not installed (pip install "
                            "'metapeft\\[plot]')")
                console.print(plot_msg)
            if as_json:
                print(json.dumps(_clean({"pareto": summary["pareto"],
                                         "recommended": summary["recommended"],
                                         "trials": summary["trials"]})))
                return
            _print_summary(res, out_console)


def _print_summary(res, console) -> None:
    from rich.table import Table

    s = res.summary
    t = Table(title="Pareto front")
    for c in ("#", "method", "lr", "config", "accuracy", "seconds", "memory MB"):
        t.add_column(c)
    for p in s["pareto"]:
        params = {k: v for k, v in (p.get("params") or {}).items() if k != "lr"}
        t.add_row(str(p["index"]), p["method"], _num(p.get("lr"), ".2e"), _fmt_params(params),
                  _num(p.get("accuracy"), ".1%"), _num(p.get("seconds"), ".2f"),
                  _num(p.get("memory_mb"), ".1f"))
    console.print(t)
    rec = s["recommended"]
    if rec is None:
        console.print("[red]no trial finished[/red]: see the reasons above")
    else:
        console.print(f"recommended (knee): trial {rec['index']}: [bold]{rec['method']}[/bold] "
                      f"{_fmt_params(rec.get('params'))} -> accuracy "
                      f"{_num(rec.get('accuracy'), '.1%')}, {_num(rec.get('seconds'), '.2f')} s, "
                      f"{_num(rec.get('memory_mb'), '.1f')} MB")
    failed = sum(1 for t in s["trials"] if t["status"] == "failed")
    console.print(f"hypervolume (accuracy x seconds): {s['hypervolume_accuracy_seconds']:.4g}   "
                  f"failed trials: {failed}   warm-start points: {res.warm_points}   "
                  f"experience records added: {res.experience_records}")
    console.print(f"study saved to [bold]{s['path']}[/bold] (continue with --resume "
                  f"{s['study']})")

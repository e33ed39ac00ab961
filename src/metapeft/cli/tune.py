"""``metapeft tune``: the Typer layer over ``api.tune``, with a live table of the trials."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from metapeft.cli._common import (REGISTRY_OPT, err_console, is_terminal, out_console,
                                  print_json, user_errors, with_model_options, with_task_options)


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


def trials_table(study, running: dict | list | None = None, max_rows: int = 30):
    """A rich Table of the study's trials; ★ marks the current Pareto set. ``running``: the
    trial (or, with --workers, the trials) being evaluated now."""
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
    for r in [running] if isinstance(running, dict) else (running or []):
        t.add_row(str(r["index"]), "…", r["method"], r["source"],
                  _fmt_params(r["params"]), "", "", "", "[yellow]running[/yellow]")
    return t


@with_model_options
@with_task_options
def tune(
    task: Optional[str] = typer.Argument(None, help="Task: a directory (train.jsonl + "
                                         "valid/test.jsonl) or a JSONL/CSV pool (with "
                                         "--shots). Optional with --resume."),
    methods: str = typer.Option("all", help="Comma list of methods to search over (the "
                                            "method is itself a dimension), or 'all'."),
    trials: Optional[int] = typer.Option(None, help="Total trials in the study (default 20; "
                                                    "a resumed study keeps its own and runs "
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
    registry: Optional[Path] = REGISTRY_OPT,
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
    as_json: bool = typer.Option(False, "--json", help="Print {pareto, recommended, "
                                                       "trials} as one JSON object."),
    workers: int = typer.Option(1, help="Trials evaluated at once: re-run this command as N "
                                        "ranks of MLX's ring backend (localhost) and ask skopt "
                                        "for batches of N (constant liar)."),
    model_options: dict = None,
    task_options: dict = None,
):
    """Bayesian search (skopt GP, ParEGO for several objectives) over PEFT configurations.
    With --workers N (or under mlx.launch) N trials run at once."""
    with user_errors():
        if workers != 1:
            from metapeft.cli.launch import relaunch

            code = relaunch(workers, "tune", flag="--workers",
                            kept=lambda: _kept_study(name or resume, registry))
            if code:
                raise typer.Exit(code)
            return
        from rich.live import Live

        from metapeft import api
        from metapeft.cli.launch import rank_outcome
        from metapeft.meta.distributed import world

        rank = world().rank()  # 0 unless under mlx.launch: the other ranks print nothing
        console = err_console if as_json else out_console
        if rank:
            from metapeft.cli.launch import silent_console

            console = silent_console()
        console.print("[dim]loading the optimiser and the model…[/dim]")
        live = Live(console=getattr(console, "real", console), refresh_per_second=2,
                    transient=False)
        running = {}

        def on_start(study, trial):
            running[trial["index"]] = trial
            live.update(trials_table(study, running=list(running.values())))

        plain = not is_terminal(console)  # a log file or pipe: one plain line per trial

        def on_trial(study, trial):
            running.pop(trial["index"], None)
            live.update(trials_table(study, running=list(running.values())))
            if plain:
                acc = trial.get("accuracy")
                result = (f"accuracy {_num(acc, '.1%')}, {_num(trial.get('seconds'), '.2f')} s"
                          if trial.get("status") == "ok" else
                          f"failed: {str(trial.get('reason', ''))[:80]}")
                print(f"trial {trial['index']}: {trial.get('method')} "
                      f"{_fmt_params(trial.get('params'))} -> {result}",
                      file=getattr(console, "real", console).file, flush=True)

        with rank_outcome(rank):
            try:
                with live:
                    rep = api.tune(task, **model_options, methods=methods,
                                   trials=trials, time_budget=time_budget, steps=steps,
                                   objectives=objectives, init=init, name=name, resume=resume,
                                   registry=registry, space=space, seed=seed,
                                   n_initial=n_initial, acq_func=acq_func,
                                   warm_start=warm_start, k=k, record=record,
                                   compile=compile_, plot=plot, on_trial=on_trial,
                                   on_start=on_start, **task_options)
                    live.update(trials_table(rep.study))
            finally:
                console.print()  # on a pipe or a log file Live leaves its last line open
        if rank:
            return
        if plot is not None:
            console.print(f"plot written to [bold]{rep.plot}[/bold]" if rep.plot else
                          "no plot: matplotlib is not installed (pip install "
                          "'metapeft\\[plot]')")
        if as_json:
            print_json(rep.to_json())
        else:
            _print_summary(rep, out_console)


def _kept_study(name: str | None, registry) -> str:
    """What a dead worker leaves: the study as rank 0 last saved it."""
    from metapeft.tune.study import Study, study_path

    try:
        path = study_path(name, registry)
        n = Study.load(path).evaluated()
    except Exception:  # noqa: BLE001 - a report line, never the reason to fail
        return "no study was saved yet"
    return f"the study ({n} trials, {path}) is kept: rerun with --resume {name}"


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
        from metapeft.tune.study import RECOMMEND_RULE

        rule = RECOMMEND_RULE if "accuracy" in s["objectives"] else "the knee of the front"
        console.print(f"recommended ({rule}): trial {rec['index']}: "
                      f"[bold]{rec['method']}[/bold] "
                      f"{_fmt_params(rec.get('params'))} -> accuracy "
                      f"{_num(rec.get('accuracy'), '.1%')}, {_num(rec.get('seconds'), '.2f')} s, "
                      f"{_num(rec.get('memory_mb'), '.1f')} MB")
    failed = sum(1 for t in s["trials"] if t["status"] == "failed")
    console.print(f"hypervolume (accuracy x seconds): {s['hypervolume_accuracy_seconds']:.4g}   "
                  f"failed trials: {failed}   warm-start points: {res.warm_points}   "
                  f"experience records added: {res.experience_records}")
    console.print(f"study saved to [bold]{s['path']}[/bold] (continue with --resume "
                  f"{s['study']})")


def register(app: typer.Typer) -> None:
    """Add the ``tune`` command to ``app``."""
    app.command()(tune)

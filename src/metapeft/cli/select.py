"""Task profiles, the experience store and method selection:

    metapeft profile TASK [--model M] [--json]
    metapeft experience list | show ID | stats [--since 30d] [--by method] | import FILE |
        export --format jsonl --out FILE
    metapeft sweep --data POOL|synthetic --methods all --tasks N [--model M] [--steps S] [--seed]
        [--init-sources all|fresh,meta,compose,merge,generate,route]
    metapeft train-selector [--experience FILE] [--out DIR]
    metapeft select TASK [--model M] [--top K] [--json]
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from metapeft.cli._common import (EXPERIENCE_OPT, JSON_OPT, TASK_ARG, LazyBar, compact_table,
                                  err_console, out_console, print_json, short_time, user_errors,
                                  with_model_options, with_task_options)

EPISODE_SEED_OPT = typer.Option(0, "--seed", help="Seed for the episode.")


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{v:.1%}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(title: str, columns, rows) -> None:
    """Print a table (``compact_table``: readable at 80 columns)."""
    t = compact_table(title, columns)
    for r in rows:
        t.add_row(*r)
    out_console.print(t)


@with_model_options
@with_task_options
def profile(
    task: Path = TASK_ARG,
    seed: int = EPISODE_SEED_OPT,
    as_json: bool = JSON_OPT,
    model_options: dict = None,
    task_options: dict = None,
):
    """Characterise a task: size, shots, classes, lengths, vocabulary, zero-shot difficulty,
    a Fisher statistic of a fresh LoRA, and its domain."""
    with user_errors():
        from metapeft import api

        rep = api.profile(task, **model_options, seed=seed, **task_options)
        if as_json:
            print_json(rep.to_json())
            return
        _table(f"profile of {rep.task} (domain: {rep.domain}, model: {rep.model})",
               ["feature", ("value", "right")],
               [(k, f"{v:.4g}") for k, v in rep.features.items()])


def exp_list(experience: Optional[Path] = EXPERIENCE_OPT,
             limit: int = typer.Option(50, help="Show at most the last N records (0: all)."),
             as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")):
    """List records, newest last."""
    with user_errors():
        from metapeft import api

        listing = api.list_experience(experience, limit=limit)
        if as_json:
            print_json(listing.to_json())
            return
        shown = listing.records
        _table(f"{listing.total} records in {listing.path}"
               + (f" (last {len(shown)})" if len(shown) < listing.total else ""),
               (("id", "left", True), ("created (UTC)", "left", True), "source", "task",
                "domain", "method", ("acc", "right"), ("seconds", "right")),
               [(r.id, short_time(r.created), r.source, r.task, r.domain, r.method,
                 _fmt(r.final_accuracy, True),
                 "-" if r.seconds != r.seconds else f"{r.seconds:.1f}") for r in shown])


def exp_show(record_id: str = typer.Argument(..., help="A record id (or a unique prefix)."),
             experience: Optional[Path] = EXPERIENCE_OPT):
    """Print one record as JSON."""
    with user_errors():
        from metapeft import api

        print(json.dumps(api.experience_record(record_id, experience), indent=2))


def _print_stats(rep) -> None:
    st = rep.stats
    title = (f"{st['included']} records in {rep.path} by {st['by']}"
             + (f", created since {short_time(st['since'])} UTC" if st["since"] else ""))
    _table(title, (st["by"], ("runs", "right"), ("target reached", "right"),
                   ("success", "right"), ("mean steps", "right"), ("median steps", "right"),
                   ("mean acc", "right")),
           [(g["group"], str(g["runs"]), f"{g['reached_target']} / {g['runs_with_target']}",
             _fmt(g["success_rate"], True), _fmt(g["mean_steps_to_target"]),
             _fmt(g["median_steps_to_target"]), _fmt(g["mean_final_accuracy"], True))
            for g in st["groups"]])
    notes = []
    if st["without_target"]:
        notes.append(f"{st['without_target']} of {st['included']} runs recorded no target "
                     "(tune trials, meta-train validation, older records): counted in runs and "
                     "mean acc only")
    if st["older"] or st["undated"]:
        notes.append(f"left out: {st['older']} older records"
                     + (f", {st['undated']} without a date" if st["undated"] else ""))
    for note in notes:
        out_console.print(f"[dim]{note}[/dim]", highlight=False)


def exp_stats(
    since: Optional[str] = typer.Option(None, "--since", help="Only records created within "
                                        "this long (30d, 12h, 2w, 90m) or since an ISO date."),
    by: str = typer.Option("method", "--by", help="Group by method, domain, project, init or "
                                   "init_source (fresh, meta, compose, merge, generate, route)."),
    experience: Optional[Path] = EXPERIENCE_OPT,
    as_json: bool = JSON_OPT,
):
    """Per group: runs, success rate (target reached), mean and median steps to target, mean
    final accuracy."""
    with user_errors():
        from metapeft import api

        rep = api.experience_stats(experience, by=by, since=since)
        if as_json:
            print_json(rep.to_json())
        else:
            _print_stats(rep)


def exp_import(file: Path = typer.Argument(..., help="JSONL written by `experience export`."),
               experience: Optional[Path] = EXPERIENCE_OPT):
    """Append the records of a JSONL file (ids already present are skipped)."""
    with user_errors():
        from metapeft import api

        ids, path = api.import_experience(file, experience)
        out_console.print(f"imported {len(ids)} records into {path}")


def exp_export(out: Path = typer.Option(..., help="Destination file."),
               fmt: str = typer.Option("jsonl", "--format", help="jsonl"),
               experience: Optional[Path] = EXPERIENCE_OPT):
    """Write every record as one JSON object per line."""
    with user_errors():
        from metapeft import api

        n = api.export_experience(out, experience, fmt)
        out_console.print(f"exported {n} records to {out}")


def _parse_inits(items: list[str] | None) -> dict[str, str]:
    from metapeft.errors import UserError

    inits = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--init expects METHOD=NAME, got {item!r}", field="init")
        m, spec = item.split("=", 1)
        inits[m.strip()] = spec.strip()
    return inits


@with_model_options
def sweep(
    data: str = typer.Option("synthetic", help="'synthetic' (the task families) or a pool "
                                               "JSONL/CSV; a 'domain' field gives one "
                                               "source per domain (CLINC150)."),
    methods: str = typer.Option("all", help="'all' or a comma list of methods."),
    tasks: int = typer.Option(10, help="Number of sampled tasks."),
    steps: int = typer.Option(10, help="Adaptation steps per run."),
    seed: int = typer.Option(0, help="Seed for the task sample and the runs."),
    max_shots: int = typer.Option(50, help="Shots are drawn log-uniformly in [1, this]."),
    max_ways: int = typer.Option(20, help="Ways are drawn uniformly in [2, this]."),
    query: int = typer.Option(5, help="Query examples per class."),
    eval_every: Optional[int] = typer.Option(None, help="Score the query set every N steps "
                                                        "only (0: after the last step); "
                                                        "default every step."),
    init: Optional[list[str]] = typer.Option(None, help="METHOD=META_WEIGHTS: also run METHOD "
                                                        "from a meta-learned init."),
    init_sources: Optional[str] = typer.Option(None, "--init-sources", help="'all' or a comma "
                                               "list of fresh, meta, compose, merge, "
                                               "generate, route: run each method from each "
                                               "of these init "
                                               "sources that is available for it (teaches "
                                               "`select` which init wins)."),
    experience: Optional[Path] = EXPERIENCE_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary."),
    model_options: dict = None,
):
    """Build experience: run every method on N diverse sampled tasks (1-50 shots, 2-20 ways)."""
    with user_errors():
        from metapeft import api

        n_tasks = [0]
        with LazyBar(None, "sweep", err_console if as_json else out_console) as bar:
            def on_start(num_tasks, num_runs):
                n_tasks[0] = num_tasks
                bar.start(num_runs)

            def on_run(ti, m, acc):
                bar.update(advance=1, loss=f"task {ti + 1}/{n_tasks[0]} {m}",
                           acc="failed" if acc is None else f"{acc:.1%}")

            rep = api.sweep(data, methods=methods, tasks=tasks, **model_options, steps=steps,
                            seed=seed,
                            max_shots=max_shots, max_ways=max_ways, query=query,
                            eval_every=eval_every, inits=_parse_inits(init),
                            init_sources=init_sources,
                            experience=experience, on_start=on_start, on_run=on_run)
        if as_json:
            print_json(rep.to_json())
            return
        out_console.print(f"{rep.records} records from {rep.tasks} tasks appended to "
                          f"{rep.experience}; best method counts: "
                          + ", ".join(f"{m} {c}" for m, c in rep.best_method_counts()))
        for f in rep.failures:
            err_console.print(f"[yellow]skipped[/yellow] {f['task']} {f['method']}: {f['error']}")
        from metapeft.init_sources import describe_missing

        for m, p in (rep.init_sources or {}).items():
            out_console.print(f"{m}: ran from {', '.join(p['ran'])}" + (
                f"; not from {describe_missing(p['unavailable'])}" if p["unavailable"] else ""),
                highlight=False)


def train_selector(
    experience: Optional[Path] = EXPERIENCE_OPT,
    out: Optional[Path] = typer.Option(None, help="Output directory (default <METAPEFT_HOME "
                                                  "or user data dir>/selector, which "
                                                  "`select` uses)."),
    epochs: int = typer.Option(400, help="Training epochs per ensemble member."),
    seed: int = typer.Option(0, help="Seed."),
    as_json: bool = JSON_OPT,
):
    """Train the task embedder and the method selector from the experience store."""
    with user_errors():
        from metapeft import api

        rep = api.train_selector(experience=experience, out=out, epochs=epochs, seed=seed)
        if as_json:
            print_json(rep.to_json())
        else:
            out_console.print(f"trained on {rep.tasks} tasks ({rep.records} records, methods "
                              f"{', '.join(rep.methods)}); wrote {rep.paths['embedder']} and "
                              f"{rep.paths['selector']}")


def _set_flags(method: str, hp: dict) -> str:
    """The hyperparameters that differ from what ``adapt --method METHOD`` runs with by
    default, as flags to paste (``--set`` takes lr, steps and optimizer too)."""
    from metapeft.select.selector import default_hyperparameters

    defaults = default_hyperparameters(method)
    flags = []
    for k, v in hp.items():
        if defaults.get(k, object()) == v:
            continue
        if isinstance(v, list):
            v = ",".join(map(str, v))
        elif isinstance(v, float):
            v = f"{v:g}"
        flags.append(f"--set {k}={v}")
    return " ".join(flags) or "(its defaults)"


def _print_selection(rep) -> None:
    _table(f"methods for {rep.task} ({'priors' if rep.from_priors else rep.source})",
           (("rank", "right"), "method", ("predicted acc", "right"), ("confidence", "right"),
            ("uncertainty", "right")),
           [(str(i), r["method"], _fmt(r["predicted_accuracy"], True),
             _fmt(r["confidence"], True),
             "-" if r["uncertainty"] is None else f"±{r['uncertainty']:.1%}")
            for i, r in enumerate(rep.ranking, start=1)])
    out_console.print("recommended hyperparameters (for metapeft adapt --method METHOD):",
                      highlight=False)
    for r in rep.ranking:
        out_console.print(f"  {r['method']}: {_set_flags(r['method'], r['hyperparameters'])}  "
                          f"[dim]({r['hyperparameters_from']})[/dim]", highlight=False)
    if rep.similar_tasks:
        _table("nearest past tasks", (("id", "left", True), "task", "domain",
                                      ("distance", "right"), "best method"),
               [(s["id"], str(s.get("task")), str(s.get("domain")), f"{s['distance']:.3f}",
                 str(s["best_method"])) for s in rep.similar_tasks])
    out_console.print(("[yellow]priors:[/yellow] " if rep.from_priors else "reason: ")
                      + rep.reason, highlight=False)
    if rep.init_sources:
        print_init_sources(rep.init_sources)


def print_init_sources(c: dict) -> None:
    """The init sources ranked for the recommended method, and those not available."""
    steps = f", {c['steps']} steps" if c.get("steps") is not None else ""
    _table(f"init sources for {c['method']}{steps} ({c['source']})",
           (("rank", "right"), "source", "init", ("gain vs fresh", "right"),
            ("confidence", "right"), ("runs", "right")),
           [(str(i), r["source"], str(r["init"] or ("--route arrow" if r["source"] == "route"
                                                    else "-")),
             f"{r['expected_gain']:+.1%} ±{r['uncertainty']:.1%}", _fmt(r["confidence"], True),
             str(r["runs"])) for i, r in enumerate(c["ranking"], start=1)])
    from metapeft.init_sources import missing_groups

    if c.get("unavailable"):  # one line per reason: readable at 80 columns, piped or not
        out_console.print("[dim]not available:[/dim]", highlight=False)
        import shutil
        import textwrap

        from rich.markup import escape

        width = shutil.get_terminal_size((80, 24)).columns
        for group in missing_groups(c["unavailable"]):
            text = textwrap.fill(group, width=width, initial_indent="  ",
                                 subsequent_indent="    ", break_on_hyphens=False)
            out_console.print(f"[dim]{escape(text)}[/dim]", highlight=False)
    out_console.print(f"recommended init source: [bold]{c['chosen']}[/bold] ({c['reason']})",
                      highlight=False)


@with_model_options
@with_task_options
def select(
    task: Path = TASK_ARG,
    top: Optional[int] = typer.Option(None, help="Show the top K methods only."),
    k: int = typer.Option(5, help="Number of similar past tasks."),
    selector: Optional[Path] = typer.Option(None, help="Trained selector directory (default "
                                                       "<METAPEFT_HOME>/selector; without "
                                                       "one, a selector is trained from the "
                                                       "experience store, or priors)."),
    experience: Optional[Path] = EXPERIENCE_OPT,
    seed: int = EPISODE_SEED_OPT,
    as_json: bool = JSON_OPT,
    model_options: dict = None,
    task_options: dict = None,
):
    """Rank the PEFT methods for a task, with confidence and recommended hyperparameters, and
    the init sources available for the top method (fresh, meta, compose, merge, generate, route)."""
    with user_errors():
        from metapeft import api

        rep = api.select(task, **model_options, top=top, k=k,
                         selector=selector, experience=experience, seed=seed, **task_options)
        if as_json:
            print_json(rep.to_json())
        else:
            _print_selection(rep)


def register(app: typer.Typer) -> None:
    """Add profile, experience, sweep, train-selector and select to ``app``."""
    app.command("profile")(profile)
    group = typer.Typer(help="The experience store: every adapt/meta-train/tune/sweep run.",
                        no_args_is_help=True)
    for name, fn in (("list", exp_list), ("show", exp_show), ("stats", exp_stats),
                     ("import", exp_import), ("export", exp_export)):
        group.command(name)(fn)
    app.add_typer(group, name="experience")
    app.command("sweep")(sweep)
    app.command("train-selector")(train_selector)
    app.command("select")(select)

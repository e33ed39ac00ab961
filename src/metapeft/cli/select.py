"""CLI commands for task profiles, the experience store and method selection.

``register(app)`` adds to the main Typer app:

    metapeft profile TASK [--model M] [--json]
    metapeft experience list | show ID | import FILE | export --format jsonl --out FILE
    metapeft sweep --data POOL|synthetic --methods all --tasks N [--model M] [--steps S] [--seed]
    metapeft train-selector [--experience FILE] [--out DIR]
    metapeft select TASK [--model M] [--top K] [--json]

Same conventions as ``cli.py``: lazy imports inside the commands (``--help`` never loads MLX),
every ``UserError`` is one line on stderr and exit status 2, ``--json`` prints one JSON object
and sends progress to stderr.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

EXPERIENCE_OPT_HELP = ("Experience store (default <METAPEFT_HOME or user data dir>/"
                       "experience.safetensors).")


def _cli():
    from metapeft import cli

    return cli


def _load_task(task: Path, shots, query, ways, seed, text_field, label_field):
    from metapeft.api import load_task_arg

    return load_task_arg(task, shots=shots, query=query, ways=ways, seed=seed,
                         text_field=text_field, label_field=label_field)


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{v:.1%}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _hp_str(hp: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in hp.items())


def _methods(value: str) -> list[str]:
    from metapeft.adapters import METHODS
    from metapeft.errors import UserError

    if value.strip() == "all":
        return list(METHODS)
    out = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise UserError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)} or 'all'",
                        field="methods")
    return out


def register(app: typer.Typer) -> None:
    """Add profile, experience, sweep, train-selector and select to ``app``."""
    task_arg = typer.Argument(..., help="Task: a directory (train.jsonl + valid/test.jsonl) or a "
                                        "JSONL/CSV pool (with --shots).")

    @app.command("profile")
    def profile(
        task: Path = task_arg,
        model: str = typer.Option("tiny", "--model", "-m", help="mlx-lm model path or HF id."),
        shots: Optional[int] = typer.Option(None, help="Single-file tasks: examples per class."),
        query: Optional[int] = typer.Option(None, help="Single-file tasks: query per class."),
        ways: Optional[int] = typer.Option(None, help="Single-file tasks: number of classes."),
        seed: int = typer.Option(0, help="Seed for the episode."),
        text_field: str = typer.Option("text", help="Name of the text field."),
        label_field: str = typer.Option("label", help="Name of the label field."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """Characterise a task: size, shots, classes, lengths, vocabulary, zero-shot difficulty,
        a Fisher statistic of a fresh LoRA, and its domain."""
        cli = _cli()
        with cli.user_errors():
            from metapeft.models import load_base_model
            from metapeft.select.features import task_domain, task_features

            t = _load_task(task, shots, query, ways, seed, text_field, label_field)
            feats = task_features(t, load_base_model(model))
            obj = {"task": t.name, "domain": task_domain(t), "features": feats}
            if as_json:
                print(json.dumps(obj))
                return
            from rich.table import Table

            tab = Table(title=f"profile of {t.name} (domain: {obj['domain']}, model: {model})")
            tab.add_column("feature")
            tab.add_column("value", justify="right")
            for k, v in feats.items():
                tab.add_row(k, f"{v:.4g}")
            cli.out_console.print(tab)

    exp_app = typer.Typer(help="The experience store: every adapt/meta-train/tune/sweep run.",
                          no_args_is_help=True)
    app.add_typer(exp_app, name="experience")
    exp_opt = typer.Option(None, "--experience", "-e", help=EXPERIENCE_OPT_HELP)

    @exp_app.command("list")
    def exp_list(experience: Optional[Path] = exp_opt,
                 limit: int = typer.Option(50, help="Show at most the last N records (0: all)."),
                 as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")):
        """List records, newest last."""
        cli = _cli()
        with cli.user_errors():
            from metapeft.experience import ExperienceStore
            from metapeft.select.features import FEATURE_NAMES

            store = ExperienceStore(experience)
            recs = store.load()
            shown = recs[-limit:] if limit else recs
            if as_json:
                print(json.dumps([r.to_json(FEATURE_NAMES) for r in shown]))
                return
            from rich.table import Table

            tab = Table(title=f"{len(recs)} records in {store.path}"
                              + (f" (last {len(shown)})" if len(shown) < len(recs) else ""))
            for c in ("id", "created", "source", "task", "domain", "method", "accuracy",
                      "steps to target", "seconds"):
                tab.add_column(c)
            for r in shown:
                tab.add_row(r.id, r.created, r.source, r.task, r.domain, r.method,
                            _fmt(r.final_accuracy, True), _fmt(r.steps_to_target),
                            _fmt(r.seconds))
            cli.out_console.print(tab)

    @exp_app.command("show")
    def exp_show(record_id: str = typer.Argument(..., help="A record id (or a unique prefix)."),
                 experience: Optional[Path] = exp_opt):
        """Print one record as JSON."""
        cli = _cli()
        with cli.user_errors():
            from metapeft.experience import ExperienceStore
            from metapeft.select.features import FEATURE_NAMES

            print(json.dumps(ExperienceStore(experience).get(record_id).to_json(FEATURE_NAMES),
                             indent=2))

    @exp_app.command("import")
    def exp_import(file: Path = typer.Argument(..., help="JSONL written by `experience export`."),
                   experience: Optional[Path] = exp_opt):
        """Append the records of a JSONL file (ids already present are skipped)."""
        cli = _cli()
        with cli.user_errors():
            from metapeft.experience import ExperienceStore

            store = ExperienceStore(experience)
            ids = store.import_jsonl(file)
            cli.out_console.print(f"imported {len(ids)} records into {store.path}")

    @exp_app.command("export")
    def exp_export(out: Path = typer.Option(..., help="Destination file."),
                   fmt: str = typer.Option("jsonl", "--format", help="jsonl"),
                   experience: Optional[Path] = exp_opt):
        """Write every record as one JSON object per line."""
        cli = _cli()
        with cli.user_errors():
            from metapeft.errors import UserError
            from metapeft.experience import ExperienceStore

            if fmt != "jsonl":
                raise UserError(f"unknown format {fmt!r}; supported: jsonl", field="format")
            n = ExperienceStore(experience).export_jsonl(out)
            cli.out_console.print(f"exported {n} records to {out}")

    @app.command("sweep")
    def sweep(
        data: str = typer.Option("synthetic", help="'synthetic' (the task families) or a pool "
                                                   "JSONL/CSV; a 'domain' field gives one "
                                                   "source per domain (CLINC150)."),
        methods: str = typer.Option("all", help="'all' or a comma list of methods."),
        tasks: int = typer.Option(10, help="Number of sampled tasks."),
        model: str = typer.Option("tiny", "--model", "-m", help="mlx-lm model path or HF id."),
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
        experience: Optional[Path] = exp_opt,
        as_json: bool = typer.Option(False, "--json", help="Print one JSON summary."),
    ):
        """Build experience: run every method on N diverse sampled tasks (1-50 shots, 2-20 ways)."""
        cli = _cli()
        with cli.user_errors():
            from metapeft.errors import UserError
            from metapeft.data.episodes import sample_sweep_tasks
            from metapeft.experience import ExperienceStore
            from metapeft.sweep import run_sweep

            ms = _methods(methods)
            inits = {}
            for item in init or []:
                if "=" not in item:
                    raise UserError(f"--init expects METHOD=NAME, got {item!r}", field="init")
                m, spec = item.split("=", 1)
                inits[m.strip()] = spec.strip()
            ts = sample_sweep_tasks(data, tasks, seed=seed, max_shots=max_shots,
                                    max_ways=max_ways, query=query)
            store = ExperienceStore(experience)
            console = cli.err_console if as_json else cli.out_console
            total = len(ts) * (len(ms) + len([m for m in inits if m in ms]))
            with cli._progress(total, "sweep", console) as progress:
                bar = progress.add_task("sweep", total=total, loss="-", acc="-")
                done = [0]

                def on_run(ti, m, acc):
                    done[0] += 1
                    progress.update(bar, completed=done[0], loss=f"task {ti + 1}/{len(ts)} {m}",
                                    acc="failed" if acc is None else f"{acc:.1%}")

                summary = run_sweep(ts, ms, model=model, steps=steps, seed=seed, store=store,
                                    inits=inits, eval_every=eval_every, on_run=on_run)
            summary["experience"] = str(store.path)
            if as_json:
                print(json.dumps({k: v for k, v in summary.items() if k != "results"}
                                 | {"results": [{k: r[k] for k in ("task", "domain", "accuracy")}
                                                for r in summary["results"]]}))
                return
            from collections import Counter

            wins = Counter(max(r["accuracy"], key=r["accuracy"].get)
                           for r in summary["results"] if r["accuracy"])
            cli.out_console.print(f"{summary['records']} records from {summary['tasks']} tasks "
                                  f"appended to {store.path}; best method counts: "
                                  + ", ".join(f"{m} {c}" for m, c in wins.most_common()))
            for f in summary["failures"]:
                cli.err_console.print(f"[yellow]skipped[/yellow] {f['task']} {f['method']}: "
                                      f"{f['error']}")

    @app.command("train-selector")
    def train_selector_cmd(
        experience: Optional[Path] = exp_opt,
        out: Optional[Path] = typer.Option(None, help="Output directory (default <METAPEFT_HOME "
                                                      "or user data dir>/selector, which "
                                                      "`select` uses)."),
        epochs: int = typer.Option(400, help="Training epochs per ensemble member."),
        seed: int = typer.Option(0, help="Seed."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """Train the task embedder and the method selector from the experience store."""
        cli = _cli()
        with cli.user_errors():
            from metapeft.experience import ExperienceStore
            from metapeft.select.selector import default_selector_dir, train_selector

            store = ExperienceStore(experience)
            recs = store.load()
            sel = train_selector(recs, epochs=epochs, seed=seed,
                                 info={"trained_on": str(store.path)})
            paths = sel.save(out or default_selector_dir())
            obj = {"tasks": len(sel.ref_info), "records": len(recs), "methods": sel.methods,
                   "temperature": sel.temperature,
                   "embedder_loss": sel.embedder.info.get("final_loss"),
                   **{k: str(v) for k, v in paths.items()}}
            if as_json:
                print(json.dumps(obj))
            else:
                cli.out_console.print(f"trained on {obj['tasks']} tasks ({obj['records']} "
                                      f"records, methods {', '.join(sel.methods)}); wrote "
                                      f"{paths['embedder']} and {paths['selector']}")

    @app.command("select")
    def select_cmd(
        task: Path = task_arg,
        model: str = typer.Option("tiny", "--model", "-m", help="mlx-lm model path or HF id."),
        top: Optional[int] = typer.Option(None, help="Show the top K methods only."),
        k: int = typer.Option(5, help="Number of similar past tasks."),
        selector: Optional[Path] = typer.Option(None, help="Trained selector directory (default "
                                                           "<METAPEFT_HOME>/selector; without "
                                                           "one, a selector is trained from the "
                                                           "experience store, or priors)."),
        experience: Optional[Path] = exp_opt,
        shots: Optional[int] = typer.Option(None, help="Single-file tasks: examples per class."),
        query: Optional[int] = typer.Option(None, help="Single-file tasks: query per class."),
        ways: Optional[int] = typer.Option(None, help="Single-file tasks: number of classes."),
        seed: int = typer.Option(0, help="Seed for the episode."),
        text_field: str = typer.Option("text", help="Name of the text field."),
        label_field: str = typer.Option("label", help="Name of the label field."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """Rank the PEFT methods for a task, with confidence and recommended hyperparameters."""
        cli = _cli()
        with cli.user_errors():
            from metapeft.errors import UserError
            from metapeft.experience import ExperienceStore
            from metapeft.models import load_base_model
            from metapeft.select.features import task_features
            from metapeft.select.selector import public_json, select

            if top is not None and top < 1:
                raise UserError("--top must be at least 1", field="top")
            t = _load_task(task, shots, query, ways, seed, text_field, label_field)
            feats = task_features(t, load_base_model(model))
            res = select(feats, selector_dir=selector, store=ExperienceStore(experience),
                         top=top, k=k)
            if as_json:
                print(json.dumps(public_json(res)))
                return
            from rich.table import Table

            con = cli.out_console
            priors = res["source"] == "priors"
            tab = Table(title=f"methods for {t.name} ({'priors' if priors else res['source']})")
            for c in ("rank", "method", "predicted accuracy", "confidence", "uncertainty",
                      "recommended hyperparameters"):
                tab.add_column(c)
            for i, r in enumerate(res["ranking"], start=1):
                tab.add_row(str(i), r["method"], _fmt(r["predicted_accuracy"], True),
                            _fmt(r["confidence"], True),
                            "-" if r["uncertainty"] is None else f"±{r['uncertainty']:.1%}",
                            _hp_str(r["hyperparameters"]) + f"  [dim]({r['hyperparameters_from']})"
                                                            "[/dim]")
            con.print(tab)
            if res["similar_tasks"]:
                st = Table(title="nearest past tasks")
                for c in ("id", "task", "domain", "distance", "best method"):
                    st.add_column(c)
                for s in res["similar_tasks"]:
                    st.add_row(s["id"], str(s.get("task")), str(s.get("domain")),
                               f"{s['distance']:.3f}", str(s["best_method"]))
                con.print(st)
            con.print(("[yellow]priors:[/yellow] " if priors else "reason: ") + res["reason"],
                      highlight=False)

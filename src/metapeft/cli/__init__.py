"""The ``metapeft`` command line: a thin Typer layer over ``metapeft.api``.

Only typer and rich are imported at module level; mlx, mlx_lm and transformers load inside the
commands, so ``metapeft --help`` answers instantly. Every ``UserError`` becomes one line on stderr
and exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

# Typer renders help with rich when it can, which costs ~1 s of imports and layout on our 2-core
# machines; plain help keeps `metapeft --help` under 0.5 s. TYPER_USE_RICH=1 brings rich help back.
os.environ.setdefault("TYPER_USE_RICH", "0")

import typer  # noqa: E402

from metapeft.console import err_console, out_console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Meta-learned PEFT for MLX: pick a method, start from a meta-learned "
                       "init, tune it.")

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


def _progress(total: int, description: str, console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=getattr(console, "real", console),
                    transient=False)


class _LazyBar:
    """A rich progress bar that appears only when the run calls ``start`` (once its inputs are
    validated and training begins), so a bad input's one-line error never follows an empty bar."""

    def __init__(self, total: int, description: str, console):
        self.progress = _progress(total, description, console)
        self.total, self.description, self.task = total, description, None

    def start(self) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=self.total, loss="-",
                                               acc="-")

    def update(self, **fields) -> None:
        self.start()
        self.progress.update(self.task, **fields)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            self.progress.stop()


def _run_adapt(task, *, console, **kwargs):
    from metapeft.api import adapt

    with _LazyBar(kwargs["steps"], f"adapt {kwargs.get('method', 'lora')}", console) as bar:
        def on_step(i, loss, acc):
            bar.update(completed=i, loss=f"{loss:.3f}", acc="-" if acc is None else f"{acc:.1%}")

        return adapt(task, on_start=bar.start, on_step=on_step, **kwargs)


def _print_report(report, console, out: Path | None) -> None:
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
    loss: str = typer.Option("ce", help="Training loss: ce (cross-entropy over the candidates' "
                                        "scores), nll, ce_mean or ce_nll."),
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
                            label_field=label_field, objective=loss, record_experience=True)
        if as_json:
            print(json.dumps(report.to_json()))
        else:
            _print_report(report, out_console, out)


@app.command()
def quickstart(
    out: Optional[Path] = typer.Option(None, help="Where to write the registry, demo task and "
                                                  "adapter (default: the metapeft cache dir)."),
    steps: int = typer.Option(10, help="Adaptation steps per held-out task."),
    tasks: int = typer.Option(8, help="Held-out tasks to adapt on."),
    meta_steps: int = typer.Option(30, help="Reptile meta-iterations."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """The whole story on the embedded default, offline: meta-train, then adapt held-out tasks
    from the meta-learned init and from a fresh init, and compare."""
    with user_errors():
        from metapeft.quickstart import run_quickstart

        console = err_console if as_json else out_console
        result = run_quickstart(out=out, steps=steps, tasks=tasks, meta_steps=meta_steps,
                                console=console,
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


def _csv(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@app.command("meta-train")
def meta_train_cmd(
    data: str = typer.Option("synthetic", help="Pool JSONL/CSV (episodes), a directory of task "
                                               "folders/files, a feedback log (with "
                                               "--task-strategy), or 'synthetic'."),
    model: str = typer.Option("tiny", "--model", "-m", help="mlx-lm model path or HF id."),
    method: str = typer.Option("lora", help=METHOD_HELP),
    algorithm: str = typer.Option("reptile", help="reptile, fomaml or maml (second order)."),
    name: str = typer.Option(..., help="Registry name for the meta-weights."),
    registry: Optional[Path] = typer.Option(None, help="Registry dir (default $METAPEFT_HOME "
                                                       "or the user data dir)."),
    ways: int = typer.Option(5, help="Classes per episode."),
    shots: int = typer.Option(5, help="Support examples per class."),
    query: int = typer.Option(15, help="Query examples per class."),
    meta_steps: int = typer.Option(100, help="Meta-iterations."),
    meta_batch: int = typer.Option(4, help="Tasks per meta-iteration."),
    inner_steps: int = typer.Option(5, help="Inner-loop steps per task."),
    inner_lr: Optional[float] = typer.Option(None, help="Inner learning rate."),
    inner_optimizer: Optional[str] = typer.Option(None, help="adam or sgd (default: sgd for "
                                                              "maml, adam otherwise)."),
    outer_lr: Optional[float] = typer.Option(None, help="Reptile ε (default 1.0, annealed); "
                                                        "FOMAML/MAML outer Adam lr (1e-3)."),
    domains: Optional[list[str]] = typer.Option(None, help="Keep only these domains (comma "
                                                           "list or repeated)."),
    exclude_domains: Optional[list[str]] = typer.Option(None, help="Drop these domains (keep "
                                                                   "meta-test classes out)."),
    labels_from: Optional[Path] = typer.Option(None, help="Keep only labels listed in this file."),
    exclude_labels: Optional[list[str]] = typer.Option(None, help="Drop these labels."),
    val_fraction: float = typer.Option(0.2, help="Share of meta-train classes held out for "
                                                 "validation."),
    eval_every: int = typer.Option(10, help="Validate every N meta-steps (0: never)."),
    eval_episodes: int = typer.Option(8, help="Validation episodes."),
    task_strategy: Optional[str] = typer.Option(None, help="Feedback logs: project, intent, "
                                                           "temporal or mixed."),
    min_samples: int = typer.Option(20, help="Feedback groups with this many rows or fewer are "
                                             "dropped."),
    replay: bool = typer.Option(True, help="Weight sampling by rating (failed x3, positive x1, "
                                           "other negative x0.5)."),
    replay_failed: float = typer.Option(3.0, help="Replay weight of failed rows (rating -1)."),
    replay_positive: float = typer.Option(1.0, help="Replay weight of positive rows."),
    replay_negative: float = typer.Option(0.5, help="Replay weight of other negative rows."),
    replay_stats: bool = typer.Option(False, "--replay-stats", help="Show the replay "
                                                                    "distribution and exit."),
    seed: int = typer.Option(0, help="Seed for init and the task stream."),
    resume: bool = typer.Option(False, help="Continue from this name's checkpoint."),
    sequential: bool = typer.Option(False, help="Run a meta-batch's tasks one by one instead of "
                                                "under mx.vmap."),
    compile_: bool = typer.Option(False, "--compile", help="mx.compile the vectorised step."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file of adapter options."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Adapter option key=value."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Meta-learn an adapter initialisation across many tasks; publish versioned meta-weights."""
    with user_errors():
        from metapeft import api
        from metapeft.data.feedback import ReplayWeights, read_feedback, replay_stats as rstats

        rw = ReplayWeights(failed=replay_failed, positive=replay_positive,
                           other_negative=replay_negative) if replay else None
        console = err_console if as_json else out_console
        if replay_stats:
            rows = read_feedback(data) if Path(data).is_file() else []
            stats = rstats(rows, rw or ReplayWeights())
            if as_json:
                print(json.dumps(stats))
            else:
                from rich.table import Table

                t = Table(title=f"replay distribution of {data} ({stats['examples']} rows)")
                for c in ("category", "rows", "weight", "sampling share"):
                    t.add_column(c)
                for cat in stats["counts"]:
                    t.add_row(cat, str(stats["counts"][cat]), f"{stats['weights'][cat]:g}",
                              f"{stats['shares'][cat]:.1%}")
                out_console.print(t)
            return
        options = _parse_sets(set_, config)
        sources = api.build_meta_sources(
            data, ways=ways, shots=shots, query=query, domains=_csv(domains),
            exclude_domains=_csv(exclude_domains),
            labels_from=str(labels_from) if labels_from else None,
            exclude_labels=_csv(exclude_labels), val_fraction=val_fraction,
            task_strategy=task_strategy, min_samples=min_samples, replay=rw, seed=seed)
        if sources[3] is not None and not as_json:
            from metapeft.data.feedback import format_report

            out_console.print(format_report(sources[3]))
        spec = sources[2]
        console.print(f"meta-train classes: {spec.get('num_train_classes')}   validation: "
                      f"{len(spec.get('val_classes', spec.get('groups_val', spec.get('tasks_val', []))) or [])}")
        with _LazyBar(meta_steps, f"meta-train {method}/{algorithm}", console) as bar:
            def on_step(t, loss, acc, val):
                bar.update(completed=t, loss=f"{loss:.3f}",
                           acc=f"{acc:.1%}" + ("" if val is None else f" val {val:.1%}"))

            res = api.meta_train(data, model=model, method=method, algorithm=algorithm,
                                 name=name, registry=registry, config=options, ways=ways,
                                 shots=shots, query=query, meta_steps=meta_steps,
                                 meta_batch=meta_batch, inner_steps=inner_steps, inner_lr=inner_lr,
                                 inner_optimizer=inner_optimizer, outer_lr=outer_lr, seed=seed,
                                 eval_every=eval_every, eval_episodes=eval_episodes,
                                 resume=resume, vectorise=not sequential, compile=compile_,
                                 on_start=bar.start, on_step=on_step, sources=sources,
                                 record_experience=True)
        summary = {"name": name, "version": res.version, "path": res.path, "method": method,
                   "algorithm": algorithm, "meta_steps": res.steps_done,
                   "best_step": res.best_step, "meta_loss": res.meta_losses,
                   "meta_accuracy": res.meta_accuracies, "val_steps": res.val_steps,
                   "val_accuracy": res.val_accuracies, "seconds": round(res.seconds, 3),
                   "vectorised": res.fallback_reason is None and not sequential}
        if as_json:
            print(json.dumps(summary))
        else:
            out_console.print(f"published [bold]{name}@{res.version}[/bold] -> {res.path}")
            if res.val_accuracies:
                out_console.print(f"validation accuracy (held-out classes, after {inner_steps} "
                                  f"inner steps): best {max(res.val_accuracies):.1%} at step "
                                  f"{res.best_step}")
            out_console.print(f"next: metapeft adapt TASK --method {method} --init {name}")


weights_app = typer.Typer(help="Manage meta-weights in the local registry.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
REGISTRY_OPT = typer.Option(None, "--registry", help="Registry dir.")


def _emit(obj, as_json: bool, render) -> None:
    if as_json:
        print(json.dumps(obj, default=str))
    else:
        render(obj)


@weights_app.command("list")
def weights_list(registry: Optional[Path] = REGISTRY_OPT,
                 as_json: bool = typer.Option(False, "--json")):
    """List every name and version."""
    with user_errors():
        from rich.table import Table

        from metapeft import registry as reg

        rows = reg.list_weights(registry)

        def render(rows):
            t = Table(title=f"meta-weights in {reg.registry_root(registry)}")
            cols = ["name", "version", "latest", "method", "algorithm", "base_model", "created",
                    "num_tasks"]
            for c in cols:
                t.add_column(c)
            for r in rows:
                t.add_row(*[str(r.get(c, "")) for c in cols])
            out_console.print(t)

        _emit(rows, as_json, render)


@weights_app.command("show")
def weights_show(spec: str, registry: Optional[Path] = REGISTRY_OPT,
                 as_json: bool = typer.Option(False, "--json")):
    """Show one version's metadata (NAME or NAME@VERSION)."""
    with user_errors():
        from metapeft import registry as reg

        _emit(reg.show(spec, registry), as_json,
              lambda o: out_console.print_json(json.dumps(o, default=str)))


@weights_app.command("compare")
def weights_compare(a: str, b: str, registry: Optional[Path] = REGISTRY_OPT,
                    as_json: bool = typer.Option(False, "--json")):
    """Compare two versions: metadata differences and parameter distance."""
    with user_errors():
        from metapeft import registry as reg

        _emit(reg.compare(a, b, registry), as_json,
              lambda o: out_console.print_json(json.dumps(o, default=str)))


@weights_app.command("rollback")
def weights_rollback(name: str, version: str, registry: Optional[Path] = REGISTRY_OPT):
    """Make an earlier version the latest (nothing is deleted)."""
    with user_errors():
        from metapeft import registry as reg

        reg.rollback(name, int(str(version).lstrip("v")), registry)
        out_console.print(f"{name}: latest is now v{int(str(version).lstrip('v'))}")


@weights_app.command("delete")
def weights_delete(spec: str, registry: Optional[Path] = REGISTRY_OPT):
    """Delete NAME@VERSION, or every version of NAME."""
    with user_errors():
        from metapeft import registry as reg

        out_console.print(f"deleted {reg.delete(spec, registry)}")


@app.command()
def version():
    """Print the metapeft version."""
    from metapeft import __version__

    print(__version__)


# Command groups that live in their own modules (each imports only typer at module level).
from metapeft.commands.select_cmds import register as _register_select  # noqa: E402

from metapeft.commands.tune_cmds import register as _register_tune  # noqa: E402

_register_select(app)
_register_tune(app)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())

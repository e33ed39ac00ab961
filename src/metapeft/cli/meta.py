"""``metapeft meta-train`` and ``metapeft quickstart``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from metapeft.cli._common import (CONFIG_OPT, JSON_OPT, METHOD_OPT, REGISTRY_OPT, SET_OPT,
                                  LazyBar, csv_list, decay_note, err_console, out_console,
                                  parse_numbers, parse_sets, print_json, progress, user_errors,
                                  with_model_options)
from metapeft.config import GATE, META_RECIPE, tier_default


def _print_replay_stats(stats: dict, data: str) -> None:
    from rich.table import Table

    t = Table(title=f"replay distribution of {data} ({stats['examples']} rows)")
    for c in ("category", "rows", "weight", "sampling share"):
        t.add_column(c)
    for cat in stats["counts"]:
        t.add_row(cat, str(stats["counts"][cat]), f"{stats['weights'][cat]:g}",
                  f"{stats['shares'][cat]:.1%}")
    out_console.print(t)


@with_model_options
def meta_train(
    data: str = typer.Option("synthetic", help="Pool JSONL/CSV (episodes), a directory of task "
                                               "folders/files, a feedback log (with "
                                               "--task-strategy), or 'synthetic'."),
    method: str = METHOD_OPT,
    algorithm: str = typer.Option("reptile", help="reptile, fomaml or maml (second order)."),
    name: str = typer.Option(..., help="Registry name for the meta-weights."),
    registry: Optional[Path] = REGISTRY_OPT,
    ways: int = typer.Option(5, help="Classes per episode."),
    shots: int = typer.Option(5, help="Support examples per class."),
    query: int = typer.Option(META_RECIPE["query"], help="Query examples per class."),
    meta_steps: Optional[int] = typer.Option(
        None, help="Meta-iterations " + tier_default("meta_steps") + ": each tier's measured "
                   "recipe (stories260K, SmolLM2-135M)."),
    meta_batch: int = typer.Option(META_RECIPE["meta_batch"], help="Tasks per meta-iteration."),
    inner_steps: int = typer.Option(META_RECIPE["inner_steps"], help="Inner-loop steps per task."),
    inner_lr: Optional[float] = typer.Option(None, help="Inner learning rate (default: the "
                                                        "method's lr; 3x with maml's SGD)."),
    inner_optimizer: Optional[str] = typer.Option(None, help="adam or sgd (default: sgd for "
                                                              "maml, adam otherwise)."),
    outer_lr: Optional[float] = typer.Option(None, help="Reptile ε (default 1.0, annealed); "
                                                        "FOMAML/MAML outer Adam lr (1e-3)."),
    inner_lr_mode: str = typer.Option("shared", help="shared: one inner lr; per-layer: also "
                                      "meta-learn a multiplier of it per parameter leaf (MAML++'s "
                                      "LSLR), stored with the weights and applied by adapt."),
    inner_lr_meta_lr: Optional[float] = typer.Option(None, help="per-layer: the outer Adam lr "
                                                     "of the log-multipliers (default 0.05)."),
    domains: Optional[list[str]] = typer.Option(None, help="Keep only these domains (comma "
                                                           "list or repeated)."),
    exclude_domains: Optional[list[str]] = typer.Option(None, help="Drop these domains (keep "
                                                                   "meta-test classes out)."),
    labels_from: Optional[Path] = typer.Option(None, help="Keep only labels listed in this file."),
    exclude_labels: Optional[list[str]] = typer.Option(None, help="Drop these labels."),
    val_fraction: float = typer.Option(META_RECIPE["val_fraction"], help="Share of meta-train "
                                       "classes held out for validation."),
    val_domains: Optional[list[str]] = typer.Option(None, help="Hold these domains' classes out "
                                                    "whole for validation, instead of "
                                                    "--val-fraction (a pool with a domain "
                                                    "column): as a held-out-domain meta-test."),
    eval_every: int = typer.Option(META_RECIPE["eval_every"], help="Validate every N "
                                   "meta-steps (0: never)."),
    eval_episodes: int = typer.Option(META_RECIPE["eval_episodes"], help="Validation episodes."),
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
    calibrate_lr: bool = typer.Option(True, help="After training, choose the test-time lr for "
                                                 "the init on the validation tasks (adapt --init "
                                                 "then uses it unless --lr is given)."),
    lr_factors: Optional[str] = typer.Option(
        None, "--lr-factors", help="With --calibrate-lr: lr factors (x the method's lr) to try, "
                                   "comma-separated " + tier_default("lr_factors") + "."),
    lr_decays: Optional[str] = typer.Option(
        None, "--lr-decays", help="With --calibrate-lr: inverse-time decays to try with every lr "
                                  "factor, comma-separated (step t at lr / (1 + d(t-1)); 0 = a "
                                  "constant lr) " + tier_default("lr_decays") + "."),
    calibrate_tasks: Optional[int] = typer.Option(
        None, help="With --calibrate-lr: validation tasks it adapts "
                   + tier_default("calibrate_tasks", "--eval-episodes")
                   + " (on SmolLM2-135M 6 could not separate the top candidates, 24 did)."),
    calibrate_horizons: Optional[str] = typer.Option(
        None, help="With --calibrate-lr: run lengths (steps, comma-separated, e.g. 5,50) that "
                   "get a step size of their own, by validation accuracy at that step; adapt "
                   "--steps N takes the one for N. The calibration runs to the last of them."),
    processes: int = typer.Option(1, help="Data-parallel processes on this machine: re-run this "
                                          "command as N ranks of MLX's ring backend (localhost); "
                                          "each adapts its share of every meta-batch."),
    gate: bool = typer.Option(False, "--gate", help="Publish only if the new weights pass the "
                              "drift check (weights check) against NAME's latest version; "
                              "otherwise keep them unpublished under candidates/ and exit 3."),
    gate_data: Optional[str] = typer.Option(None, help="--gate: where the probe tasks come from "
                                                       "(default: --data with its filters)."),
    gate_tasks: int = typer.Option(GATE["tasks"], help="--gate: probe tasks."),
    gate_steps: int = typer.Option(GATE["steps"],
                                   help="--gate: adaptation steps per probe task."),
    gate_tolerance: float = typer.Option(GATE["tolerance"], help="--gate: largest accepted drop "
                                         "in mean accuracy (absolute)."),
    gate_max_drift: float = typer.Option(GATE["max_drift"], help="--gate: largest accepted mean "
                                         "KL(old || new) of the predictive distributions."),
    pretrain_steps: int = typer.Option(0, help="First train the adapter jointly on N meta-train "
                                       "episodes (multitask pretraining, Meta-Baseline), then "
                                       "meta-learn from it."),
    start_from: Optional[str] = typer.Option(None, help="Meta-learn from this adapter (file, "
                                             "adapter dir or NAME@V) instead of a fresh init; "
                                             "no continual-learning terms, unlike --init."),
    init: Optional[str] = typer.Option(None, "--init", help="Continue from this published "
                                       "version (NAME@V) on the new --data; publishes the next "
                                       "version with it as parent."),
    forgetting: Optional[str] = typer.Option(None, help="With --init: ewc, replay, both or none "
                                                        "(default both)."),
    ewc_lambda: Optional[float] = typer.Option(None, help="EWC strength λ in λ·Σ F̂·(θ − "
                                               "θ_parent)², F̂ the Fisher scaled to mean 1 "
                                               "(default 1.0)."),
    replay_fraction: Optional[float] = typer.Option(None, help="Share of each meta-batch's tasks "
                                                    "drawn from the parent's data (default "
                                                    "0.25)."),
    since: Optional[str] = typer.Option(None, help="Feedback logs: only rows with a timestamp at "
                                                   "or after this date (ISO 8601)."),
    days: Optional[int] = typer.Option(None, help="Feedback logs: only the last N days' rows."),
    config: Optional[Path] = CONFIG_OPT,
    set_: Optional[list[str]] = SET_OPT,
    as_json: bool = JSON_OPT,
    model_options: dict = None,
):
    """Meta-learn an adapter initialisation across many tasks; publish versioned meta-weights.
    Under mlx.launch (or with --processes N) the work is split over the processes. With --gate,
    publish only what passes the drift check against the latest version (else exit 3)."""
    with user_errors():
        from metapeft import api
        from metapeft.data.feedback import ReplayWeights

        rw = ReplayWeights(failed=replay_failed, positive=replay_positive,
                           other_negative=replay_negative) if replay else None
        if replay_stats:
            stats = api.replay_stats(data, rw)
            if as_json:
                print_json(stats)
            else:
                _print_replay_stats(stats, data)
            return
        if processes != 1:
            from metapeft import registry as reg
            from metapeft.cli.launch import relaunch

            code = relaunch(processes, "meta-train",
                            checkpoint=reg.checkpoint_path(name, registry))
            if code:
                raise typer.Exit(code)
            return

        since_dt = _since(since, days)

        from metapeft.cli.launch import rank_outcome, silent_console
        from metapeft.meta.distributed import world

        rank = world().rank()  # 0 unless under mlx.launch: the other ranks print nothing
        if rank:
            console = out = silent_console()
        else:
            console, out = (err_console if as_json else out_console), out_console

        def on_sources(sources):
            if sources.extraction_report is not None and not as_json:
                from metapeft.data.feedback import format_report

                out.print(format_report(sources.extraction_report))
            held = sources.spec.get("val_domains")
            console.print(f"meta-train classes: {sources.num_train_classes}   validation: "
                          f"{sources.num_validation}"
                          + (f" (domains {', '.join(held)})" if held else ""))

        with rank_outcome(rank), \
                LazyBar(pretrain_steps, "multitask pretraining", console) as pre, \
                LazyBar(meta_steps, f"meta-train {method}/{algorithm}", console) as bar:
            def on_start(total):
                pre.close()
                bar.start(total, completed=_checkpoint_step(name, registry) if resume else 0)

            def on_step(t, loss, acc, val):
                bar.update(completed=t, loss=f"{loss:.3f}",
                           acc=f"{acc:.1%}" + ("" if val is None else f" val {val:.1%}"))

            res = api.meta_train(
                data, **model_options, method=method, algorithm=algorithm, name=name, registry=registry,
                config=parse_sets(set_, config), ways=ways, shots=shots, query=query,
                meta_steps=meta_steps, meta_batch=meta_batch, inner_steps=inner_steps,
                inner_lr=inner_lr, inner_optimizer=inner_optimizer, outer_lr=outer_lr,
                inner_lr_mode=inner_lr_mode, inner_lr_meta_lr=inner_lr_meta_lr,
                seed=seed, eval_every=eval_every, eval_episodes=eval_episodes,
                val_fraction=val_fraction, val_domains=csv_list(val_domains),
                domains=csv_list(domains),
                exclude_domains=csv_list(exclude_domains),
                labels_from=str(labels_from) if labels_from else None,
                exclude_labels=csv_list(exclude_labels), task_strategy=task_strategy,
                min_samples=min_samples, replay=rw, resume=resume, vectorise=not sequential,
                compile=compile_, on_sources=on_sources, on_start=on_start, on_step=on_step,
                record_experience=True, calibrate_lr=calibrate_lr,
                calibrate_decays=parse_numbers(lr_decays, "lr_decays", positive=False),
                calibrate_factors=parse_numbers(lr_factors, "lr_factors", positive=True),
                calibrate_tasks=calibrate_tasks,
                calibrate_horizons=parse_numbers(calibrate_horizons, "calibrate_horizons",
                                                 positive=True) or (),
                gate=gate, gate_data=gate_data, gate_tasks=gate_tasks, gate_steps=gate_steps,
                gate_tolerance=gate_tolerance, gate_max_drift=gate_max_drift,
                init=init, forgetting=forgetting, ewc_lambda=ewc_lambda,
                replay_fraction=replay_fraction, since=since_dt,
                pretrain_steps=pretrain_steps, start_from=start_from,
                on_pretrain_step=lambda t, loss: pre.update(completed=t, loss=f"{loss:.3f}"),
                on_calibrate=lambda f, row: console.print(
                    f"  test-time lr x{f}: mean validation accuracy "
                    + ("diverged" if row.get("mean") in (None, float("-inf"))
                       else f"{row['mean']:.1%}")))
        if rank:
            return
        if as_json:
            print_json(res.to_json())
            if not res.published:
                from metapeft.drift import GATE_FAILED

                raise typer.Exit(GATE_FAILED)
            return
        if "gate" in res.result.extra:
            _print_gate(res, name)
            if not res.published:
                from metapeft.drift import GATE_FAILED

                raise typer.Exit(GATE_FAILED)
        out_console.print(f"published [bold]{name}@{res.version}[/bold] -> {res.path}")
        if "continual" in res.result.extra:
            from metapeft.cli.weights import _continual_lines

            c = res.result.extra["continual"]
            for line in _continual_lines({"parent": c["parent"], "continual": c["settings"],
                                          "forgetting": c["forgetting"], "gain": c["gain"]}):
                out_console.print(line, highlight=False, markup=False)
        if res.val_accuracies:
            out_console.print(f"validation accuracy (held-out classes, after {inner_steps} inner "
                              f"steps): best {max(res.val_accuracies):.1%} at step "
                              f"{res.best_step}")
            if res.best_step == 0:  # a pretrained or given start that no meta-step beat
                out_console.print("no meta-step beat the start on the validation tasks: the "
                                  "start is published unchanged")
        cal = res.result.extra.get("adapt_lr")
        if cal:
            out_console.print(f"test-time lr for this init: {cal['adapt_lr']:g} (x{cal['factor']} "
                              f"of {method}'s default{decay_note(cal)}; chosen on the "
                              "validation tasks)")
            for h, c in sorted((cal.get("horizons") or {}).items(), key=lambda hc: int(hc[0])):
                out_console.print(f"  for runs of up to {h} steps: {c['adapt_lr']:g} "
                                  f"(x{c['factor']}{decay_note(c)})", highlight=False)
        out_console.print(f"next: metapeft adapt TASK --method {method} --init {name}")


def _since(since: str | None, days: int | None):
    """``--since DATE`` / ``--days N`` as a UTC datetime (None: no filter)."""
    import datetime as dt

    from metapeft.errors import UserError

    if since is not None and days is not None:
        raise UserError("give --since or --days, not both", field="since")
    if days is not None:
        if days < 1:
            raise UserError(f"--days must be >= 1, got {days}", field="days")
        return dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days)
    if since is None:
        return None
    try:
        value = dt.datetime.fromisoformat(since.strip())
    except ValueError:
        raise UserError(f"--since {since!r} is not an ISO 8601 date (e.g. 2024-06-01)",
                        field="since") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def _print_gate(res, name: str) -> None:
    """``--gate``: the check's verdict; for a candidate it stopped, where it was kept."""
    g = res.result.extra["gate"]
    if g.get("against") is None:
        out_console.print(f"gate: {g['reason']}", highlight=False)
        return

    def pct(v, sign=""):
        return "-" if v is None else f"{v:{sign}.1%}"

    delta = g.get("delta") or {}
    ci = "" if delta.get("ci") is None else f" ± {delta['ci']:.1%}"
    drift = "-" if g.get("drift") is None else f"{g['drift']:.3f}"
    out_console.print(f"gate against {g['against']} ({g['tasks']} probe tasks from {g['data']}, "
                      f"{g['steps']} steps): accuracy {pct(g.get('accuracy_new'))} vs "
                      f"{pct(g.get('accuracy_old'))}, delta {pct(delta.get('mean'), '+')}{ci} "
                      f"(tolerance {g['tolerance']:.1%}), drift {drift} (max "
                      f"{g['max_drift']:g})", highlight=False, markup=False)
    if g["passed"]:
        out_console.print("gate passed", highlight=False)
        return
    out_console.print(f"gate failed: {'; '.join(g['reasons'])}", highlight=False, markup=False)
    out_console.print(f"not published: the candidate is kept at {res.path} (its report: "
                      f"{str(res.path).removesuffix('.safetensors')}.json); {name}'s latest "
                      f"is still {g['against']}", highlight=False, markup=False)


def quickstart(
    out: Optional[Path] = typer.Option(None, help="Where to write the registry, demo task and "
                                                  "adapter (default: the metapeft cache dir)."),
    steps: int = typer.Option(10, help="Adaptation steps per held-out task."),
    tasks: int = typer.Option(8, help="Held-out tasks to adapt on."),
    meta_steps: int = typer.Option(30, help="Reptile meta-iterations."),
    as_json: bool = JSON_OPT,
):
    """The whole story on the embedded default, offline: meta-train, then adapt held-out tasks
    from the meta-learned init and from a fresh init, and compare."""
    with user_errors():
        from metapeft.quickstart import run_quickstart

        console = err_console if as_json else out_console
        result = run_quickstart(out=out, steps=steps, tasks=tasks, meta_steps=meta_steps,
                                console=console,
                                progress=lambda total, desc: progress(total, desc, console))
        if as_json:
            print_json(result)


def register(app: typer.Typer) -> None:
    app.command()(quickstart)
    app.command("meta-train")(meta_train)


def _checkpoint_step(name: str, registry) -> int:
    """The meta-step a ``--resume`` continues from (its checkpoint's header; 0 if unreadable:
    the run itself reports a missing or broken checkpoint)."""
    from metapeft import registry as reg
    from metapeft.artifacts import read_metadata
    from metapeft.errors import UserError

    try:
        return int(read_metadata(reg.checkpoint_path(name, registry)).get("step", 0))
    except (UserError, OSError, ValueError):
        return 0

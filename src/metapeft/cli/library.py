"""``metapeft library add | list | remove | build | calibrate | train-generator``: the adapter
library (``metapeft.library``) that ``adapt --init library:compose``, ``--init
library:generate`` and ``adapt --route arrow`` start new tasks from."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from metapeft.cli._common import (CONFIG_OPT, JSON_OPT, METHOD_OPT, REGISTRY_OPT, SET_OPT,
                                  LazyBar, compact_table, csv_list, err_console, out_console,
                                  parse_numbers, parse_sets, print_json, short_time, user_errors,
                                  with_model_options)

MAX_SIZE_OPT = typer.Option(None, "--max-size", help="Keep at most N entries: evict the "
                            "lower-scoring member of the most similar pair until it fits.")


def _size(n) -> str:
    return "-" if n is None else f"{n / 1024:.0f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def library_add(
    adapter_dir: Path = typer.Argument(..., help="An adapter directory written by "
                                                 "`metapeft adapt --out`."),
    task: Optional[Path] = typer.Option(None, "--task", help="The task it was trained on (its "
                                        "support texts give the entry's content embedding and "
                                        "profile); without it the labels alone describe it."),
    max_size: Optional[int] = MAX_SIZE_OPT,
    registry: Optional[Path] = REGISTRY_OPT,
    as_json: bool = JSON_OPT,
    model_options: dict = None,
):
    """Add an adapter directory to the library."""
    with user_errors():
        from metapeft import library
        from metapeft.adapt import load_task_arg

        task_obj = load_task_arg(task) if task is not None else None
        res = library.add(adapter_dir, task=task_obj, registry=registry, max_size=max_size,
                          model=None if model_options["model"] == "tiny" else
                          model_options["model"], dequantize=model_options["dequantize"])
        if as_json:
            print_json(res.to_json())
            return
        e = res.entry
        note = "" if e.composable else f" (listed, not composable: {e.reason})"
        out_console.print(f"{'added' if res.added else 'already in the library:'} "
                          f"[bold]{e.id}[/bold] {e.method} {e.task or ''}{note}",
                          highlight=False)
        for v in res.evicted:
            out_console.print(f"evicted {v['id']} ({v['task']}): {v['reason']}", highlight=False)


def library_list(registry: Optional[Path] = REGISTRY_OPT, as_json: bool = JSON_OPT):
    """List the library's entries."""
    with user_errors():
        from metapeft import library

        rows = [e.to_json() for e in library.entries(registry)]
        if as_json:
            print_json({"library": str(library.library_dir(registry)), "entries": rows,
                        "disk_bytes": library.disk_bytes(registry)})
            return
        if not rows:
            out_console.print("the adapter library is empty (metapeft library add DIR, adapt "
                              "--keep, or library build)")
            return
        t = compact_table(f"adapter library in {library.library_dir(registry)} "
                          f"({len(rows)} entries, {_size(library.disk_bytes(registry))})",
                          [("id", "left", True), "method", "base model", "task",
                           ("score", "right"), ("added (UTC)", "left", True), "composable"])
        for r in rows:
            t.add_row(r["id"], f"{r['method']} r{r['rank']}" if r["rank"] else r["method"],
                      Path(str(r["base_model"] or "-")).name, str(r["task"] or "-"),
                      "-" if r["score"] is None else f"{r['score']:.1%}",
                      short_time(r["added"]), "yes" if r["composable"] else f"no: {r['reason']}")
        out_console.print(t)


def library_remove(entry_id: str = typer.Argument(..., help="An entry id (or its first "
                                                              "characters)."),
                   registry: Optional[Path] = REGISTRY_OPT, as_json: bool = JSON_OPT):
    """Remove an entry from the library."""
    with user_errors():
        from metapeft import library

        row = library.remove(entry_id, registry)
        if as_json:
            print_json({"removed": row})
        else:
            out_console.print(f"removed {row['id']} ({row['task']})", highlight=False)


def library_build(
    data: Path = typer.Option(..., "--data", help="A labelled JSONL/CSV pool."),
    tasks: int = typer.Option(16, "--tasks", help="Episodes to adapt and keep."),
    steps: int = typer.Option(10, "--steps", help="Optimizer steps per episode."),
    ways: int = typer.Option(5, "--ways"), shots: int = typer.Option(5, "--shots"),
    query: int = typer.Option(10, "--query", help="Query examples per class (the score)."),
    domains: Optional[list[str]] = typer.Option(None, "--domains", help="Only these domains."),
    exclude_domains: Optional[list[str]] = typer.Option(None, "--exclude-domains",
                                                        help="Leave these domains out (the "
                                                        "meta-test ones)."),
    method: str = METHOD_OPT,
    seed: int = typer.Option(0, "--seed", help="Episode i uses seed + i."),
    max_size: Optional[int] = MAX_SIZE_OPT,
    registry: Optional[Path] = REGISTRY_OPT,
    as_json: bool = JSON_OPT,
    model_options: dict = None,
):
    """Fill the library from a pool's episodes (benchmark preparation)."""
    with user_errors():
        from metapeft import api

        console = err_console if as_json else out_console
        with LazyBar(tasks, "library build", console) as bar:
            res = api.library_build(data, **model_options, tasks=tasks, steps=steps, ways=ways,
                                shots=shots, query=query, seed=seed, domains=csv_list(domains),
                                exclude_domains=csv_list(exclude_domains), method=method,
                                registry=registry, max_size=max_size,
                                on_task=lambda i, row: bar.update(
                                    completed=i + 1, acc=f"{row['final_accuracy']:.1%}"))
        if as_json:
            print_json(res.to_json())
        else:
            out_console.print(f"{res.added} added, {res.entries} entries, "
                              f"{_size(res.disk_bytes)}, {res.seconds:.1f} s", highlight=False)


def library_calibrate(
    data: Path = typer.Option(..., "--data", help="A labelled JSONL/CSV pool of past tasks "
                              "(never the test split)."),
    init: str = typer.Option("library:compose", "--init", help="The composition spec to "
                             "calibrate, as adapt takes it: library:compose[:K][+INIT] (its "
                             "step size) or library:merge[:K][+INIT] (its weight bound)."),
    tasks: int = typer.Option(8, "--tasks", help="Episodes to compose and train from."),
    ways: int = typer.Option(5, "--ways"), shots: int = typer.Option(5, "--shots"),
    query: int = typer.Option(10, "--query", help="Query examples per class (the score)."),
    domains: Optional[list[str]] = typer.Option(None, "--domains", help="Only these domains."),
    exclude_domains: Optional[list[str]] = typer.Option(None, "--exclude-domains",
                                                        help="Leave these domains out."),
    lr_factors: Optional[str] = typer.Option(None, "--lr-factors", help="Factors of the base "
                                             "lr (INIT's calibrated lr, else LoRA's) to try, "
                                             "comma-separated (default 1,0.3,0.1,0.03; a "
                                             "merge's start: 1)."),
    lr_decays: Optional[str] = typer.Option(None, "--lr-decays", help="Inverse-time decays to "
                                            "try with every factor (default 0,3)."),
    bounds: Optional[str] = typer.Option(None, "--bounds", help="A merge's weight bounds to "
                                         "try, comma-separated (default 1.5,0.6,0.3,0; 0 is "
                                         "INIT alone)."),
    marks: Optional[str] = typer.Option(None, "--marks", help="Steps whose mean accuracy "
                                        "chooses (default 1,2,5,10; a merge's 0,1,2,5)."),
    horizons: Optional[str] = typer.Option(None, "--horizons", help="Run lengths that get a "
                                           "step size of their own (adapt --steps N takes N's)."),
    seed: int = typer.Option(0, "--seed", help="Episode i uses seed + i."),
    processes: int = typer.Option(1, "--processes", help="Split the tasks over N processes on "
                                  "this machine (MLX's ring backend), as meta-train does."),
    config: Optional[Path] = CONFIG_OPT,
    set_: Optional[list[str]] = SET_OPT,
    registry: Optional[Path] = REGISTRY_OPT,
    as_json: bool = JSON_OPT,
    model_options: dict = None,
):
    """Choose the step size adapt trains a composed init at (or a merge's weight bound), on
    past tasks, and keep it in the library (adapt --init with the same spec then uses it)."""
    with user_errors():
        from metapeft import api
        from metapeft.compose import (CAL_DECAYS, CAL_FACTORS, MERGE_BOUNDS, MERGE_LR_FACTORS,
                                      merge_candidates, parse_spec, spec_kind)

        parse_spec(init)  # a bad spec fails before the model loads
        merge = spec_kind(init) == "merge"
        factors = parse_numbers(lr_factors, "lr_factors", positive=True)
        decays = parse_numbers(lr_decays, "lr_decays", positive=False)
        bound_list = parse_numbers(bounds, "bounds", positive=False)
        mark_steps = parse_numbers(marks, "marks", positive=not merge)
        candidates = (len(merge_candidates(bound_list or MERGE_BOUNDS,
                                           factors or MERGE_LR_FACTORS)) if merge
                      else len(factors or CAL_FACTORS) * len(decays or CAL_DECAYS))
        if processes != 1:
            from metapeft.cli.launch import relaunch

            code = relaunch(processes, "library calibrate",
                            kept=lambda: "nothing was kept (the step size is written at the end)")
            if code:
                raise typer.Exit(code)
            return
        from metapeft.cli.launch import rank_outcome, silent_console
        from metapeft.meta.distributed import world

        group = world()  # one process unless --processes or mlx.launch started this one
        console = silent_console() if group.rank() else err_console if as_json else out_console
        mine = len(range(group.rank(), tasks, group.size()))
        with rank_outcome(group.rank()), \
                LazyBar(mine + candidates, "library calibrate", console) as bar:
            done = [0]

            def tick(label: str, **fields) -> None:
                done[0] += 1
                bar.update(completed=done[0], description=f"library calibrate: {label}",
                           **fields)

            rec = api.library_calibrate(
                data, init=init, **model_options, tasks=tasks, ways=ways, shots=shots,
                query=query, seed=seed, domains=csv_list(domains),
                exclude_domains=csv_list(exclude_domains), config=parse_sets(set_, config),
                factors=factors, decays=decays, bounds=bound_list,
                marks=None if mark_steps is None else tuple(int(m) for m in mark_steps),
                horizons=tuple(int(h) for h in parse_numbers(horizons, "horizons",
                                                             positive=True) or ()),
                registry=registry, group=group,
                on_task=lambda i, rep: tick(f"{'merged' if merge else 'composed'} task {i + 1}",
                                            loss=f"{_support_loss(rep, merge):.3f}"),
                on_trial=lambda key, row: tick(
                    f"bound {key}" if merge else f"lr x{key}", loss="-",
                    acc="diverged" if row.get("diverged") else f"{row['mean']:.1%}"))
        if group.rank():
            return
        if as_json:
            print_json(rec)
            return
        from metapeft.meta.stepsize import describe_lead

        if merge:
            _print_merge_bounds(rec)
            return
        t = compact_table(f"{rec['key']}: step sizes on {rec['num_tasks']} tasks "
                          f"(base lr {rec['base_lr']:g}, {rec['base_lr_source']})",
                          ["candidate", *[f"step {m}" for m in rec["marks"]], "mean"])
        for key, row in rec["table"].items():
            t.add_row(key, *[("-" if row.get(str(m)) is None else f"{row[str(m)]:.1%}")
                             for m in rec["marks"]],
                      "diverged" if row.get("mean") is None else f"{row['mean']:.1%}")
        out_console.print(t)
        lead = describe_lead(rec)
        out_console.print(f"kept: lr {rec['adapt_lr']:g}"
                          + (f", decay {rec['adapt_lr_decay']:g}" if rec["adapt_lr_decay"]
                             else "") + ("" if lead is None else f", {lead}")
                          + f"; {rec['seconds']:.0f} s", highlight=False)


def _support_loss(report: dict, merge: bool) -> float:
    """A calibration task's support loss: its composition's, or a merge's best over the bounds
    (``report`` then maps each bound to its merge's report)."""
    return (min(r["support_loss"] for r in report.values()) if merge
            else report["support_loss"])


def _print_merge_bounds(rec: dict) -> None:
    """``library calibrate``'s table for a merge: each bound's (and lr factor's) accuracy at the
    marks."""
    t = compact_table(f"{rec['key']}: weight bounds on {rec['num_tasks']} tasks "
                      f"(INIT's lr {rec['adapt_lr']:g})",
                      ["bound", *[f"step {m}" for m in rec["marks"]], "mean"])
    for key, row in rec["table"].items():
        t.add_row(key.replace(" x", ", lr x") + (" (INIT alone)" if row["bound"] == 0 else ""),
                  *[("-" if row.get(str(m)) is None else f"{row[str(m)]:.1%}")
                    for m in rec["marks"]],
                  "diverged" if row.get("mean") is None else f"{row['mean']:.1%}")
    out_console.print(t)
    m = rec.get("margin")
    lead = "" if not m else (f", {m['mean'] * 100:+.1f}" + ("" if m["ci95"] is None else
                                                           f" ± {m['ci95'] * 100:.1f}")
                             + f" points over bound {m['over'].replace(' x', ', lr x')}")
    factor = rec.get("merge_lr_factor", 1.0)
    out_console.print(f"kept: bound {rec['merge_bound']:g}"
                      + ("" if factor == 1 else f", lr x{factor:g}")
                      + f"{lead}; {rec['seconds']:.0f} s", highlight=False)


def library_train_generator(
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Reconstruction: Adam steps "
                                         "over the whole library (0: none; default 400, none "
                                         "with --anchor)."),
    anchor: Optional[str] = typer.Option(None, "--anchor", help="Generate a residual on this "
                                         "meta-init (NAME, NAME@V or a file): every task starts "
                                         "at INIT until the end-to-end stage trains the "
                                         "residual; adapt then uses INIT's calibrated step "
                                         "size."),
    e2e_algorithm: str = typer.Option("fomaml", "--e2e-algorithm", help="The end-to-end "
                                      "stage's meta-gradient: fomaml (the query gradient), "
                                      "maml (= --second-order) or reptile (toward the adapted "
                                      "LoRA; needs --inner-steps >= 1)."),
    seed: int = typer.Option(0, "--seed"),
    e2e_steps: int = typer.Option(0, "--e2e-steps", help="Then fine-tune the generator end to "
                                  "end: N Adam steps on the query loss of its LoRAs on "
                                  "meta-train episodes of --data (0: reconstruction only)."),
    inner_steps: int = typer.Option(0, "--inner-steps", help="Support steps before the query "
                                    "loss (0: the query loss at the generated LoRA; >0: "
                                    "first-order MAML unless --second-order)."),
    second_order: bool = typer.Option(False, "--second-order", help="Differentiate through "
                                      "the inner steps."),
    e2e_lr: float = typer.Option(1e-4, "--e2e-lr", help="The generator's Adam lr in the "
                                 "end-to-end stage."),
    meta_batch: int = typer.Option(4, "--meta-batch", help="Episodes per end-to-end step."),
    val_episodes: int = typer.Option(8, "--val-episodes", help="Fixed episodes of --data that "
                                     "the end-to-end stage never trains on, scored before and "
                                     "after it (0: none)."),
    data: Optional[Path] = typer.Option(None, "--data", help="The meta-train pool (JSONL/CSV) "
                                        "the library was built from; pass the same domain "
                                        "filters, so no meta-test class is seen."),
    domains: Optional[list[str]] = typer.Option(None, "--domains", help="Only these domains."),
    exclude_domains: Optional[list[str]] = typer.Option(None, "--exclude-domains",
                                                        help="Leave these domains out (the "
                                                        "meta-test ones)."),
    ways: int = typer.Option(5, "--ways"), shots: int = typer.Option(5, "--shots"),
    query: int = typer.Option(10, "--query", help="Query examples per class."),
    config: Optional[Path] = CONFIG_OPT,
    set_: Optional[list[str]] = SET_OPT,
    registry: Optional[Path] = REGISTRY_OPT,
    as_json: bool = JSON_OPT,
    model_options: dict = None,
):
    """Train the task-conditioned LoRA generator on the library (for --init library:generate),
    optionally fine-tuned end to end through the support/query loss (--e2e-steps)."""
    with user_errors():
        from metapeft.adapters import DEFAULT_METHOD, get_adapter_class
        from metapeft.generate import E2E, train_generator
        from metapeft.models import load_base_model

        e2e = E2E(steps=e2e_steps, inner_steps=inner_steps, second_order=second_order,
                  algorithm=e2e_algorithm,
                  lr=e2e_lr, meta_batch=meta_batch, data=None if data is None else str(data),
                  domains=csv_list(domains), exclude_domains=csv_list(exclude_domains),
                  ways=ways, shots=shots, query=query, val_episodes=val_episodes)
        e2e.validate()  # before the model loads
        base = load_base_model(model_options["model"], dequantize=model_options["dequantize"])
        adapter = get_adapter_class(DEFAULT_METHOD).attach(base, parse_sets(set_, config) or {})
        console = err_console if as_json else out_console
        recon = (0 if anchor else 400) if epochs is None else max(epochs, 0)
        with LazyBar(recon + e2e_steps, "generator", console) as bar:
            def on_step(phase, step, loss, acc):
                done = step + (recon if phase == "e2e" else 0)
                if done % 10 == 0 or done == recon + e2e_steps or phase == "e2e":
                    bar.update(completed=done, loss=f"{loss:.4g}",
                               acc="-" if acc is None else f"{acc:.1%}",
                               description=f"generator: {phase}")

            res = train_generator(adapter, registry=registry, epochs=epochs, seed=seed,
                                  e2e=e2e, anchor=anchor, on_step=on_step)
        if as_json:
            print_json(res)
        else:
            stage2 = res["training"]["e2e"]
            tail = "" if stage2 is None else (
                f"; end to end {stage2['steps']} steps ({stage2['tasks']} episodes, "
                f"{stage2['inner_steps']} inner steps, order {stage2['order']}): query loss "
                f"{stage2['query_loss_first']:.4g} -> {stage2['query_loss_last']:.4g}"
                + ("" if stage2["validation"] is None else
                   f", on {stage2['validation']['episodes']} held-out episodes "
                   f"{stage2['validation']['query_loss_before']:.4g} -> "
                   f"{stage2['validation']['query_loss_after']:.4g}"))
            head = (f"anchored at {res['anchor']}" if res.get("anchor") else
                    f"reconstruction loss {res['final_loss']:.4g}")
            out_console.print(f"generator v{res['version']} on {len(res['entries'])} library "
                              f"LoRAs: {head}{tail}, "
                              f"{res['seconds']:.1f} s -> {res['path']}", highlight=False)


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The adapter library: past adapters to start new tasks from.",
                        no_args_is_help=True)
    group.command("add")(with_model_options(library_add))
    group.command("list")(library_list)
    group.command("remove")(library_remove)
    group.command("build")(with_model_options(library_build))
    group.command("calibrate")(with_model_options(library_calibrate))
    group.command("train-generator")(with_model_options(library_train_generator))
    app.add_typer(group, name="library")

"""``metapeft adapt`` and ``metapeft export``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from metapeft.adapters import AUTO_METHOD, DEFAULT_METHOD
from metapeft.cli._common import (CONFIG_OPT, JSON_OPT, METHOD_HELP, SET_OPT, TASK_ARG, LazyBar,
                                  err_console, out_console, parse_sets, print_json, user_errors,
                                  with_model_options, with_task_options)
from metapeft.switching import SWITCH_MODES

# --switch's choices (typer shows an Enum as choices)
Switch = Enum("Switch", {mode: mode for mode in SWITCH_MODES}, type=str)

ADAPT_METHOD_OPT = typer.Option(DEFAULT_METHOD, "--method", help=f"{METHOD_HELP}; or "
                                f"{AUTO_METHOD}: profile the task, rank the methods (`select`) "
                                "and run the top one with its recommended settings, from the "
                                "init source that wins on similar tasks (fresh, meta-weights, "
                                "library compose/generate, arrow routing).")


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0%}"


def print_decision(d: dict, console) -> None:
    """What ``--method auto`` chose, in a few lines (before training starts)."""
    alts = ", ".join(f"{a['method']} {_pct(a['confidence'])}" for a in d["alternatives"][:3])
    predicted = ("" if d["predicted_accuracy"] is None
                 else f", predicted accuracy {_pct(d['predicted_accuracy'])}")
    console.print(f"auto: [bold]{d['method']}[/bold] (confidence {_pct(d['confidence'])}"
                  f"{predicted}, from {d['source']})" + (f"; next: {alts}" if alts else ""),
                  highlight=False)
    hp = d["hyperparameters"]
    shown = ", ".join(f"{k} {hp[k]:g}" if isinstance(hp[k], float) else f"{k} {hp[k]}"
                      for k in ("lr", "steps") if k in hp)
    console.print(f"  settings: {shown} ({d['hyperparameters_from']})", highlight=False)
    init = d["init"] or ("--route arrow" if d.get("init_source") == "route" else "fresh")
    console.print(f"  init: {init} ({d['init_reason']})", highlight=False)
    console.print(f"  reason: {d['reason']}", highlight=False)


def _print_report(report, out: Path | None) -> None:
    from rich.table import Table

    accs = report.accuracies
    marks = sorted({0, 1, 5, 10, 20, 50, len(accs) - 1} & set(range(len(accs))))
    if marks:
        switches = [r for r in report.extra.get("switches") or [] if r.get("to")]
        stages = " -> ".join([report.method] + [r["to"] for r in switches])
        t = Table(title=f"{stages}: query accuracy ({report.num_support} support, "
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
    budget = report.extra.get("budget")
    if budget is not None:
        after = budget["stopped_after_step"]
        out_console.print(f"budget {budget['seconds']:g} s: {budget['used']:.1f} s used"
                          + ("" if after is None else
                             f"; training stopped after step {after} of {budget['steps']}")
                          + ("; exceeded" if budget["exceeded"] else ""), highlight=False)
    step_size = report.extra.get("step_size") or {}
    if step_size.get("horizon"):  # the init's calibration chose a step size for runs this long
        decay = step_size.get("lr_decay")
        out_console.print(f"step size: lr {step_size['lr']:g}" + (f", decay {decay:g}" if decay
                                                                  else "")
                          + f" (the init's calibrated choice for {step_size['horizon']}-step "
                          "runs)", highlight=False)
    _print_library(report.extra)
    if out is not None:
        out_console.print(f"adapter written to [bold]{out}[/bold]")


def _print_library(extra: dict) -> None:
    """What the adapter library contributed: the composition, the routing, the kept entry;
    and which init source ``--init auto`` chose."""
    choice = extra.get("init_choice")
    if choice and not extra.get("decision"):  # --method auto printed it with its decision
        out_console.print(f"init auto: {choice['chosen']} ({choice['reason']})",
                          highlight=False)
    c, r, kept = extra.get("composition"), extra.get("route"), extra.get("library")
    g = extra.get("generation")
    if g:
        size = g.get("step_size")
        anchor = "" if not g.get("anchor") else (
            f", a residual on {g['anchor']}" + ("" if not size else
                                                f" at its lr {size['lr']:g}"
                                                + (f" (decay {size['lr_decay']:g})"
                                                   if size["lr_decay"] else "")))
        out_console.print(f"generated init: generator v{g['version']} trained on "
                          f"{g['entries']} library LoRAs{anchor}", highlight=False)
    if c:
        mix = ", ".join(f"{m['id']} {m['weight']:+.2f}" for m in c["members"]
                        if not m.get("trained"))
        if c.get("kind") == "merge":  # the members are frozen; INIT (or fresh LoRA) trains
            trained = [m["id"] for m in c["members"] if m.get("trained")]
            trained = trained[0] if trained else "a fresh LoRA"
            mix = (f"nothing merged (bound 0, {c['bound_source']}), {trained} trained alone"
                   if c["bound"] == 0 else
                   f"{mix} merged into the frozen model (|w| <= {c['bound']:g}, "
                   f"{c['bound_source']}), {trained} trained on top")
        out_console.print(f"composed init: {mix} (support loss {c['support_loss']:.3f}; "
                          f"{c['trials']} trials, {c['search_seconds']:.1f} s)", highlight=False)
        size = c.get("step_size")
        if size:
            out_console.print(f"step size: lr {size['lr']:g}"
                              + (f", decay {size['lr_decay']:g}" if size["lr_decay"] else "")
                              + (f" (x{size['lr_factor']:g} INIT's, calibrated with the "
                                 "bound)" if "lr_factor" in size else
                                 f" (library calibration on {size['tasks']} tasks)"),
                              highlight=False)
    if r:
        acc = r["routed_accuracy"]
        out_console.print(f"arrow routing over {len(r['experts'])} library LoRAs (top "
                          f"{r['top_k']}): step-0 accuracy {'-' if acc is None else f'{acc:.1%}'}"
                          f"; trained from {r['init']}", highlight=False)
    if kept:
        e = kept["entry"]
        out_console.print(f"kept in the library as {e['id']}" + ("" if kept["added"] else
                          " (already there)") + "".join(f"; evicted {v['id']} ({v['reason']})"
                                                        for v in kept["evicted"]),
                          highlight=False)


@with_model_options
@with_task_options
def adapt(
    task: Path = TASK_ARG,
    method: str = ADAPT_METHOD_OPT,
    steps: int = typer.Option(20, help="Optimizer steps on the support set."),
    target: float = typer.Option(0.8, help="Query accuracy that counts as reached."),
    stop_at_target: bool = typer.Option(False, "--stop-at-target", help="End the run at the "
                                        "first step whose query accuracy reaches --target."),
    init: Optional[str] = typer.Option(None, help="Initial adapter: a safetensors file, an "
                                                  "adapter dir, registry NAME[@VERSION], or "
                                                  "library:compose[:K][+INIT] (a weighted mix "
                                                  "of the K nearest library LoRAs), "
                                                  "library:merge[:K][+INIT] (their updates "
                                                  "merged into the frozen model, INIT "
                                                  "trained on top) or "
                                                  "library:generate; or auto: the init "
                                                  "source that wins on similar tasks "
                                                  "(`select` ranks them)."),
    merge_bound: Optional[float] = typer.Option(None, "--merge-bound", min=0.0, help="With "
                                                "--init library:merge: bound each member's "
                                                "weight to [-B, B] (default: the bound "
                                                "`library calibrate` kept, else 1.5; 0: INIT "
                                                "alone)."),
    merge_lr_factor: Optional[float] = typer.Option(None, "--merge-lr-factor", help="With "
                                                    "--init library:merge: train the merged "
                                                    "start at F x INIT's lr (default: the "
                                                    "factor `library calibrate` kept with the "
                                                    "bound, else 1)."),
    route: Optional[str] = typer.Option(None, "--route", help="arrow: route each token over "
                                        "the library's LoRAs (training-free step 0), then "
                                        "train their merged mixture."),
    keep: bool = typer.Option(False, "--keep", help="Add the trained adapter to the adapter "
                              "library (`metapeft library list`)."),
    max_size: Optional[int] = typer.Option(None, "--max-size", help="With --keep: keep at most "
                                           "N library entries (evict near-duplicates)."),
    out: Optional[Path] = typer.Option(None, help="Write adapters.safetensors and "
                                                  "adapter_config.json here."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: per method)."),
    lr_decay: Optional[float] = typer.Option(None, "--lr-decay", min=0.0, help="Inverse-time "
                                             "decay: step t runs at lr / (1 + d(t-1)) (default: "
                                             "the init's calibrated one, else 0)."),
    optimizer: str = typer.Option("adam", help="adam, adamw or sgd."),
    loss: str = typer.Option("ce", help="Training loss: ce (cross-entropy over the candidates' "
                                        "scores), nll, ce_mean or ce_nll."),
    batch_size: int = typer.Option(64, help="Support examples per step."),
    budget_seconds: Optional[float] = typer.Option(None, "--budget-seconds", help="Limit the "
                                                   "whole run (profiling included): no step "
                                                   "starts that would end past it."),
    switch: Switch = typer.Option(Switch.off, "--switch", help="auto: when query accuracy "
                                  "gains no more than --switch-tolerance over --switch-window "
                                  "steps, freeze the adapter and train the selector's next "
                                  "method on top of it for the remaining steps (one switch)."),
    switch_window: int = typer.Option(3, "--switch-window", help="Steps without gain that "
                                      "count as a plateau."),
    switch_tolerance: float = typer.Option(0.01, "--switch-tolerance", help="Gain in query "
                                           "accuracy (0-1) that counts as progress."),
    seed: int = typer.Option(0, help="Seed for the episode, the init and the batch order."),
    inner_lr_scales: bool = typer.Option(True, help="Apply the per-layer lr multipliers stored "
                                         "with --init (meta-train --inner-lr-mode per-layer)."),
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
        console = err_console if as_json else out_console
        # a training-free method runs no optimizer step: no progress bar
        free = [method in METHODS and get_adapter_class(method).training_free]
        report_method = [method]
        with LazyBar(steps, f"adapt {method}", console) as bar:
            def on_step(i, loss_, acc):
                bar.update(completed=i, loss=f"{loss_:.3f}",
                           acc="-" if acc is None else f"{acc:.1%}")

            def on_decision(d):
                print_decision(d, console)
                free[0] = get_adapter_class(d["method"]).training_free
                report_method[0] = d["method"]
                bar.total, bar.description = d["hyperparameters"]["steps"], f"adapt {d['method']}"

            def on_switch(r):
                if r["to"] is None:
                    line = (f"plateau at step {r['step']} ({r['reason']}); no method to switch "
                            f"to, {report_method[0]} goes on")
                else:
                    line = (f"switch at step {r['step']}: {r['from']} -> {r['to']} "
                            f"({r['reason']}); accuracy {r['accuracy_before']:.1%} -> "
                            f"{r['accuracy_after']:.1%} at the switch")
                passed = "; ".join(f"{p['method']}: {p['reason']}" for p in r["passed_over"])
                bar.console.print(line + (f"; passed over {passed}" if passed else ""),
                                  highlight=False)
                bar.update(description=f"adapt {r['to'] or report_method[0]}")

            def on_start():
                if not free[0]:
                    bar.start()

            report = api.adapt(task, **model_options, method=method, steps=steps, target=target, init=init, out=out, config=options,
                               lr=lr, lr_decay=lr_decay, optimizer=optimizer,
                               batch_size=batch_size, objective=loss,
                               seed=seed, **task_options,
                               on_start=on_start, on_step=on_step, on_decision=on_decision,
                               record_experience=True, stop_at_target=stop_at_target,
                               budget_seconds=budget_seconds, switch=switch.value, route=route,
                               keep=keep, max_size=max_size,
                               switch_window=switch_window, switch_tolerance=switch_tolerance,
                               on_switch=on_switch, inner_lr_scales=inner_lr_scales,
                               merge_bound=merge_bound, merge_lr_factor=merge_lr_factor)
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

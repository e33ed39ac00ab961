"""``metapeft weights list | show | compare | rollback | delete``: the meta-weights registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from metapeft.cli._common import (REGISTRY_OPT, LazyBar, compact_table, csv_list,
                                  decay_note, err_console, out_console, print_json, short_time,
                                  user_errors,
                                  with_model_options)
from metapeft.config import GATE

JSON_LIST_OPT = typer.Option(False, "--json", help="Print JSON.")


def _print_object(obj, as_json: bool) -> None:
    if as_json:
        print_json(obj)
    else:
        out_console.print_json(json.dumps(obj, default=str))


def weights_list(registry: Optional[Path] = REGISTRY_OPT, as_json: bool = JSON_LIST_OPT):
    """List every name and version (* marks the one NAME resolves to)."""
    with user_errors():
        from metapeft import api

        rows = api.list_weights(registry)
        if as_json:
            print_json(rows)
            return
        t = compact_table(f"meta-weights in {api.registry_root(registry)}",
                          [("version", "left", True), ("", "left", True), "method",
                           "base model", ("created (UTC)", "left", True),
                           ("tasks", "right"), ("val acc", "right")])
        for r in rows:
            val = r.get("val_accuracy")
            t.add_row(f"{r['name']}@{r['version']}", "*" if r.get("latest") else "",
                      f"{r.get('method')}/{r.get('algorithm')}",
                      Path(str(r.get("base_model") or "-")).name, short_time(r.get("created")),
                      str(r.get("num_tasks") or "-"),
                      "-" if not isinstance(val, (int, float)) else f"{val:.1%}")
        out_console.print(t if rows else "no meta-weights yet (metapeft meta-train --name NAME)")


FULL_OPT = typer.Option(False, "--full", help="Print every metadata field and tensor.")


def _short(value, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[:width - 1] + "…"


def _continual_lines(m: dict) -> list[str]:
    """meta-train --init: the parent, how forgetting was controlled, forgetting and gain."""
    if not m.get("parent"):
        return []
    c = m.get("continual") if isinstance(m.get("continual"), dict) else {}
    how = c.get("forgetting", "-")
    if c.get("ewc_lambda") is not None:
        how += f", EWC λ={c['ewc_lambda']:g} (Fisher {c.get('fisher')})"
    if c.get("replay_fraction") is not None:
        how += f", replay {c['replay_fraction']:g} of each meta-batch"
    lines = [f"  parent      {m['parent']} (forgetting control: {how})"]

    def pct(v, sign=""):
        return "-" if v is None else f"{v:{sign}.1%}"

    f, g = m.get("forgetting"), m.get("gain")
    if isinstance(f, dict):
        lines.append(f"  forgetting  {pct(f.get('drop'), '+')} on the parent's validation tasks "
                     f"({f['tasks']} tasks, step {f['steps']}: parent {pct(f.get('accuracy_parent'))}"
                     f", this {pct(f.get('accuracy_new'))})")
    else:
        lines.append("  forgetting  not measured (the parent's validation tasks are not "
                     "reachable)")
    if isinstance(g, dict):
        lines.append(f"  gain        {pct(g.get('gain'), '+')} on the new data's validation tasks "
                     f"({g['tasks']} tasks, step {g['steps']}: parent {pct(g.get('accuracy_parent'))}"
                     f", this {pct(g.get('accuracy_new'))})")
    else:
        lines.append("  gain        not measured (no validation split in the new data)")
    for note in c.get("notes") or []:
        lines.append(f"  note        {note}")
    return lines


def _print_show_summary(d: dict) -> None:
    m = d["metadata"]
    val = m.get("val_accuracy") or []
    lines = [f"[bold]{d['name']}@{d['version']}[/bold]" + (" (latest)" if d["latest"] else ""),
             f"  file        {d['path']} ({d['size_bytes'] / 2**20:.1f} MB)",
             f"  method      {m.get('method')}/{m.get('algorithm')} on {m.get('base_model')}",
             f"  created     {short_time(m.get('created'))} UTC, "
             f"{m.get('duration_seconds', '-')} s, {m.get('num_tasks', '-')} tasks",
             f"  validation  best {max(val):.1%} at step {m.get('best_step')}" if val else
             "  validation  none (no held-out classes, or --eval-every 0)",
             f"  parameters  {d['num_parameters']:,} in {d['num_tensors']} tensors"]
    cal = m.get("adapt_lr_calibration")
    if isinstance(cal, dict):  # the test-time lr chosen on the validation tasks (meta.stepsize)
        from metapeft.meta.stepsize import candidate_key, describe_lead, split_candidate_key

        chosen = candidate_key(float(cal["factor"]), float(cal.get("adapt_lr_decay") or 0.0))
        lines.append(f"  adapt lr    {cal['adapt_lr']:g} (x{cal['factor']} of {cal['base_lr']:g}"
                     f"{decay_note(cal)}); mean val accuracy at steps "
                     f"{'/'.join(str(k) for k in cal['marks'])}:")
        # one line per decay (constant first): with decays one line ran to 200+ columns
        by_decay: dict[str, list[str]] = {}
        for k, r in cal.get("table", {}).items():
            factor, decay = split_candidate_key(k)
            by_decay.setdefault(decay, []).append(
                f"x{factor} " + (f"{r['mean']:.1%}" if r.get("mean") is not None else "diverged")
                + (" (chosen)" if k == chosen else ""))
        lines.extend(f"    {'constant lr' if not d else f'decay {d}':<12} {', '.join(cells)}"
                     for d, cells in by_decay.items())
        lead = describe_lead(cal)  # older files have no margin
        if lead is not None:
            lines.append(f"    {'lead':<12} {lead}")
        for h, c in sorted((cal.get("horizons") or {}).items(), key=lambda hc: int(hc[0])):
            # a run of up to h steps takes this one (adapt --steps; stepsize.schedule_for_steps)
            lead = describe_lead({**c, "num_tasks": cal.get("num_tasks")})
            decay = c.get("adapt_lr_decay")
            lines.append(f"    {f'{h}-step run':<12} x{c['factor']}"
                         + (f" decay {decay:g}" if decay else "") + f" ({c['adapt_lr']:g}): "
                         f"best val accuracy at step {h}")
            if lead is not None:
                lines.append(f"    {'':<12} {lead}")
    scales = m.get("inner_lr_scales")
    if isinstance(scales, dict) and scales:  # meta-train --inner-lr-mode per-layer
        lines.append("  inner lrs   per layer, multiplier min / median / max by module:")
        lines.extend(f"    {kind:<38} {r['min']:.3g} / {r['median']:.3g} / {r['max']:.3g} "
                     f"({r['leaves']} leaves)" for kind, r in scales.items())
    gate = m.get("gate")
    if isinstance(gate, dict):  # meta-train --gate: the drift check it passed
        if gate.get("against") is None:
            lines.append("  gate        passed: first version, nothing to check against")
        else:
            delta = (gate.get("delta") or {}).get("mean")
            drift = gate.get("drift")
            lines.append(f"  gate        passed against {gate['against']}: delta "
                         f"{'-' if delta is None else f'{delta:+.1%}'}, drift "
                         f"{'-' if drift is None else f'{drift:.3f}'}")
    start = m.get("start")
    if isinstance(start, dict) and "pretrain_steps" in start:  # meta-train --pretrain-steps
        took = "" if start.get("seconds") is None else f", {start['seconds']:.0f} s"  # resumed
        lines.append(f"  start       after {start['pretrain_steps']} multitask pretraining steps "
                     f"(lr {start['lr']:g}{took})")
    elif isinstance(start, dict):  # meta-train --start-from
        lines.append(f"  start       from {start['from']}")
    lines.extend(_continual_lines(m))
    hyper = m.get("hyperparameters")
    if isinstance(hyper, dict):
        lines.append("  settings    " + _short(", ".join(f"{k}={v}" for k, v in hyper.items()),
                                               200))
    lines.append("[dim](--full: every metadata field and tensor; --json: all of it as JSON)"
                 "[/dim]")
    for line in lines:
        out_console.print(line, highlight=False)


def weights_show(spec: str = typer.Argument(..., help="NAME or NAME@VERSION."),
                 registry: Optional[Path] = REGISTRY_OPT, full: bool = FULL_OPT,
                 as_json: bool = JSON_LIST_OPT):
    """Show one version: a summary, or every field with --full."""
    with user_errors():
        from metapeft import api

        d = api.show_weights(spec, registry)
        if as_json or full:
            _print_object(d, as_json)
        else:
            _print_show_summary(d)


def _print_compare_summary(d: dict) -> None:
    out_console.print(f"a = {d['a']['name']}@{d['a']['version']}   "
                      f"b = {d['b']['name']}@{d['b']['version']}", highlight=False)
    if d["compatible"]:
        worst = d.get("max_abs_diff") or {}
        cos = d.get("cosine_similarity")
        out_console.print(
            f"parameters: {d['num_parameters']:,}, same shapes; L2 distance "
            f"{d['l2_distance']:.4g}, cosine {'-' if cos is None else f'{cos:.4f}'}; largest "
            f"difference {worst.get('max', 0):.3g} ({worst.get('tensor', '-')}), "
            f"{worst.get('identical_tensors', 0)} of {len(d['per_tensor_max_abs_diff'])} "
            "tensors identical", highlight=False)
    else:
        out_console.print(f"not comparable: {len(d['only_in_a'])} tensors only in a, "
                          f"{len(d['only_in_b'])} only in b, {len(d['shape_mismatch'])} with "
                          "different shapes", highlight=False)
    diff = []  # (key, a, b), one level into mappings (hyperparameters, data, config)
    for k, v in d["metadata_diff"].items():
        va, vb = v["a"], v["b"]
        if isinstance(va, dict) and isinstance(vb, dict):
            diff += [(f"{k}.{sub}", va.get(sub), vb.get(sub)) for sub in sorted(set(va) | set(vb))
                     if va.get(sub) != vb.get(sub)]
        else:
            diff.append((k, va, vb))
    out_console.print(f"metadata differences: {len(diff) or 'none'}", highlight=False)
    for k, va, vb in diff[:12]:
        out_console.print(f"  {k}: {_short(va, 30)} -> {_short(vb, 30)}", highlight=False)
    if len(diff) > 12:
        out_console.print(f"  … and {len(diff) - 12} more", highlight=False)
    out_console.print("[dim](--full: every field and tensor; --json: all of it as JSON)[/dim]")


def weights_compare(a: str = typer.Argument(..., help="NAME[@VERSION]."),
                    b: str = typer.Argument(..., help="NAME[@VERSION]."),
                    registry: Optional[Path] = REGISTRY_OPT, full: bool = FULL_OPT,
                    as_json: bool = JSON_LIST_OPT):
    """Compare two versions: a summary of the parameter distance and metadata differences,
    or every field with --full."""
    with user_errors():
        from metapeft import api

        d = api.compare_weights(a, b, registry)
        if as_json or full:
            _print_object(d, as_json)
        else:
            _print_compare_summary(d)


def weights_rollback(name: str = typer.Argument(..., help="A meta-weights NAME."),
                     version: str = typer.Argument(..., help="The version to make latest "
                                                             "(3 or v3)."),
                     registry: Optional[Path] = REGISTRY_OPT):
    """Make an earlier version the latest (nothing is deleted)."""
    with user_errors():
        from metapeft import api

        out_console.print(f"{name}: latest is now v{api.rollback_weights(name, version, registry)}")


def weights_delete(spec: str = typer.Argument(..., help="NAME@VERSION, or NAME for every "
                                                         "version."),
                   registry: Optional[Path] = REGISTRY_OPT,
                   yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for "
                                                                       "confirmation.")):
    """Delete NAME@VERSION, or every version of NAME (asks first unless --yes). Version numbers
    are never reused."""
    with user_errors():
        import sys

        from metapeft import api
        from metapeft.errors import UserError

        plan = api.delete_weights_plan(spec, registry)
        name, after = plan["name"], plan["latest_after"]
        what = ", ".join(f"{name}@{v}" for v in plan["deleted"])
        then = ("no version of it will be left" if after is None else
                f"latest stays v{after}" if after == plan["latest"] else
                f"latest becomes v{after} (was v{plan['latest']})")
        if not yes:
            if not sys.stdin.isatty():
                raise UserError(f"would delete {what} ({then}); pass --yes to confirm when "
                                "not at a terminal", field="yes")
            if not typer.confirm(f"delete {what}? {then}", default=False):
                out_console.print("nothing deleted")
                raise typer.Exit(1)
        done = api.delete_weights(spec, registry)
        left = ("no versions left" if done["latest"] is None
                else f"latest is v{done['latest']}")
        out_console.print(f"deleted {', '.join(f'{name}@{v}' for v in done['deleted'])}; "
                          f"{name}: {left}", highlight=False)


def _pm(d: dict, pct: bool = True) -> str:
    """``mean ± ci`` of a ``metrics.mean_ci`` dict (points when ``pct``)."""
    if d.get("mean") is None:
        return "-"
    if pct:
        return f"{d['mean']:.1%}" + ("" if d.get("ci") is None else f" ± {d['ci']:.1%}")
    return f"{d['mean']:.3f}" + ("" if d.get("ci") is None else f" ± {d['ci']:.3f}")


def print_check(d: dict, console=out_console) -> None:
    """A drift report (``drift.DriftReport.to_json()``) in a few lines."""
    new, old = d["new"], d["old"]
    console.print(f"{new['spec']} against {old['spec']}: {d['num_tasks']} probe tasks"
                  f"{' from ' + d['data'] if d.get('data') else ''}, {d['steps']} steps each "
                  f"(lr {new['lr']:g} from {new['lr_from']} / {old['lr']:g} from "
                  f"{old['lr_from']})", highlight=False)
    delta = d["delta"]
    shown = "-" if delta["mean"] is None else f"{delta['mean']:+.1%}"
    if delta.get("low") is not None:
        shown += f" [{delta['low']:+.1%}, {delta['high']:+.1%}]"
    console.print(f"  accuracy   new {_pm(d['accuracy_new'])}   old {_pm(d['accuracy_old'])}   "
                  f"delta {shown} (tolerance {d['tolerance']:.1%})", highlight=False)
    drift = d["drift"]
    agree = d["agreement"]
    console.print(f"  drift      {'-' if drift is None else f'{drift:.3f}'} mean KL(old || new) "
                  f"over {d['num_queries']} probe queries (max {d['max_drift']:g}); same label "
                  f"on {'-' if agree is None else f'{agree:.1%}'}", highlight=False)
    for key in ("new", "old"):
        if d["diverged"][key]:
            console.print(f"  {key} diverged on probe tasks {d['diverged'][key]}",
                          highlight=False)
    if d["passed"]:
        console.print("[green]passed[/green]")
        return
    console.print(f"[red]failed[/red]: {'; '.join(d['reasons'])}", highlight=False)
    if d.get("rollback"):
        console.print(f"roll back with: {d['rollback']}", highlight=False)


@with_model_options
def weights_check(
    new: str = typer.Argument(..., help="The new version, NAME[@VERSION]."),
    against: str = typer.Option(..., "--against", help="The version it would replace, "
                                                       "NAME[@VERSION]."),
    data: str = typer.Option(..., "--data", help="Where the probe tasks come from: a pool "
                                                 "JSONL/CSV, a task directory or 'synthetic'."),
    domains: Optional[list[str]] = typer.Option(None, help="Probe only these domains (comma "
                                                           "list or repeated)."),
    tasks: int = typer.Option(GATE["tasks"],
                              help="Probe tasks (seeded episodes: the same every time)."),
    steps: int = typer.Option(GATE["steps"], help="Adaptation steps per version and task."),
    ways: int = typer.Option(5, help="Classes per probe task."),
    shots: int = typer.Option(5, help="Support examples per class."),
    query: int = typer.Option(5, help="Query examples per class."),
    tolerance: float = typer.Option(GATE["tolerance"], help="Largest accepted drop in mean "
                                    "accuracy (absolute: 0.02 = 2 points)."),
    max_drift: float = typer.Option(GATE["max_drift"], help="Largest accepted mean KL(old || "
                                    "new) of the predictive distributions."),
    seed: int = typer.Option(0, help="Seed of the probe tasks and the runs."),
    registry: Optional[Path] = REGISTRY_OPT,
    as_json: bool = JSON_LIST_OPT,
    model_options: dict = None,
):
    """Drift gate: adapt NEW and --against on the same probe tasks; exit 3 (and print the
    rollback command) when accuracy drops by more than --tolerance or drift exceeds
    --max-drift."""
    with user_errors():
        from metapeft import api
        from metapeft.drift import GATE_FAILED

        console = err_console if as_json else out_console
        with LazyBar(tasks, f"check {new}", console) as bar:
            res = api.check_weights(new, against, data, **model_options, registry=registry,
                                    tasks=tasks, steps=steps, ways=ways, shots=shots,
                                    query=query, seed=seed, tolerance=tolerance,
                                    max_drift=max_drift, domains=csv_list(domains),
                                    on_start=bar.start,
                                    on_task=lambda i, row: bar.update(completed=i + 1))
        d = res.to_json()
        if as_json:
            print_json(d)
        else:
            print_check(d)
        if not res.passed:
            raise typer.Exit(GATE_FAILED)


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Manage meta-weights in the local registry.", no_args_is_help=True)
    for name, fn in (("list", weights_list), ("show", weights_show),
                     ("compare", weights_compare), ("rollback", weights_rollback),
                     ("delete", weights_delete), ("check", weights_check)):
        group.command(name)(fn)
    app.add_typer(group, name="weights")

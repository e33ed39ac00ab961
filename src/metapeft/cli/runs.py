"""``metapeft runs list | show``: the run records every command that trains or evaluates leaves
under the registry root (``metapeft.runs``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from metapeft.cli._common import (REGISTRY_OPT, compact_table, out_console, print_json,
                                  short_time, user_errors)

JSON_FLAG = typer.Option(False, "--json", help="Print JSON.")


def _summary(rec: dict) -> str:
    """A few words on what the run produced: the last call's headline numbers."""
    calls = rec.get("calls") or []
    if not calls:
        return ""
    last = calls[-1]
    res, curves = last.get("result") or {}, last.get("curves") or {}
    bits = []
    if res.get("name") is not None and res.get("version") is not None:
        bits.append(f"{res['name']}@{res['version']}")
    for key in ("final_accuracy", "accuracy"):
        if isinstance(res.get(key), (int, float)):
            bits.append(f"acc {res[key]:.1%}")
            break
    else:
        val = curves.get("val_accuracy")
        if val and isinstance(val[-1], (int, float)):
            bits.append(f"val {max(v for v in val if v is not None):.1%}")
    if "passed" in res:
        bits.append("passed" if res["passed"] else "gate failed")
    if isinstance(res.get("drift"), (int, float)):
        bits.append(f"drift {res['drift']:.3f}")
    return ", ".join(bits)


def runs_list(registry: Optional[Path] = REGISTRY_OPT,
              command: Optional[str] = typer.Option(None, help="Only this command's runs "
                                                               "(e.g. adapt, 'weights check')."),
              limit: int = typer.Option(50, help="The last N runs (0: all)."),
              as_json: bool = JSON_FLAG):
    """List the recorded runs, oldest first."""
    with user_errors():
        from metapeft.errors import UserError
        from metapeft.runs import list_runs, runs_dir

        if limit < 0:
            raise UserError(f"--limit must be >= 0, got {limit}", field="limit")
        rows = list_runs(registry, command=command, limit=limit or None)
        if as_json:
            print_json([{k: r.get(k) for k in ("id", "command", "argv", "status", "exit_status",
                                                "error", "started", "duration_seconds")}
                        for r in rows])
            return
        if not rows:
            out_console.print(f"no runs recorded in {runs_dir(registry)}", highlight=False)
            return
        t = compact_table(f"runs in {runs_dir(registry)}",
                          [("id", "left", True), "command", "status",
                           ("started (UTC)", "left", True), ("s", "right"), "outcome"])
        for r in rows:
            code = r.get("exit_status")
            status = r.get("status") or "-"
            if code not in (None, 0):
                status += f" ({code})"
            dur = r.get("duration_seconds")
            outcome = r.get("error") or _summary(r)
            t.add_row(r.get("id", "?"), str(r.get("command")), status,
                      short_time(r.get("started")),
                      "-" if not isinstance(dur, (int, float)) else f"{dur:.1f}",
                      outcome if len(outcome) <= 70 else outcome[:69] + "…")
        out_console.print(t)


def runs_show(run_id: str = typer.Argument(..., metavar="ID", help="A run id, or a unique "
                                                                     "prefix of one."),
              registry: Optional[Path] = REGISTRY_OPT, as_json: bool = JSON_FLAG):
    """Show one run record: its command line, versions, outcome, duration and curves."""
    with user_errors():
        from metapeft.runs import get_run

        rec = get_run(run_id, registry)
        if as_json:
            print_json(rec)
            return
        lines = [f"[bold]{rec['id']}[/bold]  metapeft {' '.join(rec.get('argv') or [])}",
                 f"  status      {rec.get('status')} (exit {rec.get('exit_status')})",
                 f"  started     {short_time(rec.get('started'))} UTC, "
                 f"{rec.get('duration_seconds', '-')} s, pid {rec.get('pid')}, in "
                 f"{rec.get('cwd')}"]
        if rec.get("error"):
            lines.append(f"  error       {rec['error']}")
        v = rec.get("versions") or {}
        lines.append("  versions    " + ", ".join(f"{k} {val}" for k, val in v.items()))
        for c in rec.get("calls") or []:
            res = {k: val for k, val in (c.get("result") or {}).items() if val is not None}
            lines.append(f"  api.{c.get('call')}: " + json.dumps(res, default=str)[:300])
            for name, curve in (c.get("curves") or {}).items():
                shown = ", ".join("-" if x is None else f"{x:.4g}" for x in curve[:12])
                more = f", … ({len(curve)} values)" if len(curve) > 12 else ""
                lines.append(f"    {name}: {shown}{more}")
        if rec.get("calls_left_out"):
            lines.append(f"  … {rec['calls_left_out']} more api calls not kept")
        out_console.print(lines[0], highlight=False)
        for line in lines[1:]:  # the user's text (errors, paths): never rich markup
            out_console.print(line, highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The run records of the commands that train or evaluate.",
                        no_args_is_help=True)
    group.command("list")(runs_list)
    group.command("show")(runs_show)
    app.add_typer(group, name="runs")

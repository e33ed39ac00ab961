"""``metapeft schedule add | list | remove | run``: a metapeft command run every ``--every`` by
cron (Linux) or launchd (macOS), logged under the registry root, never two at once
(``metapeft.schedule``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from metapeft.cli._common import (REGISTRY_OPT, compact_table, out_console, print_json,
                                  short_time, user_errors)

JSON_FLAG = typer.Option(False, "--json", help="Print JSON.")
DRY_RUN = typer.Option(False, "--dry-run", help="Print what would be installed (or removed); "
                                               "change nothing.")


def schedule_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="A name for the schedule."),
    command: Optional[list[str]] = typer.Argument(None, metavar="-- COMMAND...",
                                                  help="The metapeft command to run, after "
                                                       "--, e.g. -- meta-train --data pool.jsonl "
                                                       "--name mine"),
    every: str = typer.Option(..., "--every", help="The interval: 30d, 12h, 2w or 90m."),
    backend: str = typer.Option("auto", help="cron, launchd, or auto (launchd on macOS, cron "
                                             "elsewhere)."),
    replace: bool = typer.Option(False, "--replace", help="Replace a schedule of that name."),
    dry_run: bool = DRY_RUN,
    registry: Optional[Path] = REGISTRY_OPT,
    as_json: bool = JSON_FLAG,
):
    """Run a metapeft command every --every: installs a crontab line (Linux) or a launchd agent
    (macOS). Each run appends to a log under the registry root and is skipped while the previous
    one is still going."""
    with user_errors():
        from metapeft import schedule

        known = set(getattr(ctx.find_root().command, "commands", {}) or {})
        if command and known and command[0] not in known:
            from metapeft.errors import UserError

            raise UserError(f"{command[0]!r} is not a metapeft command (one of "
                            f"{', '.join(sorted(known))})", field="command")
        res = schedule.add(name, every, list(command or []), registry=registry,
                           backend_choice=backend, dry_run=dry_run, replace=replace)
        if as_json:
            print_json(res)
            return
        spec = res["spec"]
        verb = "would install" if dry_run else "installed"
        out_console.print(f"{verb} in {res['where']} ({res['backend']}): every {spec['every']}, "
                          f"{schedule.describe(spec)}", highlight=False, markup=False)
        out_console.print(res["install"], highlight=False, markup=False, soft_wrap=True)
        out_console.print(f"log: {spec['log']}", highlight=False, markup=False)
        if dry_run:
            out_console.print("(dry run: nothing was changed)")


def schedule_list(registry: Optional[Path] = REGISTRY_OPT, as_json: bool = JSON_FLAG):
    """List the schedules: interval, command, whether installed, the last run."""
    with user_errors():
        from metapeft import schedule

        rows = schedule.list_schedules(registry)
        if as_json:
            print_json(rows)
            return
        if not rows:
            out_console.print(f"no schedules in {schedule.schedules_dir(registry)}",
                              highlight=False)
            return
        t = compact_table(f"schedules in {schedule.schedules_dir(registry)}",
                          ["name", "every", "command", "backend", "installed",
                           ("last run", "left", True), "exit"])
        for r in rows:
            last = r.get("last") or {}
            inst = {True: "yes", False: "no", None: "?"}[r.get("installed")]
            t.add_row(r["name"], r["every"], schedule.describe(r), r.get("backend", "-"), inst,
                      "running now" if r.get("running") else short_time(last.get("started")),
                      "-" if last.get("exit_status") is None else str(last["exit_status"]))
        out_console.print(t)


def schedule_remove(name: str = typer.Argument(..., help="The schedule's name."),
                    dry_run: bool = DRY_RUN, registry: Optional[Path] = REGISTRY_OPT):
    """Uninstall a schedule (its crontab line or launchd agent); its log is kept."""
    with user_errors():
        from metapeft import schedule

        res = schedule.remove(name, registry=registry, dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        for what in res["removed"]:
            out_console.print(f"{verb} {what}", highlight=False, markup=False)
        out_console.print(f"log kept: {res['log']}", highlight=False, markup=False)


def schedule_run(name: str = typer.Argument(..., help="The schedule's name."),
                 force: bool = typer.Option(False, "--force", help="Run now even if not due "
                                                                   "(never while a run is "
                                                                   "going)."),
                 registry: Optional[Path] = REGISTRY_OPT):
    """What the scheduler calls: run the command if due and no run is going, appending to the
    log; exits with the command's status (0 when skipped)."""
    with user_errors():
        from metapeft import schedule

        res = schedule.run(name, registry=registry, force=force)
        if not res["ran"]:
            return
        if res["exit_status"]:
            raise typer.Exit(res["exit_status"])


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Run a metapeft command on a schedule (cron or launchd).",
                        no_args_is_help=True)
    group.command("add")(schedule_add)
    group.command("list")(schedule_list)
    group.command("remove")(schedule_remove)
    group.command("run")(schedule_run)
    app.add_typer(group, name="schedule")

"""Scheduled runs: a metapeft command run again every ``--every`` (``30d``, ``12h``, ``2w``,
``90m``) by the system's own scheduler: a crontab line on Linux, a launchd agent on macOS.

Files, under the registry root (``registry.registry_root``)::

    <root>/schedules/NAME.json    the schedule: the command line, the interval, the directory
    <root>/schedules/NAME.log     what every run appended: a start line, the command's output,
                                  an end line with the exit status and the duration
    <root>/schedules/NAME.lock    held (flock) by the run in progress
    <root>/schedules/NAME.state.json   the last run's start, end and exit status

The scheduler calls ``metapeft schedule run NAME``, which

* takes ``NAME.lock`` without waiting: when the previous run still holds it, it appends a
  ``skipped`` line to the log and exits 0, so runs never overlap (the kernel releases the lock
  when its process ends, however it ends, so a killed run never blocks the next one);
* runs the command only when it is due: ``every`` has passed since the last start, less half
  the scheduler's own period (cron wakes it at a fixed minute, so a run that took a few seconds
  to start is not pushed back a whole period). launchd's ``StartInterval`` is the interval
  itself; cron has no "every 30 days", so the crontab line wakes it daily (hourly below a day,
  every few minutes below an hour) at the time the schedule was added, and the check decides;
* appends the command's output to ``NAME.log`` and records the outcome in ``NAME.state.json``.

The crontab is read and written with ``crontab -l`` / ``crontab -`` (``METAPEFT_CRONTAB``
names another program with that interface: the tests use a fake one); only lines tagged
``# metapeft-schedule NAME`` are ever touched. The launchd agent is
``~/Library/LaunchAgents/io.metapeft.schedule.NAME.plist``, loaded with ``launchctl``
(``METAPEFT_LAUNCHCTL`` to override). ``dry_run`` returns what would be installed and changes
nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import plistlib
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metapeft.artifacts import atomic_write_json, atomic_write_text, file_lock
from metapeft.errors import UserError
from metapeft.registry import registry_root, validate_name

EVERY_RE = re.compile(r"(\d+)\s*([mhdw])")
UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
TAG = "# metapeft-schedule"
LABEL = "io.metapeft.schedule"
BACKENDS = ("auto", "cron", "launchd")
# the environment a scheduled run keeps from the shell that added it (cron starts with almost none)
KEPT_ENV = ("METAPEFT_HOME", "METAPEFT_CACHE", "XDG_DATA_HOME", "METAPEFT_BLAS",
            "METAPEFT_MAX_MEMORY_GB", "METAPEFT_EXPERIENCE")


def parse_every(text: str) -> int:
    """``30d`` / ``12h`` / ``2w`` / ``90m`` -> seconds (at least 5 minutes)."""
    m = EVERY_RE.fullmatch(str(text).strip().lower())
    if not m or int(m.group(1)) < 1:
        raise UserError(f"--every expects a number and a unit (m, h, d, w), e.g. 30d or 12h; "
                        f"got {text!r}", field="every")
    seconds = int(m.group(1)) * UNIT_SECONDS[m.group(2)]
    if seconds < 300:
        raise UserError(f"--every {text}: the shortest interval is 5m", field="every")
    return seconds


def schedules_dir(registry: str | Path | None = None) -> Path:
    return registry_root(registry) / "schedules"


def check_name(name: str) -> str:
    return validate_name(name, "schedule name")


@dataclass
class Paths:
    spec: Path
    log: Path
    lock: Path
    state: Path


def paths(name: str, registry: str | Path | None = None) -> Paths:
    d = schedules_dir(registry)
    check_name(name)
    return Paths(spec=d / f"{name}.json", log=d / f"{name}.log", lock=d / f"{name}.lock",
                 state=d / f"{name}.state.json")


def backend(choice: str = "auto") -> str:
    if choice not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {choice!r}",
                        field="backend")
    if choice != "auto":
        return choice
    return "launchd" if sys.platform == "darwin" else "cron"


# ----------------------------------------------------------------------------- what to install

def cron_timing(every: int, at: _dt.datetime) -> tuple[str, int]:
    """(the five crontab time fields, the period in seconds at which cron wakes the run): daily
    at ``at``'s time for a day or more, hourly at its minute below a day, else every few minutes
    (a divisor of 60 no larger than the interval)."""
    if every >= 86400:
        return f"{at.minute} {at.hour} * * *", 86400
    if every >= 3600:
        return f"{at.minute} * * * *", 3600
    minutes = every // 60
    step = max(d for d in (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30) if d <= minutes)
    return f"*/{step} * * * *", step * 60


def run_argv(name: str, root: Path) -> list[str]:
    """The command the scheduler runs: this Python's ``metapeft schedule run NAME``."""
    return [sys.executable, "-m", "metapeft.cli", "schedule", "run", name, "--registry",
            str(root)]


def cron_line(spec: dict) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(spec.get("env", {}).items()))
    cmd = " ".join(shlex.quote(a) for a in run_argv(spec["name"], Path(spec["registry"])))
    log = shlex.quote(spec["log"])
    command = f"cd {shlex.quote(spec['cwd'])} && {env + ' ' if env else ''}{cmd} >> {log} 2>&1"
    # cron turns an unescaped % into a newline
    return f"{spec['cron']} {command.replace('%', chr(92) + '%')} {TAG} {spec['name']}"


def plist_path(name: str) -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.{name}.plist"


def plist_bytes(spec: dict) -> bytes:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **spec.get("env", {})}
    return plistlib.dumps({
        "Label": f"{LABEL}.{spec['name']}",
        "ProgramArguments": run_argv(spec["name"], Path(spec["registry"])),
        "WorkingDirectory": spec["cwd"], "StartInterval": int(spec["every_seconds"]),
        "RunAtLoad": False, "EnvironmentVariables": env,
        "StandardOutPath": spec["log"], "StandardErrorPath": spec["log"]})


# ----------------------------------------------------------------------------- crontab

def _crontab_cmd() -> list[str]:
    return shlex.split(os.environ.get("METAPEFT_CRONTAB", "crontab"))


def read_crontab() -> list[str]:
    """The user's crontab lines (empty when there is none)."""
    try:
        r = subprocess.run([*_crontab_cmd(), "-l"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError("crontab is not installed (the cron package); use --dry-run to see "
                        "the line to install by hand", field="backend") from None
    if r.returncode != 0:
        if "no crontab" in (r.stderr or "").lower():
            return []
        raise UserError(f"crontab -l failed: {' '.join((r.stderr or '').split())}",
                        field="backend")
    return r.stdout.splitlines()


def write_crontab(lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    r = subprocess.run([*_crontab_cmd(), "-"], input=text, capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        raise UserError(f"crontab - failed: {' '.join((r.stderr or '').split())}",
                        field="backend")


def _is_ours(line: str, name: str) -> bool:
    return line.rstrip().endswith(f"{TAG} {name}")


def _launchctl(*args: str) -> None:
    cmd = [*shlex.split(os.environ.get("METAPEFT_LAUNCHCTL", "launchctl")), *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError("launchctl not found: launchd agents need macOS", field="backend") \
            from None
    if r.returncode != 0 and args[0] == "load":
        raise UserError(f"launchctl {' '.join(args)} failed: "
                        f"{' '.join((r.stderr or r.stdout or '').split())}", field="backend")


# ----------------------------------------------------------------------------- add / list / remove

def add(name: str, every: str, command: list[str], *, registry: str | Path | None = None,
        cwd: str | Path | None = None, backend_choice: str = "auto", dry_run: bool = False,
        replace: bool = False) -> dict:
    """Schedule ``metapeft COMMAND...`` every ``every``. Returns ``{"name", "backend",
    "install": the crontab line or the plist text, "where": the crontab or the plist path,
    "spec": the schedule, "dry_run"}``; with ``dry_run`` nothing is written or installed."""
    check_name(name)
    seconds = parse_every(every)
    kind = backend(backend_choice)
    if not command:
        raise UserError("give the command to run after --, e.g. -- meta-train --data pool.jsonl "
                        "--name mine", field="command")
    if command[0] in ("schedule",) or command[0].startswith("-"):
        raise UserError(f"cannot schedule {' '.join(command[:2])!r}: give a metapeft command, "
                        "e.g. meta-train", field="command")
    root = registry_root(registry).expanduser().resolve()
    p = paths(name, root)
    if p.spec.exists() and not replace:
        raise UserError(f"schedule {name!r} exists ({p.spec}); remove it first (metapeft "
                        "schedule remove NAME) or pass --replace", field="name")
    now = _dt.datetime.now().astimezone()
    cron, period = cron_timing(seconds, now)
    spec = {"name": name, "every": every, "every_seconds": seconds, "command": list(command),
            "cwd": str(Path(cwd or os.getcwd()).resolve()), "registry": str(root),
            "log": str(p.log), "backend": kind, "cron": cron, "period_seconds":
            period if kind == "cron" else seconds,
            "env": {k: os.environ[k] for k in KEPT_ENV if os.environ.get(k)},
            "created": now.isoformat(timespec="seconds"), "python": sys.executable}
    if kind == "cron":
        install, where = cron_line(spec), "crontab"
    else:
        install, where = plist_bytes(spec).decode("utf-8"), str(plist_path(name))
    out = {"name": name, "backend": kind, "install": install, "where": where, "spec": spec,
           "dry_run": dry_run}
    if dry_run:
        return out
    if kind == "cron":
        lines = [ln for ln in read_crontab() if not _is_ours(ln, name)]
        write_crontab(lines + [install])
    else:
        plist = plist_path(name)
        if plist.exists():
            _launchctl("unload", str(plist))
        atomic_write_text(plist, install)
        _launchctl("load", "-w", str(plist))
    atomic_write_json(p.spec, spec)
    return out


def _state(p: Paths) -> dict:
    try:
        return json.loads(p.state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def installed(spec: dict, crontab: list[str] | None) -> bool | None:
    """Whether the schedule's crontab line / plist is in place (None: cannot tell)."""
    if spec.get("backend") == "launchd":
        return plist_path(spec["name"]).exists()
    if crontab is None:
        return None
    return any(_is_ours(ln, spec["name"]) for ln in crontab)


def list_schedules(registry: str | Path | None = None) -> list[dict]:
    """Every schedule under the registry root, with ``installed``, ``running`` (a run holds the
    lock now) and its last run (``last``: start, end, exit status)."""
    d = schedules_dir(registry)
    if not d.is_dir():
        return []
    crontab = None
    out = []
    for f in sorted(d.glob("*.json")):
        if f.name.endswith(".state.json"):
            continue
        try:
            spec = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if spec.get("backend") == "cron" and crontab is None:
            try:
                crontab = read_crontab()
            except UserError:
                crontab = None
        p = paths(spec["name"], registry)
        with file_lock(p.lock, blocking=False) as free:
            running = not free
        out.append({**spec, "installed": installed(spec, crontab), "running": running,
                    "last": _state(p)})
    return out


def remove(name: str, *, registry: str | Path | None = None, dry_run: bool = False) -> dict:
    """Uninstall schedule ``name`` (its crontab line or launchd agent) and delete its
    definition; the log stays. ``{"name", "removed": what was (or would be) removed}``."""
    p = paths(name, registry)
    if not p.spec.exists():
        names = [s["name"] for s in list_schedules(registry)]
        hint = f"schedules: {', '.join(names)}" if names else "there are no schedules"
        raise UserError(f"no schedule named {name!r} in {schedules_dir(registry)} ({hint})",
                        field="name")
    spec = json.loads(p.spec.read_text(encoding="utf-8"))
    removed = []
    if spec.get("backend") == "launchd":
        plist = plist_path(name)
        if plist.exists():
            removed.append(str(plist))
            if not dry_run:
                _launchctl("unload", str(plist))
                plist.unlink()
    else:
        lines = read_crontab()
        ours = [ln for ln in lines if _is_ours(ln, name)]
        removed += [f"crontab: {ln}" for ln in ours]
        if ours and not dry_run:
            write_crontab([ln for ln in lines if not _is_ours(ln, name)])
    removed.append(str(p.spec))
    if not dry_run:
        p.spec.unlink()
    return {"name": name, "removed": removed, "log": str(p.log), "dry_run": dry_run}


# ----------------------------------------------------------------------------- run

def _log(p: Paths, line: str) -> None:
    p.log.parent.mkdir(parents=True, exist_ok=True)
    with open(p.log, "a", encoding="utf-8") as f:
        f.write(f"[{_dt.datetime.now().astimezone().isoformat(timespec='seconds')}] "
                f"metapeft schedule {p.spec.stem}: {line}\n")


def due(spec: dict, state: dict, now: float | None = None) -> bool:
    """Whether a run is due: no earlier start, or ``every`` less half the scheduler's period
    since the last one."""
    last = state.get("started_ts")
    if not isinstance(last, (int, float)):
        return True
    slack = min(spec.get("period_seconds", 0), spec["every_seconds"]) / 2
    return (now if now is not None else time.time()) - last >= spec["every_seconds"] - slack


def run(name: str, *, registry: str | Path | None = None, force: bool = False) -> dict:
    """One scheduled run of ``name`` (what the scheduler calls): ``{"ran": bool, "why",
    "exit_status"}``. Skips when the previous run still holds the lock, or when not due
    (``force``: run anyway, unless a run is going)."""
    p = paths(name, registry)
    try:
        spec = json.loads(p.spec.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no schedule named {name!r} in {schedules_dir(registry)}",
                        field="name") from None
    with file_lock(p.lock, blocking=False) as held:
        if not held:
            _log(p, "skipped: the previous run is still going")
            return {"ran": False, "why": "the previous run is still going", "exit_status": None}
        state = _state(p)
        if not force and not due(spec, state):
            return {"ran": False, "why": "not due", "exit_status": None}
        argv = [sys.executable, "-m", "metapeft.cli", *spec["command"]]
        started = time.time()
        atomic_write_json(p.state, {**state, "started_ts": started, "pid": os.getpid(),
                                    "started": _iso(started), "running": True})
        _log(p, f"start: metapeft {shlex.join(spec['command'])} (in {spec['cwd']})")
        env = {**os.environ, **spec.get("env", {}), "METAPEFT_PROGRESS_SECONDS": "60"}
        with open(p.log, "a", encoding="utf-8") as log:
            try:
                code = subprocess.run(argv, cwd=spec["cwd"], stdout=log,
                                      stderr=subprocess.STDOUT, env=env,
                                      stdin=subprocess.DEVNULL).returncode
            except OSError as e:
                log.write(f"could not start: {e}\n")
                code = 127
        seconds = time.time() - started
        _log(p, f"end: exit status {code} after {seconds:.1f} s")
        atomic_write_json(p.state, {"started_ts": started, "started": _iso(started),
                                    "finished": _iso(time.time()), "exit_status": code,
                                    "duration_seconds": round(seconds, 3), "running": False})
    return {"ran": True, "why": "forced" if force else "due", "exit_status": code}


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def describe(spec: dict[str, Any]) -> str:
    return f"metapeft {shlex.join(spec.get('command', []))}"

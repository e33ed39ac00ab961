"""Run records: one JSON file per command that trains or evaluates, under the registry root.

Layout: ``<root>/runs/<ID>.json`` with ``<root>`` from ``registry.registry_root`` (the command's
``--registry``, else ``$METAPEFT_HOME``, else the user data dir). ``ID`` is
``YYYYMMDD-HHMMSS-xxxxxx`` (UTC start time and 6 random hex digits); ``list_runs`` orders
runs by their exact start time (``started_ts``).

A record is written atomically (``artifacts.atomic_write_json``) twice: when the command starts
(``status: running``, with its pid) and when it ends, with

* ``command`` (``adapt``, ``weights check``, ...), ``argv`` (the command line after
  ``metapeft``) and ``params`` (every option's value, defaults included);
* ``versions``: metapeft, Python, MLX and mlx-lm (read from the installed packages' metadata,
  nothing imported);
* ``calls``: what each ``metapeft.api`` call the command made returned (its report's
  ``to_json()`` split into ``result``: the scalars and small mappings, and ``curves``: the
  lists of numbers, e.g. ``accuracies``/``losses`` of ``adapt``, ``meta_loss``/``val_accuracy``
  of ``meta-train``);
* the outcome: ``status`` (``ok``, ``failed``, ``interrupted``, ``crashed``), ``exit_status``,
  ``error`` (the one-line error the command printed, or the exception for a crash),
  ``started``, ``finished`` and ``duration_seconds``.

A record still ``running`` whose process is gone (``kill -9``, power loss) reads as ``died``.
``METAPEFT_RUNS=off`` turns recording off. ``metapeft --track mlflow`` also mirrors each finished
record to a local MLflow file store (``tracking.py``). The CLI layer writes the records
(``cli._common.recorded``); this module only stores and reads them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from metapeft.artifacts import atomic_write_json
from metapeft.errors import UserError
from metapeft.registry import registry_root

ID_RE = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
MAX_CALLS = 64  # a command making more api calls (quickstart: ~20) keeps the first ones
MAX_CURVE = 100_000  # longer numeric lists are left out of a record


def runs_dir(registry: str | Path | None = None) -> Path:
    return registry_root(registry) / "runs"


def enabled() -> bool:
    """False with ``METAPEFT_RUNS=off`` (or 0/false/no)."""
    return os.environ.get("METAPEFT_RUNS", "on").strip().lower() not in ("off", "0", "false",
                                                                          "no")


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def new_id(at: _dt.datetime | None = None) -> str:
    return f"{(at or now()).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def versions() -> dict[str, str | None]:
    """metapeft, Python, MLX and mlx-lm versions, from package metadata (no imports)."""
    from importlib import metadata

    from metapeft import __version__

    out: dict[str, str | None] = {"metapeft": __version__,
                                  "python": sys.version.split()[0]}
    for dist in ("mlx", "mlx-lm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summarise(obj: Any) -> dict:
    """A report's JSON split into ``result`` (scalars, and mappings of scalars) and ``curves``
    (lists of numbers, or of None for a non-finite value); other values are left out."""
    from metapeft.reports import json_safe

    obj = json_safe(obj)
    if not isinstance(obj, dict):
        return {"result": {}, "curves": {}}
    result, curves = {}, {}
    for k, v in obj.items():
        if v is None or isinstance(v, (str, bool)) or _is_number(v):
            result[k] = v
        elif isinstance(v, dict) and all(x is None or isinstance(x, (str, bool)) or _is_number(x)
                                         for x in v.values()):
            result[k] = v
        elif (isinstance(v, list) and v and len(v) <= MAX_CURVE
              and all(x is None or _is_number(x) for x in v)
              and any(_is_number(x) for x in v)):
            curves[k] = v
    return {"result": result, "curves": curves}


def write(record: dict, registry: str | Path | None = None) -> Path:
    """Write (or rewrite) ``record`` atomically as ``runs/<id>.json``."""
    return atomic_write_json(runs_dir(registry) / f"{record['id']}.json", record)


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    except OSError:
        return False
    return True


def _load(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    if rec.get("status") == "running" and not _alive(rec.get("pid")):
        rec["status"] = "died"  # as read: the file keeps what the process last wrote
    return rec


def list_runs(registry: str | Path | None = None, *, command: str | None = None,
              limit: int | None = None) -> list[dict]:
    """Every readable record, oldest first (``command``: only that command's; ``limit``: the
    last ``limit``)."""
    d = runs_dir(registry)
    if not d.is_dir():
        return []
    out = []
    for p in d.glob("*.json"):
        if not ID_RE.fullmatch(p.stem):
            continue
        rec = _load(p)
        if rec is not None and (command is None or rec.get("command") == command):
            out.append(rec)
    # ids sort by the second a run started; within a second, by the exact start time
    out.sort(key=lambda r: (str(r.get("id", ""))[:15], r.get("started_ts") or 0,
                            str(r.get("id", ""))))
    return out[-limit:] if limit else out


def get_run(run_id: str, registry: str | Path | None = None) -> dict:
    """The record ``run_id`` (or the one run whose id starts with it); a one-line UserError
    when none or several match."""
    d = runs_dir(registry)
    if not isinstance(run_id, str) or not re.fullmatch(r"[0-9a-f-]+", run_id or ""):
        raise UserError(f"invalid run id {run_id!r}: expected YYYYMMDD-HHMMSS-xxxxxx or a "
                        "prefix of one", field="id")
    matches = sorted(p for p in d.glob(f"{run_id}*.json") if ID_RE.fullmatch(p.stem)) \
        if d.is_dir() else []
    if not matches:
        raise UserError(f"no run {run_id!r} in {d} (metapeft runs list)", field="id")
    if len(matches) > 1 and matches[0].stem != run_id:
        shown = ", ".join(p.stem for p in matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise UserError(f"run id {run_id!r} is ambiguous: {shown}", field="id")
    rec = _load(matches[0])
    if rec is None:
        raise UserError("unreadable run record", path=str(matches[0]), field="id")
    return rec


def _plain(value):
    """A parameter value JSON has no type for: an Enum's value, else its string."""
    return getattr(value, "value", None) or str(value)


class Recorder:
    """One command's record: ``start``, ``call`` (an api call's report) and ``finish``. Writing
    never fails the command: a record that cannot be written is dropped (``path`` is None)."""

    def __init__(self, command: str, *, argv: list[str], params: dict,
                 registry: str | Path | None = None):
        self.registry = registry
        started = now()
        self.record: dict[str, Any] = {
            "id": new_id(started), "command": command, "argv": list(argv),
            "params": json.loads(json.dumps(params, default=_plain)), "versions": versions(),
            "cwd": os.getcwd(), "pid": os.getpid(),
            "started": started.isoformat(timespec="seconds"),
            "started_ts": started.timestamp(), "finished": None,
            "duration_seconds": None, "status": "running", "exit_status": None, "error": None,
            "calls": [], "calls_left_out": 0}
        self._t0 = time.monotonic()
        self.path: Path | None = None
        self.error: str | None = None

    @property
    def id(self) -> str:
        return self.record["id"]

    def _write(self) -> None:
        try:
            self.path = write(self.record, self.registry)
        except (OSError, UserError, TypeError, ValueError):
            self.path = None

    def start(self) -> None:
        self._write()

    def call(self, name: str, report: Any) -> None:
        """Keep what api call ``name`` returned (its ``to_json()``, summarised)."""
        if len(self.record["calls"]) >= MAX_CALLS:
            self.record["calls_left_out"] += 1
            return
        to_json = getattr(report, "to_json", None)
        try:
            obj = to_json() if callable(to_json) else report
        except Exception:  # noqa: BLE001 - a record is never the reason a command fails
            obj = None
        self.record["calls"].append({"call": name, **summarise(obj)})

    def finish(self, exit_status: int, error: str | None = None,
               status: str | None = None) -> dict:
        end = now()
        self.record.update(
            finished=end.isoformat(timespec="seconds"),
            duration_seconds=round(time.monotonic() - self._t0, 3),
            exit_status=int(exit_status), error=error or self.error,
            status=status or ("ok" if exit_status == 0 else
                              "interrupted" if exit_status == 130 else "failed"))
        self._write()
        from metapeft.tracking import active, mirror

        if active() == "mlflow":  # `metapeft --track mlflow`: the finished record, mirrored
            mirror(self.record, registry_root(self.registry))
        return self.record

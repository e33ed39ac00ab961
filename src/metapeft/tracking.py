"""``metapeft --track mlflow``: mirror each run record (``runs.py``) to a local MLflow file store.

The run record stays the source of truth; the mirror is written once, when the command ends,
from the finished record, to ``<registry root>/mlruns`` (an MLflow file store: no server, no
account; ``mlflow ui --backend-store-uri <root>/mlruns`` reads it). Experiment ``metapeft``; one
MLflow run per command, named ``<command> <record id>``, with

* params: the command's options (``params`` of the record, nested keys joined with ``.``);
* tags: ``metapeft.command``, ``metapeft.run_id``, ``metapeft.status``, ``metapeft.exit_status``,
  the package versions and the one-line error if any;
* metrics: ``duration_seconds``, every scalar of each api call's result (``<call>.<key>``), and
  every curve (``<call>.<name>``, one value per step: ``adapt.accuracies`` at step 0, 1, ...).

It needs the ``mlflow`` extra (``mlflow-skinny``). MLflow 3 keeps its file store in maintenance
mode behind ``MLFLOW_ALLOW_FILE_STORE=true``, which the mirror sets for its own process. A mirror
that fails never fails the command: it prints one warning line.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from pathlib import Path

from metapeft.errors import UserError

TRACKERS = ("mlflow",)
ENV = "METAPEFT_TRACK"  # --track sets it, so ranks started by --processes/--workers mirror too
EXPERIMENT = "metapeft"
MAX_PARAM = 500  # characters of a parameter value kept (MLflow's own limit is 6000)


def check_tracker(name: str | None) -> str | None:
    """``name`` if it is a tracker that can run here, None for none; else a one-line error."""
    if name is None or name == "" or name == "none":
        return None
    if name not in TRACKERS:
        raise UserError(f"--track must be one of {', '.join(TRACKERS)}, got {name!r}",
                        field="track")
    if importlib.util.find_spec("mlflow") is None:
        raise UserError("--track mlflow needs the mlflow extra: pip install 'metapeft[mlflow]' "
                        "(or uv sync --extra mlflow)", field="track")
    return name


def active() -> str | None:
    """The tracker chosen for this process (``--track`` or ``$METAPEFT_TRACK``), if any."""
    name = os.environ.get(ENV, "").strip().lower()
    return name if name in TRACKERS else None


def store_uri(root: str | Path) -> str:
    return (Path(root) / "mlruns").resolve().as_uri()


def _flat(obj, prefix: str = "") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


def _number(v) -> bool:
    """A finite number (what MLflow can store as a metric value); runs.py imports this module,
    so its own number check is not imported back (no cycle)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mirror(record: dict, root: str | Path) -> str | None:
    """Write ``record`` as one MLflow run under ``root``/mlruns; returns the MLflow run id, or
    None (with a one-line warning) when it could not be written."""
    try:
        return _mirror(record, root)
    except Exception as e:  # noqa: BLE001 - tracking is never the reason a command fails
        print(f"warning: run not mirrored to MLflow: {type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return None


def _mirror(record: dict, root: str | Path) -> str:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=store_uri(root))
        exp = client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(EXPERIMENT)
        start_ms = int(float(record.get("started_ts") or time.time()) * 1000)
        run = client.create_run(exp_id, start_time=start_ms,
                                run_name=f"{record['command']} {record['id']}")
        rid = run.info.run_id
        params = [Param(k, str(v)[:MAX_PARAM]) for k, v in _flat(record.get("params") or {}).items()
                  if v is not None]
        tags = [RunTag("metapeft.command", record["command"]),
                RunTag("metapeft.run_id", record["id"]),
                RunTag("metapeft.status", str(record.get("status"))),
                RunTag("metapeft.exit_status", str(record.get("exit_status")))]
        tags += [RunTag(f"metapeft.version.{k}", str(v))
                 for k, v in (record.get("versions") or {}).items() if v]
        if record.get("error"):
            tags.append(RunTag("metapeft.error", str(record["error"])[:MAX_PARAM]))
        now_ms = int(time.time() * 1000)
        metrics = []
        if _number(record.get("duration_seconds")):
            metrics.append(Metric("duration_seconds", float(record["duration_seconds"]), now_ms, 0))
        seen: dict[str, int] = {}
        for call in record.get("calls") or []:
            name = call.get("call", "call")
            n = seen[name] = seen.get(name, 0) + 1
            key = name if n == 1 else f"{name}{n}"
            for k, v in _flat(call.get("result") or {}).items():
                if _number(v):
                    metrics.append(Metric(f"{key}.{k}", float(v), now_ms, 0))
            for k, values in _flat(call.get("curves") or {}).items():
                if isinstance(values, list):
                    metrics += [Metric(f"{key}.{k}", float(v), now_ms, i)
                                for i, v in enumerate(values) if _number(v)]
        for i in range(0, max(len(params), len(metrics), len(tags), 1), 100):
            # MLflow caps one batch at 100 params and 100 tags
            client.log_batch(rid, metrics=metrics[i:i + 100], params=params[i:i + 100],
                             tags=tags[i:i + 100])
        status = "FINISHED" if record.get("status") == "ok" else (
            "KILLED" if record.get("status") == "interrupted" else "FAILED")
        client.set_terminated(rid, status=status)
        return rid

"""The experience store: every fine-tuning run metapeft has seen, in one safetensors file.

Layout of ``experience.safetensors`` (default ``<registry root>/experience.safetensors``, the
registry root being ``$METAPEFT_HOME`` or the user data dir, see ``registry.registry_root``):

- columnar float32 arrays, one row per record:
  ``features`` (N, F) in ``select.features.FEATURE_NAMES`` order, ``embedding`` (N, E) (NaN rows
  where no embedding was recorded; E = 0 stored as (N, 1) of NaN), and one (N,) array per metric:
  ``final_accuracy``, ``steps_to_target`` (NaN = target not reached), ``seconds``,
  ``peak_memory_mb``, ``trainable_parameters``;
- header metadata: ``format`` = ``metapeft-experience``, ``schema`` = 1, ``feature_names``
  (JSON list), and ``records``: a JSON list with each record's strings and configs
  (``id``, ``task``, ``domain``, ``method``, ``hyperparameters``, ``source``, ``created``, and
  ``run`` where recorded).

``run`` says what the run was (``run_details``): the query ``curve`` at the ``eval_steps`` it was
measured at, the ``target`` (null: the run had none), the ``init`` (``NAME@VERSION``, a path, or
null for a fresh init), the ``init_source`` (one of ``INIT_SOURCES``: fresh, meta, compose,
merge, generate, route; ``init_source_of`` derives it for records written before it was kept),
the base ``model``, the task's ``project`` (null when unknown) and, for ``adapt --method auto``, the
``decision`` it took. Records written before metapeft recorded it
have no ``run``; ``experience stats`` leaves them out of the statistics that need it and says
how many.

Appends are read-modify-write under an exclusive ``fcntl.flock`` on the sidecar
``experience.safetensors.lock``, and the file itself is replaced atomically
(``artifacts.save_safetensors``): concurrent writers lose nothing, readers never see half a file.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from metapeft.errors import UserError

FORMAT = "metapeft-experience"
SCHEMA = 1
METRICS: tuple[str, ...] = ("final_accuracy", "steps_to_target", "seconds", "peak_memory_mb",
                            "trainable_parameters")
SOURCES: tuple[str, ...] = ("adapt", "meta-train", "tune", "sweep", "import")
# where a run's starting adapter came from (``run.init_source``; ``metapeft.init_sources``)
INIT_SOURCES: tuple[str, ...] = ("fresh", "meta", "compose", "merge", "generate", "route")


@dataclass
class ExperienceRecord:
    task: str
    method: str
    features: list[float]
    final_accuracy: float
    domain: str = "unknown"
    hyperparameters: dict = field(default_factory=dict)
    steps_to_target: float | None = None
    seconds: float = float("nan")
    peak_memory_mb: float = float("nan")
    trainable_parameters: float = float("nan")
    source: str = "adapt"
    embedding: list[float] | None = None
    id: str = ""
    created: str = ""
    run: dict | None = None  # curve, eval_steps, target, init, model, project, decision

    def to_json(self, feature_names: Iterable[str] | None = None) -> dict:
        """A JSON-safe dict (NaN -> null); features as a {name: value} dict when names given."""
        d = asdict(self)
        for k in METRICS:
            v = d[k]
            d[k] = None if v is None or (isinstance(v, float) and math.isnan(v)) else v
        if feature_names is not None:
            d["features"] = dict(zip(feature_names, self.features))
        return d


def default_path() -> Path:
    from metapeft.registry import registry_root

    return registry_root() / "experience.safetensors"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _num(v, name: str, where: str, allow_none: bool = True) -> float:
    if v is None:
        if allow_none:
            return float("nan")
        raise UserError("missing value", path=where, field=name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"expected a number, got {v!r}", path=where, field=name)
    return float(v)


def make_record(d: dict, *, feature_names=None, where: str = "record") -> ExperienceRecord:
    """Validate a dict (an imported JSONL row, or built in code) into an ExperienceRecord."""
    from metapeft.select.features import FEATURE_NAMES

    names = tuple(feature_names or FEATURE_NAMES)
    if not isinstance(d, dict):
        raise UserError("expected a JSON object", path=where)
    for key in ("task", "method"):
        if not isinstance(d.get(key), str) or not d.get(key):
            raise UserError("missing or empty string", path=where, field=key)
    feats = d.get("features")
    if isinstance(feats, dict):
        missing = [k for k in names if k not in feats]
        if missing:
            raise UserError(f"features lack {missing}", path=where, field="features")
        feats = [feats[k] for k in names]
    if not isinstance(feats, (list, tuple)) or len(feats) != len(names):
        raise UserError(f"features must be a list of {len(names)} numbers or a dict with "
                        f"{', '.join(names)}", path=where, field="features")
    feats = [_num(v, "features", where, allow_none=False) for v in feats]
    hp = d.get("hyperparameters") or {}
    if not isinstance(hp, dict):
        raise UserError("hyperparameters must be an object", path=where, field="hyperparameters")
    emb = d.get("embedding")
    if emb is not None:
        if not isinstance(emb, (list, tuple)):
            raise UserError("embedding must be a list of numbers", path=where, field="embedding")
        emb = [_num(v, "embedding", where, allow_none=False) for v in emb]
    run = d.get("run")
    if run is not None and not isinstance(run, dict):
        raise UserError("run must be an object", path=where, field="run")
    source = d.get("source", "import")
    if source not in SOURCES:
        raise UserError(f"source must be one of {', '.join(SOURCES)}, got {source!r}",
                        path=where, field="source")
    acc = _num(d.get("final_accuracy"), "final_accuracy", where, allow_none=False)
    if not 0.0 <= acc <= 1.0:
        raise UserError(f"final_accuracy must be in [0, 1], got {acc}", path=where,
                        field="final_accuracy")
    return ExperienceRecord(
        id=str(d.get("id") or ""), created=str(d.get("created") or ""), task=d["task"],
        domain=str(d.get("domain") or "unknown"), method=d["method"], features=feats,
        hyperparameters=hp, final_accuracy=acc,
        steps_to_target=_num(d.get("steps_to_target"), "steps_to_target", where),
        seconds=_num(d.get("seconds"), "seconds", where),
        peak_memory_mb=_num(d.get("peak_memory_mb"), "peak_memory_mb", where),
        trainable_parameters=_num(d.get("trainable_parameters"), "trainable_parameters", where),
        source=source, embedding=emb, run=run)


def _f32(x) -> float:
    """A float32 column value back as the short decimal it was written from (0.7, not
    0.699999988)."""
    x = float(x)
    return x if math.isnan(x) else float(f"{x:.7g}")


class ExperienceStore:
    """Records of past runs in one safetensors file (see the module docstring)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path else default_path()
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    # ------------------------------------------------------------------------- locking
    def locked(self):
        """The store's exclusive lock (``artifacts.file_lock`` on the sidecar ``.lock``)."""
        from metapeft.artifacts import file_lock

        return file_lock(self.lock_path)

    # ------------------------------------------------------------------------- reading
    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> list[ExperienceRecord]:
        """Every record (an empty list when the file does not exist yet)."""
        if not self.path.exists():
            return []
        from metapeft.artifacts import load_safetensors
        import numpy as np

        arrays, meta = load_safetensors(self.path)
        where = str(self.path)
        if meta.get("format") != FORMAT:
            raise UserError(f"not a metapeft experience store (format {meta.get('format')!r})",
                            path=where, field="format")
        try:
            rows = json.loads(meta.get("records", "[]"))
            names = json.loads(meta.get("feature_names", "[]"))
        except json.JSONDecodeError:
            raise UserError("corrupt experience metadata (records)", path=where) from None
        from metapeft.select.features import FEATURE_NAMES

        if list(names) != list(FEATURE_NAMES):
            raise UserError(f"experience store has features {names}, this metapeft uses "
                            f"{list(FEATURE_NAMES)}; export it and re-profile", path=where,
                            field="feature_names")
        n = len(rows)
        try:
            cols = {k: np.asarray(arrays[k], dtype=np.float64) for k in ("features", "embedding",
                                                                         *METRICS)}
        except KeyError as e:
            raise UserError(f"experience store lacks column {e}", path=where) from None
        if any(c.shape[0] != n for c in cols.values()):
            raise UserError("experience columns and records disagree in length", path=where)
        out = []
        for i, r in enumerate(rows):
            emb = cols["embedding"][i]
            emb_l = None if emb.size == 0 or np.isnan(emb).all() else [float(x) for x in emb]
            stt = float(cols["steps_to_target"][i])
            out.append(ExperienceRecord(
                id=r.get("id", ""), created=r.get("created", ""), task=r.get("task", ""),
                domain=r.get("domain", "unknown"), method=r.get("method", ""),
                hyperparameters=r.get("hyperparameters") or {}, source=r.get("source", "adapt"),
                features=[float(x) for x in cols["features"][i]],
                final_accuracy=_f32(cols["final_accuracy"][i]),
                steps_to_target=None if math.isnan(stt) else _f32(stt),
                seconds=_f32(cols["seconds"][i]),
                peak_memory_mb=_f32(cols["peak_memory_mb"][i]),
                trainable_parameters=_f32(cols["trainable_parameters"][i]),
                embedding=emb_l, run=r.get("run")))
        return out

    def get(self, record_id: str) -> ExperienceRecord:
        recs = self.load()
        hits = [r for r in recs if r.id == record_id] or \
            [r for r in recs if record_id and r.id.startswith(record_id)]
        if len(hits) != 1:
            what = "no record" if not hits else f"{len(hits)} records"
            raise UserError(f"{what} with id {record_id!r} in {self.path}", field="id")
        return hits[0]

    # ------------------------------------------------------------------------- writing
    def _write(self, records: list[ExperienceRecord]) -> None:
        import numpy as np

        from metapeft.artifacts import save_safetensors
        from metapeft.select.features import FEATURE_NAMES

        n, f = len(records), len(FEATURE_NAMES)
        feats = np.zeros((n, f), np.float32)
        e_dim = max([len(r.embedding) for r in records if r.embedding] or [1])
        emb = np.full((n, e_dim), np.nan, np.float32)
        metrics = {k: np.full((n,), np.nan, np.float32) for k in METRICS}
        for i, r in enumerate(records):
            feats[i] = r.features
            if r.embedding:
                emb[i, :len(r.embedding)] = r.embedding
            for k in METRICS:
                v = getattr(r, k)
                metrics[k][i] = np.nan if v is None else v
        rows = [{"id": r.id, "created": r.created, "task": r.task, "domain": r.domain,
                 "method": r.method, "hyperparameters": r.hyperparameters, "source": r.source,
                 **({} if r.run is None else {"run": r.run})}
                for r in records]
        save_safetensors(self.path, {"features": feats, "embedding": emb, **metrics},
                         {"format": FORMAT, "schema": SCHEMA,
                          "feature_names": list(FEATURE_NAMES), "records": rows})

    def append(self, records: Iterable[ExperienceRecord | dict]) -> list[str]:
        """Append records atomically under the file lock; returns their ids."""
        new = []
        for i, r in enumerate(records):
            # records built in code are validated the same way as imported rows
            d = r.to_json() if isinstance(r, ExperienceRecord) else r
            if isinstance(d, dict) and "source" not in d:
                d = {**d, "source": "adapt"}
            rec = make_record(d, where=f"record {i}")
            if not rec.id:
                rec.id = uuid.uuid4().hex[:12]
            if not rec.created:
                rec.created = _now()
            new.append(rec)
        if not new:
            return []
        with self.locked():
            existing = self.load()
            seen = {r.id for r in existing}
            for r in new:
                while r.id in seen:
                    r.id = uuid.uuid4().hex[:12]
                seen.add(r.id)
            self._write(existing + new)
        return [r.id for r in new]

    # ------------------------------------------------------------------------- jsonl
    def export_jsonl(self, out: str | Path) -> int:
        from metapeft.artifacts import atomic_write_text
        from metapeft.select.features import FEATURE_NAMES

        recs = self.load()
        text = "".join(json.dumps(r.to_json(FEATURE_NAMES)) + "\n" for r in recs)
        atomic_write_text(out, text)
        return len(recs)

    def import_jsonl(self, path: str | Path) -> list[str]:
        """Append every row of a JSONL file (as written by ``export_jsonl``); ids that already
        exist in the store are skipped, so importing twice is harmless."""
        path = Path(path)
        from metapeft.data.tasks import jsonl_objects, read_lines

        recs = [make_record(obj, where=f"{path}:{i}")
                for i, obj in jsonl_objects(read_lines(path), str(path))]
        with self.locked():
            existing = self.load()
            seen = {r.id for r in existing}
            fresh = []
            for r in recs:
                if r.id and r.id in seen:
                    continue
                r.id = r.id or uuid.uuid4().hex[:12]
                r.created = r.created or _now()
                seen.add(r.id)
                fresh.append(r)
            if fresh:
                self._write(existing + fresh)
        return [r.id for r in fresh]


def hyperparameters_of(report) -> dict:
    """The hyperparameters of an ``AdaptReport``: lr, steps, objective and the adapter config."""
    hp: dict[str, Any] = {"lr": report.extra.get("lr"), "steps": len(report.losses)}
    if report.extra.get("objective"):
        hp["objective"] = report.extra["objective"]
    adapter = getattr(report, "adapter", None)
    if adapter is not None:
        try:
            hp.update(adapter.config.to_dict())
        except Exception:  # a config that does not serialise is not worth failing a run over
            pass
    return json.loads(json.dumps(hp, default=str))


def task_project(task) -> str | None:
    """The task's project: its ``project`` meta, else its support rows' ``project`` field (most
    common), else None."""
    from collections import Counter

    if (task.meta or {}).get("project"):
        return str(task.meta["project"])
    projects = Counter(str(e.extra["project"]) for e in task.support
                       if e.extra.get("project") not in (None, ""))
    return projects.most_common(1)[0][0] if projects else None


def init_source(init: str | None, routed: bool = False) -> str:
    """The ``INIT_SOURCES`` kind of an init as ``adapt`` names it (``describe_init``): route for
    a routed run, fresh for none, compose/merge/generate for ``library:...``, meta for a
    registry version or a file."""
    if routed:
        return "route"
    if init is None:
        return "fresh"
    for kind in ("compose", "merge", "generate"):
        if str(init).startswith(f"library:{kind}"):
            return kind
    return "meta"


def init_source_of(r: ExperienceRecord) -> str | None:
    """A record's init source: ``run.init_source``, else derived from ``run.init`` (a routed run
    recorded before init sources were kept reads as fresh), else meta when a sweep kept its init
    in the hyperparameters; None for records without a run."""
    run = r.run
    if run is None:
        return "meta" if r.hyperparameters.get("init") else None
    if run.get("init_source") in INIT_SOURCES:
        return run["init_source"]
    return init_source(run.get("init"))


def run_details(report, task) -> dict:
    """A record's ``run`` (see the module docstring) from an ``AdaptReport``: the curve and the
    steps it was measured at, the target, the init and its source, the model, the project, the
    decision."""
    ex = report.extra or {}
    curve = [round(float(a), 6) for a in report.accuracies]
    steps = list(ex.get("eval_steps") or range(len(curve)))
    init = ex.get("init") or ex.get("meta_weights")
    run = {"curve": curve, "eval_steps": [int(i) for i in steps], "target": ex.get("target"),
           "init": init, "init_source": init_source(init, bool(ex.get("route"))),
           "model": ex.get("model"), "project": task_project(task)}
    if ex.get("decision") is not None:
        run["decision"] = ex["decision"]
    return json.loads(json.dumps(run, default=str))


def record_from_report(report, task, features: dict | list | None = None, *, base=None,
                       source: str = "adapt", hyperparameters: dict | None = None,
                       embedding: list[float] | None = None) -> ExperienceRecord:
    from metapeft.select.features import FEATURE_NAMES, feature_vector, task_domain, task_features

    if features is None:
        if base is None:
            from metapeft.models import load_base_model

            base = load_base_model(report.extra.get("model") or "tiny")
        features = task_features(task, base)
    vec = feature_vector(features) if isinstance(features, dict) else list(features)
    if len(vec) != len(FEATURE_NAMES):
        raise UserError(f"features must have {len(FEATURE_NAMES)} values", field="features")
    return ExperienceRecord(
        task=task.name, domain=task_domain(task), method=report.method, features=vec,
        hyperparameters=hyperparameters if hyperparameters is not None
        else hyperparameters_of(report),
        final_accuracy=float(report.final_accuracy),
        steps_to_target=report.steps_to_target,
        seconds=float(report.seconds),
        peak_memory_mb=float(report.extra.get("peak_memory_mb", float("nan"))),
        trainable_parameters=float(report.extra.get("trainable_parameters", float("nan"))),
        source=source, embedding=embedding, run=run_details(report, task))


def record_adapt(report, task, features: dict | list | None = None, *, source: str = "adapt",
                 store: ExperienceStore | str | Path | None = None, base=None,
                 hyperparameters: dict | None = None) -> str:
    """Append one record for a finished ``api.adapt`` run; returns its id.

    ``task`` is the Task object that was adapted on (``api.load_task_arg`` turns a path into
    one); ``features`` are computed with ``report.extra['model']`` when not given. Set
    ``METAPEFT_EXPERIENCE=off`` to disable recording.
    """
    import os

    if os.environ.get("METAPEFT_EXPERIENCE", "").lower() in ("off", "0", "false", "no"):
        return ""
    if not isinstance(store, ExperienceStore):
        store = ExperienceStore(store)
    rec = record_from_report(report, task, features, base=base, source=source,
                             hyperparameters=hyperparameters)
    return store.append([rec])[0]


# ----------------------------------------------------------------------------- statistics

STATS_BY: tuple[str, ...] = ("method", "domain", "project", "init", "init_source")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: _dt.datetime | None = None) -> _dt.datetime:
    """``--since``: a duration back from ``now`` (``30d``, ``12h``, ``2w``, ``90m``, ``45s``) or
    an ISO date/time (UTC when it names no zone) -> the UTC cut-off; a one-line UserError
    otherwise."""
    import re

    now = now or _dt.datetime.now(_dt.timezone.utc)
    text = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if m:
        return now - _dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        cut = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--since must be a duration such as 30d, 12h, 2w or 90m, or an ISO "
                        f"date such as 2026-01-31, got {text!r}", field="since") from None
    return cut if cut.tzinfo else cut.replace(tzinfo=_dt.timezone.utc)


def _created(r: ExperienceRecord) -> _dt.datetime | None:
    try:
        t = _dt.datetime.fromisoformat(r.created)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def stats_group(r: ExperienceRecord, by: str) -> str:
    """The group a record falls in for ``experience stats --by``: its method or domain; its
    project (``unknown`` when not recorded); its init (``NAME@VERSION`` or a path, ``fresh``, or
    ``unknown`` for records written before inits were recorded); its init source
    (``init_source_of``)."""
    if by == "method":
        return r.method
    if by == "domain":
        return r.domain or "unknown"
    if by == "project":
        return str((r.run or {}).get("project") or "unknown")
    if by == "init_source":
        return init_source_of(r) or "unknown"
    if r.run is not None:
        return str(r.run.get("init") or "fresh")
    return str(r.hyperparameters.get("init") or "unknown")  # sweeps kept it there before


def _mean(xs) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def experience_stats(records: list[ExperienceRecord], *, by: str = "method",
                     since: str | None = None, now: _dt.datetime | None = None) -> dict:
    """Per group (``by``: method, domain, project or init) of the records created since
    ``since``: the run count, the success rate (runs that reached their target, over the runs
    that recorded one), the mean and median steps to the target (over the runs that reached
    it), and the mean final accuracy. Records that lack a field are left out of the statistics
    that need it, and the counts say how many were used."""
    import statistics

    if by not in STATS_BY:
        raise UserError(f"--by must be one of {', '.join(STATS_BY)}, got {by!r}", field="by")
    cut = None if since is None else parse_since(since, now)
    kept, older, undated = [], 0, 0
    for r in records:
        if cut is not None:
            t = _created(r)
            if t is None:
                undated += 1
                continue
            if t < cut:
                older += 1
                continue
        kept.append(r)
    groups: dict[str, list[ExperienceRecord]] = {}
    for r in kept:
        groups.setdefault(stats_group(r, by), []).append(r)
    rows = []
    for name, rs in groups.items():
        with_target = [r for r in rs if r.run is not None and r.run.get("target") is not None]
        reached = [float(r.steps_to_target) for r in with_target
                   if r.steps_to_target is not None and not math.isnan(r.steps_to_target)]
        accs = [r.final_accuracy for r in rs if not math.isnan(r.final_accuracy)]
        rows.append({
            "group": name, "runs": len(rs), "runs_with_target": len(with_target),
            "reached_target": len(reached),
            "success_rate": len(reached) / len(with_target) if with_target else None,
            "mean_steps_to_target": _mean(reached),
            "median_steps_to_target": float(statistics.median(reached)) if reached else None,
            "runs_with_accuracy": len(accs), "mean_final_accuracy": _mean(accs)})
    rows.sort(key=lambda g: (-g["runs"], g["group"]))
    return {"by": by, "since": None if cut is None else cut.isoformat(timespec="seconds"),
            "records": len(records), "included": len(kept), "older": older, "undated": undated,
            "without_target": sum(1 for r in kept if r.run is None
                                  or r.run.get("target") is None),
            "without_run": sum(1 for r in kept if r.run is None), "groups": rows}

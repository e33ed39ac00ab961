"""The drift gate: may a new meta-weights version replace the old one?

``check(NEW, OLD, data)`` adapts both versions on the same fixed probe tasks (episodes drawn from
``data`` with fixed seeds, so every check on the same data sees the same tasks) for ``steps``
optimizer steps each, at the version's own stored test-time lr (``adapt_lr``, chosen by
``meta.stepsize`` when it was published) or else its method's default, exactly as ``adapt --init``
would; then it scores every probe query with both adapted versions and reports:

* each version's mean query accuracy after ``steps`` steps, with a 95% CI over the tasks;
* the paired accuracy delta (new − old, task by task) with its 95% CI (1.96·sd/√n);
* behavioural drift: the mean, over every probe query, of KL(p_old ‖ p_new), where p is a
  version's predictive distribution (the softmax over the candidate labels' scores, as
  ``predict`` computes it), and the share of queries on which both predict the same label.

The gate fails when the new version's mean accuracy is below the old one's by more than
``tolerance``, when drift exceeds ``max_drift`` (default 0.3 nats), or when the new version
diverges on a probe task; ``passed`` and ``reasons`` say which, and ``rollback`` is the command
that makes the old version the latest again. ``meta-train --gate`` runs the same comparison on
its candidate (``compare``) before publishing it.

A version checked against itself gives delta 0 and drift 0 exactly: training and scoring are
deterministic given the seed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from metapeft.config import GATE
from metapeft.errors import UserError
from metapeft.metrics import mean_ci

DEFAULT_TASKS = GATE["tasks"]
DEFAULT_STEPS = GATE["steps"]
DEFAULT_TOLERANCE = GATE["tolerance"]  # absolute accuracy (2 points)
DEFAULT_MAX_DRIFT = GATE["max_drift"]  # nats of KL(p_old || p_new), averaged over the probe queries
PROBE_SEED = 90_000_049  # probe task i is episode PROBE_SEED * (seed + 1) + i
GATE_FAILED = 3  # the exit status of a failed check (bad input stays 2)


@dataclass
class Contender:
    """One version to adapt on the probe tasks: its adapter (on the shared base model), its
    parameters and the lr it adapts with."""

    label: str  # NAME@V, or "candidate"
    adapter: Any
    params: dict
    lr: float
    lr_from: str  # "adapt_lr" (stored with the version) or "method default"
    name: str | None = None
    version: int | None = None
    path: str | None = None
    # per-layer inner-lr multipliers stored with the version (inner_lr.*), applied as adapt does
    lr_scales: dict | None = None
    lr_decay: float = 0.0  # the inverse-time decay stored with the version (adapt_lr_decay)

    def describe(self) -> dict:
        return {"spec": self.label, "name": self.name, "version": self.version,
                "path": self.path, "method": self.adapter.method, "lr": self.lr,
                "lr_from": self.lr_from, **({"lr_decay": self.lr_decay} if self.lr_decay else {})}


def stored_lr(meta: dict) -> float | None:
    """The ``adapt_lr`` in a version's header (``adapter_io.init_adapt_lr``'s rule), or None."""
    try:
        value = float(meta["adapt_lr"])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def load_contender(spec: str, base, registry: str | Path | None = None, *,
                   field: str = "new") -> Contender:
    """Registry version ``spec`` (``NAME[@V]``) as an adapter on ``base``, with its own adapter
    options; a one-line error when it was trained on another base model or does not fit."""
    from metapeft.adapter_io import check_base_model, split_inner_lr, stored_lr_decay
    from metapeft.adapters import get_adapter_class
    from metapeft.artifacts import json_field, load_safetensors
    from metapeft.registry import parse_spec, resolve

    name, _ = parse_spec(spec)
    path = resolve(spec, registry)
    arrays, meta = load_safetensors(path)
    method = meta.get("method")
    if method is None:
        raise UserError("no 'method' in the header; not metapeft meta-weights", path=str(path),
                        field=field)
    check_base_model(meta, base, str(path))
    cls = get_adapter_class(method)
    if cls.training_free:
        raise UserError(f"{method} is training-free: there is nothing to check", path=str(path),
                        field=field)
    adapter = cls.attach(base, json_field(meta, "config") or {})
    params = adapter.check_compatible(adapter.unflat(arrays), meta, str(path))
    lr = stored_lr(meta)
    version = int(path.stem.lstrip("v"))
    return Contender(label=f"{name}@{version}", adapter=adapter, params=params,
                     lr=lr if lr is not None else cls.default_lr,
                     lr_from="adapt_lr" if lr is not None else "method default", name=name,
                     version=version, path=str(path), lr_scales=split_inner_lr(arrays),
                     lr_decay=stored_lr_decay(meta))


def probe_tasks(data: str | Path, *, tasks: int = DEFAULT_TASKS, ways: int = 5, shots: int = 5,
                query: int = 5, seed: int = 0, domains=None, exclude_domains=None,
                labels_from=None, exclude_labels=None, text_field: str = "text",
                label_field: str = "label") -> list:
    """The fixed probe tasks: ``tasks`` seeded episodes over every class of ``data`` (a pool
    file or ``synthetic``, after the domain/label filters), or the first ``tasks`` tasks of a
    task directory. The same arguments always give the same tasks."""
    from metapeft.meta.sources import SYNTHETIC, FixedTasks, build_meta_sources

    if tasks < 1:
        raise UserError(f"--tasks must be at least 1, got {tasks}", field="tasks")
    if str(data) != SYNTHETIC and not Path(data).exists():
        raise UserError("probe data does not exist (a pool file, a task directory, or "
                        f"'{SYNTHETIC}')", path=str(data), field="data")
    sources = build_meta_sources(data, ways=ways, shots=shots, query=query, domains=domains,
                                 exclude_domains=exclude_domains, labels_from=labels_from,
                                 exclude_labels=exclude_labels, val_fraction=0.0, seed=seed,
                                 text_field=text_field, label_field=label_field)
    src = sources.train
    if isinstance(src, FixedTasks):  # a task directory: its tasks, in order
        return list(src.tasks[:tasks])
    return [src.sample(PROBE_SEED * (seed + 1) + i) for i in range(tasks)]


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    m = s.max(axis=1, keepdims=True)
    return s - m - np.log(np.exp(s - m).sum(axis=1, keepdims=True))


def adapt_and_score(c: Contender, enc, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Adapt ``c`` on an encoded task's support set for ``steps`` Adam steps at its lr, then the
    (n, C) log-probabilities of its query examples (eval mode, as ``predict`` scores) and their
    gold label indices. ``FloatingPointError`` when training diverges."""
    import mlx.core as mx

    from metapeft.train import train

    res = train(c.adapter, c.params, enc, steps=steps, lr=c.lr, seed=seed, evaluate_query=False,
                lr_scales=c.lr_scales, lr_decay=c.lr_decay)
    params = c.adapter.scoring_params(res.params)
    logp, gold = [], []
    with c.adapter.scoring_mode():
        for b in enc.prepared(c.adapter, "query"):
            s = c.adapter.scores(params, b).astype(mx.float32)
            labels = np.array(b.labels)
            keep = labels >= 0
            logp.append(_log_softmax(np.array(s))[keep])
            gold.append(labels[keep])
    return np.concatenate(logp), np.concatenate(gold)


@dataclass
class DriftReport:
    """What ``check``/``compare`` measured, and the verdict (``passed``, ``reasons``)."""

    new: dict
    old: dict
    data: str | None
    num_tasks: int
    steps: int
    tolerance: float
    max_drift: float
    accuracy_new: dict  # {"mean", "ci"}
    accuracy_old: dict
    delta: dict  # {"mean", "ci", "low", "high"}: new − old, paired by task
    drift: float | None  # mean KL(p_old || p_new) over every probe query
    drift_per_task: dict  # {"mean", "ci"} over the tasks' own means
    agreement: float | None  # share of probe queries with the same predicted label
    num_queries: int
    diverged: dict  # {"new": [task indices], "old": [...]}
    passed: bool
    reasons: list[str]
    rollback: str | None  # the command that makes the old version the latest again
    seconds: float
    per_task: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        from metapeft.reports import json_safe

        return json_safe({k: getattr(self, k) for k in self.__dataclass_fields__})


def rollback_command(new: Contender, old: Contender, registry=None) -> str | None:
    """``metapeft weights rollback NAME V`` when both are versions of one name, else None."""
    if new.name is None or old.name is None or new.name != old.name or old.version is None:
        return None
    reg = f" --registry {registry}" if registry is not None else ""
    return f"metapeft weights rollback {old.name} {old.version}{reg}"


def compare(new: Contender, old: Contender, tasks: list, *, steps: int = DEFAULT_STEPS,
            tolerance: float = DEFAULT_TOLERANCE, max_drift: float = DEFAULT_MAX_DRIFT,
            seed: int = 0, data: str | None = None, registry=None,
            on_task: Callable[[int, dict], None] | None = None) -> DriftReport:
    """Adapt both on every task in ``tasks`` and compare (see the module doc)."""
    from metapeft.train import encode_task

    check_thresholds(steps=steps, tolerance=tolerance, max_drift=max_drift)
    if new.adapter.method != old.adapter.method:
        raise UserError(f"{new.label} is {new.adapter.method} meta-weights and {old.label} is "
                        f"{old.adapter.method}: only versions of one method can be compared",
                        field="against")
    t0 = time.perf_counter()
    per_task, kl_all, agree_all = [], [], []
    diverged = {"new": [], "old": []}
    tok = new.adapter.base.tokenizer
    for i, task in enumerate(tasks):
        enc = encode_task(task, tok)
        row: dict = {"task": task.name, "num_query": enc.num_query}
        out = {}
        for key, c in (("new", new), ("old", old)):
            try:
                out[key] = adapt_and_score(c, enc, steps, seed)
            except FloatingPointError:
                diverged[key].append(i)
                out[key] = None
        if out["new"] is not None and out["old"] is not None:
            (lp_new, gold), (lp_old, _) = out["new"], out["old"]
            acc_new = float(np.mean(lp_new.argmax(1) == gold)) if gold.size else math.nan
            acc_old = float(np.mean(lp_old.argmax(1) == gold)) if gold.size else math.nan
            kl = (np.exp(lp_old) * (lp_old - lp_new)).sum(axis=1)
            kl = np.maximum(kl, 0.0)  # rounding can leave -1e-17
            same = lp_new.argmax(1) == lp_old.argmax(1)
            kl_all.append(kl)
            agree_all.append(same)
            row.update(accuracy_new=acc_new, accuracy_old=acc_old, delta=acc_new - acc_old,
                       drift=float(kl.mean()) if kl.size else 0.0,
                       agreement=float(same.mean()) if same.size else None)
        else:
            row.update(diverged=[k for k in ("new", "old") if out[k] is None])
        per_task.append(row)
        if on_task is not None:
            on_task(i, row)
    ok = [r for r in per_task if "delta" in r]
    delta = mean_ci([r["delta"] for r in ok])
    if delta["mean"] is not None:
        half = delta["ci"]
        delta.update(low=None if half is None else delta["mean"] - half,
                     high=None if half is None else delta["mean"] + half)
    kl_flat = np.concatenate(kl_all) if kl_all else np.zeros(0)
    drift = float(kl_flat.mean()) if kl_flat.size else None
    agree = np.concatenate(agree_all) if agree_all else np.zeros(0, bool)
    reasons = []
    if diverged["new"]:
        reasons.append(f"the new version diverged on {len(diverged['new'])} of {len(tasks)} "
                       f"probe tasks at lr {new.lr:g}")
    if not ok:
        reasons.append("no probe task could be compared")
    if delta["mean"] is not None and delta["mean"] < -tolerance:
        reasons.append(f"accuracy dropped by {-delta['mean']:.1%} (tolerance {tolerance:.1%})")
    if drift is not None and drift > max_drift:
        reasons.append(f"drift {drift:.3f} exceeds {max_drift:g}")
    passed = not reasons
    return DriftReport(
        new=new.describe(), old=old.describe(), data=None if data is None else str(data),
        num_tasks=len(tasks), steps=steps, tolerance=tolerance, max_drift=max_drift,
        accuracy_new=mean_ci([r["accuracy_new"] for r in ok]),
        accuracy_old=mean_ci([r["accuracy_old"] for r in ok]), delta=delta, drift=drift,
        drift_per_task=mean_ci([r["drift"] for r in ok]),
        agreement=float(agree.mean()) if agree.size else None, num_queries=int(kl_flat.size),
        diverged=diverged, passed=passed, reasons=reasons,
        rollback=None if passed else rollback_command(new, old, registry),
        seconds=time.perf_counter() - t0, per_task=per_task)


def check_thresholds(*, steps: int, tolerance: float, max_drift: float) -> None:
    """One-line errors for thresholds no check can use (before anything loads)."""
    if steps < 0:
        raise UserError(f"--steps must be >= 0, got {steps}", field="steps")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(f"--tolerance must be a number >= 0, got {tolerance}", field="tolerance")
    if not (math.isfinite(max_drift) and max_drift >= 0):
        raise UserError(f"--max-drift must be a number >= 0, got {max_drift}", field="max_drift")


def check(new: str, old: str, data: str | Path, *, model: str | None = None,
          dequantize: str = "auto", registry: str | Path | None = None,
          tasks: int = DEFAULT_TASKS, steps: int = DEFAULT_STEPS, ways: int = 5, shots: int = 5,
          query: int = 5, seed: int = 0, tolerance: float = DEFAULT_TOLERANCE,
          max_drift: float = DEFAULT_MAX_DRIFT, domains=None, exclude_domains=None,
          labels_from=None, exclude_labels=None, text_field: str = "text",
          label_field: str = "label", on_start: Callable[[int], None] | None = None,
          on_task: Callable[[int, dict], None] | None = None) -> DriftReport:
    """Registry version ``new`` against ``old`` (``NAME[@V]`` each) on probe tasks from
    ``data`` (see ``probe_tasks``), on base ``model`` (default: the embedded one)."""
    from metapeft.models import DEFAULT_MODEL, load_base_model
    from metapeft.registry import resolve

    check_thresholds(steps=steps, tolerance=tolerance, max_drift=max_drift)
    for spec, flag in ((new, "new"), (old, "against")):  # a missing version fails before work
        try:
            resolve(spec, registry)
        except UserError as e:
            e.field = flag
            raise
    probes = probe_tasks(data, tasks=tasks, ways=ways, shots=shots, query=query, seed=seed,
                         domains=domains, exclude_domains=exclude_domains,
                         labels_from=labels_from, exclude_labels=exclude_labels,
                         text_field=text_field, label_field=label_field)
    base = load_base_model(model or DEFAULT_MODEL, dequantize=dequantize)
    a = load_contender(new, base, registry, field="new")
    b = load_contender(old, base, registry, field="against")
    if on_start is not None:
        on_start(len(probes))
    return compare(a, b, probes, steps=steps, tolerance=tolerance, max_drift=max_drift,
                   seed=seed, data=str(data), registry=registry, on_task=on_task)


# ----------------------------------------------------------------------------- meta-train --gate

def candidates_dir(name: str, registry: str | Path | None = None) -> Path:
    """Where ``meta-train --gate`` keeps a candidate that failed the check (unpublished)."""
    from metapeft.registry import registry_root, validate_name

    return registry_root(registry) / "candidates" / validate_name(name)


@dataclass
class GatePlan:
    """What ``meta-train --gate`` checks its candidate against, settled before training (so a
    bad ``--gate-data`` fails at once): the current latest version of the name (None: the
    first version, nothing to check) and the fixed probe tasks."""

    name: str
    against: str | None  # NAME@V
    probes: list
    data: str
    steps: int
    tolerance: float
    max_drift: float
    seed: int
    registry: Any = None
    old: Contender | None = None  # the latest version, loaded on the run's base model

    def run(self, adapter, params: dict, *, lr: float, lr_from: str,
            lr_scales: dict | None = None, lr_decay: float = 0.0) -> DriftReport | None:
        """The candidate (``adapter`` with ``params``, adapted at ``lr``, with its per-layer
        multipliers ``lr_scales`` if any) against the latest version; None when there is none."""
        if self.against is None:
            return None
        old = self.old or load_contender(self.against, adapter.base, self.registry,
                                         field="gate")
        new = Contender(label=f"{self.name} (candidate)", adapter=adapter, params=params, lr=lr,
                        lr_from=lr_from, name=self.name, lr_scales=lr_scales,
                        lr_decay=lr_decay)
        report = compare(new, old, self.probes, steps=self.steps, tolerance=self.tolerance,
                         max_drift=self.max_drift, seed=self.seed, data=self.data,
                         registry=self.registry)
        report.rollback = None  # a candidate that fails is not published: nothing to undo
        return report

    def summary(self, report: DriftReport | None) -> dict:
        """What the published version (or the kept candidate) records about its check."""
        if report is None:
            return {"against": None, "passed": True,
                    "reason": f"no earlier version of {self.name}: nothing to check against"}
        return {"against": self.against, "passed": report.passed, "reasons": report.reasons,
                "data": self.data, "tasks": report.num_tasks, "steps": report.steps,
                "accuracy_new": report.accuracy_new["mean"],
                "accuracy_old": report.accuracy_old["mean"], "delta": report.delta,
                "drift": report.drift, "agreement": report.agreement,
                "tolerance": report.tolerance, "max_drift": report.max_drift}


def plan_gate(name: str, data: str | Path, *, registry: str | Path | None = None,
              adapter=None, tasks: int = DEFAULT_TASKS, steps: int = DEFAULT_STEPS,
              tolerance: float = DEFAULT_TOLERANCE, max_drift: float = DEFAULT_MAX_DRIFT,
              ways: int = 5, shots: int = 5, query: int = 5, seed: int = 0,
              **filters) -> GatePlan:
    """The gate of a ``meta-train --name NAME --gate`` run: the latest version of ``NAME`` and
    the probe tasks from ``data`` (``filters``: ``probe_tasks``' domain and label options).
    With the run's ``adapter``, the latest version is loaded on its base model now, so one of
    another method or base model is refused before any training."""
    from metapeft.registry import latest_version

    check_thresholds(steps=steps, tolerance=tolerance, max_drift=max_drift)
    latest = latest_version(name, registry)
    if latest is None:
        return GatePlan(name=name, against=None, probes=[], data=str(data), steps=steps,
                        tolerance=tolerance, max_drift=max_drift, seed=seed, registry=registry)
    probes = probe_tasks(data, tasks=tasks, ways=ways, shots=shots, query=query, seed=seed,
                         **filters)
    old = None
    if adapter is not None:
        old = load_contender(f"{name}@{latest}", adapter.base, registry, field="gate")
        if old.adapter.method != adapter.method:
            raise UserError(f"--gate: {old.label} is {old.adapter.method} meta-weights, this "
                            f"run trains {adapter.method}; gate against the same method (or "
                            "use another --name)", path=old.path, field="gate")
    return GatePlan(name=name, against=f"{name}@{latest}", probes=probes, data=str(data),
                    steps=steps, tolerance=tolerance, max_drift=max_drift, seed=seed,
                    registry=registry, old=old)


def keep_candidate(name: str, arrays: dict, metadata: dict, report: DriftReport,
                   registry: str | Path | None = None) -> Path:
    """Store a candidate that failed the gate, unpublished: ``candidates/NAME/ID.safetensors``
    (the meta-weights, with the metadata a version would have had) and ``ID.json`` (the
    check's report). Returns the weights file."""
    import datetime as dt
    import secrets

    from metapeft.artifacts import atomic_write_json, save_safetensors

    d = candidates_dir(name, registry)
    stamp = (f"{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}-"
             f"{secrets.token_hex(3)}")
    path = save_safetensors(d / f"{stamp}.safetensors", arrays,
                            {**metadata, "name": name, "candidate": True})
    atomic_write_json(d / f"{stamp}.json", report.to_json())
    return path

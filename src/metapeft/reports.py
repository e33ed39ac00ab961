"""What every ``metapeft.api`` call returns: one dataclass per command, each with ``to_json()``,
the exact object that the command's ``--json`` prints.

Some reports wrap a lower layer's result (``train.AdaptResult``, ``meta.run.MetaTrainResult``,
``tune.search.TuneResult``) in ``result`` and add what the run was (method, task sizes, name and
version, ...); the wrapped result's attributes read through, so ``report.accuracies`` is
``report.result.accuracies``. Importing this module is cheap: nothing here loads MLX.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metapeft.meta.learner import MetaConfig
    from metapeft.meta.run import MetaTrainResult
    from metapeft.meta.sources import MetaSources
    from metapeft.train import AdaptResult


def json_safe(obj):
    """JSON-safe: non-finite floats become null (in nested dicts and lists too)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


class _Wraps:
    """A report around a lower layer's ``result``: attributes the report does not define read
    through to it."""

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "result":
            raise AttributeError(name)
        return getattr(self.result, name)


@dataclass
class AdaptReport(_Wraps):
    """``adapt``: the training loop's ``AdaptResult`` (``params``, ``losses``, ``accuracies``,
    ``steps_to_target``, ``final_accuracy``, timings) plus the run's method, task sizes and
    adapter. ``extra`` holds the run's options and measurements (lr, objective, train_seconds,
    peak_memory_mb, tokens_per_second, trainable_parameters, task, labels, model, eval_steps)."""

    method: str
    result: AdaptResult
    num_support: int
    num_query: int
    adapter: Any = None
    extra: dict = field(default_factory=dict)

    JSON_KEYS = ("steps_to_target", "final_accuracy", "accuracies", "losses", "target_reached",
                 "num_support", "num_query", "seconds", "method")

    @classmethod
    def from_result(cls, result: AdaptResult, *, method: str, adapter, num_support: int,
                    num_query: int, **context) -> AdaptReport:
        """The one place a report is built from a training result: ``context`` (lr, task, model,
        ...) joins the result's measurements in ``extra``."""
        extra = {**context, "train_seconds": result.train_seconds,
                 "peak_memory_mb": result.peak_memory_mb,
                 "tokens_per_second": result.tokens_per_second,
                 "trainable_parameters": adapter.num_trainable(result.params),
                 "eval_steps": result.extra.get("eval_steps", [])}
        return cls(method=method, result=result, num_support=num_support, num_query=num_query,
                   adapter=adapter, extra=extra)

    def to_json(self) -> dict:
        """Exactly the documented keys of ``metapeft adapt --json``, plus ``decision`` for
        ``--method auto``, ``budget`` for ``--budget-seconds``, ``switches`` for ``--switch``,
        ``composition``/``route`` for a library init, ``library`` for ``--keep`` and
        ``init_choice`` (the init sources ranked) for ``--init auto`` and ``--method auto``,
        ``inner_lr_scales`` for an init with per-layer inner lrs, ``step_size`` when the init's
        calibration chose the lr for this run's length (``{lr, lr_decay, horizon, source}``)."""
        rounded = {"accuracies": [round(a, 6) for a in self.accuracies],
                   "losses": [round(v, 6) for v in self.losses], "seconds": round(self.seconds, 3)}
        # no query set (--query 0): final_accuracy is null, never NaN (which is not JSON)
        out = {k: rounded[k] if k in rounded else getattr(self, k) for k in self.JSON_KEYS}
        out.update({k: self.extra[k] for k in ("decision", "budget", "switches", "composition",
                                               "generation", "route", "library", "init_choice",
                                               "inner_lr_scales", "step_size")
                    if k in self.extra})
        return json_safe(out)


@dataclass
class MetaTrainReport(_Wraps):
    """``meta_train``: the published version (``name``, ``version``, ``path``) and the run's
    ``MetaTrainResult`` (curves, ``best_theta``, ``seconds``, ...). With ``gate``: the drift
    check's summary in ``extra["gate"]``; a candidate that failed it is not published
    (``version`` None, ``path`` the kept candidate, ``published`` False)."""

    name: str
    version: int
    path: str
    method: str
    algorithm: str
    vectorised: bool  # the meta-batch ran under mx.vmap (no fallback to a loop)
    result: MetaTrainResult
    sources: MetaSources
    adapter: Any = None
    config: MetaConfig | None = None

    @property
    def published(self) -> bool:
        """False when ``--gate`` kept the candidate unpublished."""
        return (self.result.extra.get("gate") or {}).get("passed", True)

    def to_json(self) -> dict:
        """Exactly the keys of ``metapeft meta-train --json``, plus ``gate`` and ``published``
        with ``--gate``, and ``parent``, ``forgetting``, ``gain``, ``continual`` and
        ``distance_to_parent`` with ``--init``."""
        r = self.result
        out = {"name": self.name, "version": self.version, "path": self.path,
               "method": self.method, "algorithm": self.algorithm, "meta_steps": r.steps_done,
               "best_step": r.best_step, "meta_loss": r.meta_losses,
               "meta_accuracy": r.meta_accuracies, "val_steps": r.val_steps,
               "val_accuracy": r.val_accuracies, "seconds": round(r.seconds, 3),
               "vectorised": self.vectorised,
               "adapt_lr": (r.extra.get("adapt_lr") or {}).get("adapt_lr")}
        if "gate" in r.extra:
            out.update(gate=json_safe(r.extra["gate"]), published=self.published)
        if "continual" in r.extra:  # meta-train --init: the parent, forgetting and gain
            c = r.extra["continual"]
            out.update(parent=c["parent"], forgetting=json_safe(c["forgetting"]),
                       gain=json_safe(c["gain"]), continual=json_safe(c["settings"]),
                       distance_to_parent=c["distance_to_parent"])
        return out


@dataclass
class ProfileReport:
    """``profile``: a task's feature vector (``select.features.FEATURE_NAMES``) and domain."""

    task: str
    domain: str
    features: dict
    model: str

    def to_json(self) -> dict:
        return {"task": self.task, "domain": self.domain, "features": self.features}


@dataclass
class SelectReport:
    """``select``: the methods ranked for a task, the nearest past tasks, and where the answer
    came from (``source``: a trained selector, one trained now from experience, or priors)."""

    task: str
    features: dict
    ranking: list
    similar_tasks: list
    source: str
    reason: str
    init_sources: dict | None = None  # the top method's init sources ranked (init_sources.py)

    @property
    def from_priors(self) -> bool:
        return self.source == "priors"

    def to_json(self) -> dict:
        """Exactly the documented keys of ``metapeft select --json``."""
        from metapeft.init_sources import public_json as init_json
        from metapeft.select.selector import public_json

        return {**public_json({"features": self.features, "ranking": self.ranking,
                               "similar_tasks": self.similar_tasks}),
                "init_sources": init_json(self.init_sources)}


@dataclass
class SweepReport:
    """``sweep``: how many tasks and records, the runs that failed, and per task its domain,
    features and each method's final accuracy."""

    tasks: int
    records: int
    failures: list
    results: list
    experience: str
    init_sources: dict | None = None  # --init-sources: per method what ran and what could not

    def best_method_counts(self) -> list[tuple[str, int]]:
        """(method, tasks it won), most wins first."""
        wins = Counter(max(r["accuracy"], key=r["accuracy"].get)
                       for r in self.results if r["accuracy"])
        return wins.most_common()

    def to_json(self) -> dict:
        return {"tasks": self.tasks, "records": self.records, "failures": self.failures,
                "experience": self.experience,
                "results": [{k: r[k] for k in ("task", "domain", "accuracy")}
                            for r in self.results],
                **({} if self.init_sources is None else {"init_sources": self.init_sources})}


@dataclass
class SelectorReport:
    """``train_selector``: what the selector was trained on and the files it wrote."""

    tasks: int
    records: int
    methods: list
    temperature: float
    embedder_loss: float | None
    paths: dict  # {"embedder": Path, "selector": Path}
    selector: Any = None

    def to_json(self) -> dict:
        return {"tasks": self.tasks, "records": self.records, "methods": self.methods,
                "temperature": self.temperature, "embedder_loss": self.embedder_loss,
                **{k: str(v) for k, v in self.paths.items()}}


@dataclass
class TuneReport(_Wraps):
    """``tune``: the ``TuneResult`` (``study``, ``summary``, ``experience_records``,
    ``warm_points``) and the plot written, if one was asked for and matplotlib is installed."""

    result: Any  # tune.search.TuneResult (not imported: tune.search runs adapt, which needs us)
    plot: Path | None = None

    def to_json(self) -> dict:
        """``{pareto, recommended, trials}``, non-finite numbers as null."""
        s = self.summary
        return json_safe({k: s[k] for k in ("pareto", "recommended", "trials")})


@dataclass
class ExperienceListing:
    """``list_experience``: the store's path, its record count and the records shown."""

    path: Path
    total: int
    records: list

    def to_json(self) -> list:
        from metapeft.select.features import FEATURE_NAMES

        return [r.to_json(FEATURE_NAMES) for r in self.records]


@dataclass
class ExperienceStatsReport:
    """``experience_stats``: per group of records (``by``), the run count, success rate (target
    reached), mean and median steps to target and mean final accuracy, with how many records
    each statistic used (``experience.experience_stats``)."""

    path: Path
    stats: dict

    def to_json(self) -> dict:
        return json_safe({"experience": str(self.path), **self.stats})


@dataclass
class PredictReport:
    """``predict``: one prediction per input row, in input order (``predictions``: the text or
    the row's id, the label, the probabilities), and where they were written (``out``)."""

    adapter: str
    model: str
    labels: list
    predictions: list
    seconds: float
    out: Path | None = None

    def lines(self) -> list[dict]:
        """What ``metapeft predict`` writes: one JSON object per input."""
        return self.predictions

    def to_json(self) -> dict:
        """The summary ``metapeft predict --out FILE --json`` prints."""
        counts = Counter(p["label"] for p in self.predictions)
        return {"adapter": self.adapter, "model": self.model, "labels": self.labels,
                "count": len(self.predictions), "out": None if self.out is None else str(self.out),
                "predicted": {lab: counts[lab] for lab in self.labels if counts[lab]},
                "seconds": round(self.seconds, 3)}


@dataclass
class EvaluateReport:
    """``evaluate``: ``metrics.classification_metrics`` of an adapter on a labelled file (accuracy,
    macro/micro and per-class precision/recall/F1, confusion matrix, ECE over 15 equal-width
    bins, reliability table), and the PNGs written for ``plot``."""

    adapter: str
    test: str
    model: str
    metrics: dict
    seconds: float
    plots: dict = field(default_factory=dict)  # name -> Path

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]

    def to_json(self) -> dict:
        return json_safe({"adapter": self.adapter, "test": self.test, "model": self.model,
                          **self.metrics, "plots": {k: str(v) for k, v in self.plots.items()},
                          "seconds": round(self.seconds, 3)})

"""Bayesian hyperparameter search over PEFT configurations (``metapeft tune``).

The optimiser is scikit-optimize's ``Optimizer(base_estimator="GP")`` driven by ask/tell; no
surrogate is hand-written here.

Multiple objectives (ParEGO, Knowles 2006). The objectives are query accuracy (maximised),
training seconds and peak memory (minimised). Before every suggestion a weight vector λ is drawn
uniformly on the simplex (seeded by the study seed and the trial number, so a resumed study
draws the same λ's), every observation so far is normalised to [0, 1] per objective (0 = best
observed, 1 = worst), scalarised with the augmented Chebyshev function
``max_j λ_j z_j + 0.05 Σ_j λ_j z_j`` and told to a *fresh* skopt Optimizer: the scalarised values
of old points change with λ, and skopt's ``tell`` cannot revise values it was told, so the
Optimizer is rebuilt (same ``random_state``, hence the same space-filling initial design) and all
points are re-told at each ask. ``--objectives accuracy`` is a plain single-objective search on
``1 - accuracy``. Rebuilding costs one GP fit per trial (milliseconds to a second for a few dozen
points, negligible against a training run).

Failed trials (NaN loss, an invalid configuration, out of memory) are kept with status "failed"
and their reason. They are told to skopt as the worst possible outcome: normalised objective
vector (1, ..., 1), i.e. as bad as the worst observed value of every objective (single
objective: the worst observed value, or accuracy 0), so the GP learns to avoid that region
without the huge values that a fixed penalty would put into its fit. They never enter the front.

Start of a study: (1) warm start: the best configurations of the k most similar tasks in the
experience store (``warm_start_points``; records measured on this very task are told to the GP
as x0/y0 without being re-run), (2) the configs/default.yaml defaults of every method in the
study, then (3) skopt's Latin-hypercube initial design (``initial_point_generator="lhs"``) until
``n_initial`` points are known, then GP + expected improvement. A suggestion identical to an
evaluated point is replaced by a random point (an evaluation budget is too precious to repeat).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from metapeft.errors import UserError
from metapeft.tune import pareto as par
from metapeft.tune.space import (STRUCTURAL, SearchSpace, expand_option, load_defaults,
                                 load_space, split_params)

FORMAT = "metapeft-study"
SCHEMA = 1
# name -> (sense, trial key)
OBJECTIVES: dict[str, tuple[str, str]] = {"accuracy": ("max", "accuracy"),
                                          "seconds": ("min", "seconds"),
                                          "memory": ("min", "memory_mb")}
ALL_OBJECTIVES = ("accuracy", "seconds", "memory")
FAILURES = (UserError, FloatingPointError, MemoryError, ValueError, RuntimeError, OverflowError)


def parse_objectives(spec: str | list[str] | None) -> list[str]:
    if spec is None:
        return list(ALL_OBJECTIVES)
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise UserError("no objectives given", field="objectives")
    out = []
    for s in items:
        s = {"acc": "accuracy", "time": "seconds", "mem": "memory"}.get(s, s)
        if s not in OBJECTIVES:
            raise UserError(f"unknown objective {s!r}; choose from {', '.join(ALL_OBJECTIVES)}",
                            field="objectives")
        if s not in out:
            out.append(s)
    return out


def studies_dir(registry=None) -> Path:
    from metapeft.registry import registry_root

    return registry_root(registry) / "studies"


def study_path(name: str, registry=None) -> Path:
    """``NAME`` -> ``<registry root>/studies/NAME.safetensors``; a path is used as is."""
    from metapeft.registry import validate_name

    if "/" in name or name.endswith(".safetensors"):
        return Path(name).expanduser()
    try:
        validate_name(name)
    except UserError:
        raise UserError(f"invalid study name {name!r}: use letters, digits, '.', '_' and '-'",
                        field="name") from None
    return studies_dir(registry) / f"{name}.safetensors"


# ------------------------------------------------------------------------------- scalarising

def objective_matrix(trials: list[dict], objectives: list[str]) -> np.ndarray:
    """(n, len(objectives)) in the trials' units; NaN rows for failed trials."""
    rows = []
    for t in trials:
        if t.get("status") == "failed":
            rows.append([math.nan] * len(objectives))
        else:
            rows.append([_f(t.get(OBJECTIVES[o][1])) for o in objectives])
    return np.asarray(rows, dtype=np.float64).reshape(len(trials), len(objectives))


def _f(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def scalarise(points: np.ndarray, senses: list[str], weights) -> np.ndarray:
    """The values told to skopt (smaller is better) for ``points`` (NaN rows = failed).

    One objective: the minimisation form (accuracy -> 1 - accuracy); a failed point gets the worst
    finite value (or 1.0 when none). Several: ParEGO's augmented Chebyshev of the points
    normalised over the finite rows, failed rows at the nadir (1, ..., 1).
    """
    points = np.asarray(points, dtype=np.float64)
    finite = np.all(np.isfinite(points), axis=1) if len(points) else np.zeros(0, bool)
    if len(senses) == 1:
        y = points[:, 0].copy()
        if senses[0] == "max":
            y = 1.0 - y  # accuracy in [0, 1]
        worst = float(np.max(y[finite])) if finite.any() else 1.0
        y[~finite] = max(worst, 1.0) if senses[0] == "max" else worst
        return y
    z = par.normalise(points, senses)
    z[~finite] = 1.0
    return par.chebyshev(z, weights)


# ------------------------------------------------------------------------------- warm start

def _experience_module():
    try:
        import metapeft.experience as exp
    except ImportError:
        return None
    return exp if hasattr(exp, "ExperienceStore") else None


def experience_path(registry=None) -> Path | None:
    from metapeft.registry import registry_root

    return registry_root(registry) / "experience.safetensors"


def _task_features(task, base):
    try:
        from metapeft.select.features import feature_vector, task_features
    except ImportError:
        return None
    try:
        return feature_vector(task_features(task, base))
    except Exception:  # features are a nicety for warm start, never a reason to fail a study
        return None


def warm_start_points(task, methods: list[str], k: int = 3, *, base=None, registry=None,
                      features: list[float] | None = None) -> list[dict]:
    """Seed configurations from the experience store, or [] when there is none.

    Returns ``[{"method", "params": {lr, option: value}, "source": "warm", "task", "distance",
    ["objectives": {"accuracy", "seconds", "memory_mb"}]}]``: for each of the ``k`` past tasks
    most similar to ``task`` (z-scored feature distance; the selector's embedder when it offers
    ``similar_tasks``), the best-accuracy record of every study method. Records of this very
    task (same name and features) carry their measured ``objectives`` (told as x0/y0).
    Feature-detected: without ``metapeft.experience`` (or with an empty store) returns [].
    """
    exp = _experience_module()
    if exp is None or k <= 0:
        return []
    try:
        store = exp.ExperienceStore(experience_path(registry))
        if not store.exists():
            return []
        records = [r for r in store.load() if r.method in methods
                   and math.isfinite(_f(r.final_accuracy))]
        if not records:
            return []
        if features is None:
            features = _task_features(task, base)
        if features is None:
            return []
        feats = np.asarray([r.features for r in records], dtype=np.float64)
        mu, sd = feats.mean(axis=0), feats.std(axis=0)
        sd = np.where(sd > 1e-9, sd, 1.0)
        q = (np.asarray(features, dtype=np.float64) - mu) / sd
        dist = np.sqrt((((feats - mu) / sd - q) ** 2).sum(axis=1))
        by_task: dict[str, float] = {}
        for r, d in zip(records, dist):
            by_task[r.task] = min(by_task.get(r.task, math.inf), float(d))
        name = getattr(task, "name", None)
        same = [t for t, d in by_task.items() if t == name and d < 1e-6]
        others = sorted((d, t) for t, d in by_task.items() if t not in same)[:k]
        out: list[dict] = []
        for tname, dist_t in [(t, 0.0) for t in same] + [(t, d) for d, t in others]:
            for m in methods:
                recs = [r for r in records if r.task == tname and r.method == m]
                if not recs:
                    continue
                if tname in same:  # every measured config of this task is a free observation
                    chosen = recs
                else:
                    chosen = [max(recs, key=lambda r: r.final_accuracy)]
                for r in chosen:
                    hp = dict(r.hyperparameters or {})
                    hp.pop("objective", None)
                    hp.pop("steps", None)
                    pt = {"method": m, "params": hp, "source": "warm", "task": tname,
                          "distance": round(dist_t, 4)}
                    if tname in same:
                        pt["objectives"] = {"accuracy": float(r.final_accuracy),
                                            "seconds": _f(r.seconds),
                                            "memory_mb": _f(r.peak_memory_mb)}
                    out.append(pt)
        return out
    except Exception:  # a broken/foreign store must not stop a study
        return []


def record_experience(report, task, *, registry=None, features=None, base=None,
                      hyperparameters=None) -> bool:
    """Append a finished trial to the experience store when ``metapeft.experience`` exists."""
    exp = _experience_module()
    if exp is None or not hasattr(exp, "record_adapt"):
        return False
    try:
        exp.record_adapt(report, task, features, source="tune", base=base,
                         store=exp.ExperienceStore(experience_path(registry)),
                         hyperparameters=hyperparameters)
        return True
    except Exception:
        return False


# ------------------------------------------------------------------------------- the study

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def config_defaults(method: str, defaults: dict) -> dict:
    """Config dataclass defaults overlaid with configs/default.yaml's options for ``method``."""
    from metapeft.adapters import get_adapter_class

    out = {}
    for f in dataclasses.fields(get_adapter_class(method).Config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    out.update(defaults.get("methods", {}).get(method, {}))
    return out


@dataclass
class Study:
    """A study's settings and trials, saved as one safetensors file after every trial."""

    name: str
    path: Path
    space: SearchSpace
    objectives: list[str]
    task: dict
    model: str = "tiny"
    steps: int = 20
    seed: int = 0
    n_initial: int = 5
    acq_func: str = "EI"
    init: str | None = None
    defaults: dict = field(default_factory=dict)
    trials: list[dict] = field(default_factory=list)
    created: str = field(default_factory=_now)

    @property
    def senses(self) -> list[str]:
        return [OBJECTIVES[o][0] for o in self.objectives]

    # -------------------------------------------------------------------------- persistence
    def metadata(self) -> dict:
        return {"format": FORMAT, "schema": SCHEMA, "name": self.name,
                "objectives": self.objectives, "task": self.task, "model": self.model,
                "steps": self.steps, "seed": self.seed, "n_initial": self.n_initial,
                "acq_func": self.acq_func, "init": self.init, "space": self.space.to_dict(),
                "defaults": self.defaults, "trials": self.trials,
                "num_trials": len(self.trials), "created": self.created, "updated": _now()}

    def save(self) -> Path:
        from metapeft.artifacts import save_safetensors

        n = len(self.trials)
        objs = objective_matrix(self.trials, list(ALL_OBJECTIVES)).astype(np.float32)
        status = np.asarray([{"ok": 0, "failed": 1, "prior": 2}.get(t.get("status"), 1)
                             for t in self.trials], dtype=np.int32)
        arrays = {"objectives": objs if n else np.full((1, 3), np.nan, np.float32),
                  "status": status if n else np.full((1,), -1, np.int32)}
        return save_safetensors(self.path, arrays, self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> "Study":
        from metapeft.artifacts import json_field, read_metadata

        path = Path(path)
        meta = read_metadata(path)
        if json_field(meta, "format") != FORMAT:
            raise UserError("not a metapeft study file", path=str(path), field="format")
        get = lambda k, d=None: json_field(meta, k, d)  # noqa: E731
        try:
            return cls(name=get("name"), path=path, space=SearchSpace.from_dict(get("space")),
                       objectives=list(get("objectives")), task=get("task") or {},
                       model=get("model", "tiny"), steps=int(get("steps", 20)),
                       seed=int(get("seed", 0)), n_initial=int(get("n_initial", 5)),
                       acq_func=get("acq_func", "EI"), init=get("init"),
                       defaults=get("defaults") or {}, trials=list(get("trials") or []),
                       created=get("created") or _now())
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"corrupt study metadata: {e}", path=str(path)) from None

    # -------------------------------------------------------------------------- analysis
    def points(self, trials: list[dict] | None = None) -> np.ndarray:
        return objective_matrix(self.trials if trials is None else trials, self.objectives)

    def measured(self) -> list[int]:
        """Indices of trials run in this study that finished (the candidates for the front)."""
        return [i for i, t in enumerate(self.trials) if t.get("status") == "ok"]

    def pareto(self) -> list[int]:
        idx = self.measured()
        if not idx:
            return []
        pts = self.points([self.trials[i] for i in idx])
        front = par.non_dominated(pts, self.senses)
        return [idx[i] for i in front]

    def recommended(self) -> int | None:
        """The knee of the front (single objective: the best, ties to fewer seconds)."""
        front = self.pareto()
        if not front:
            return None
        if len(self.objectives) == 1:
            s = 1.0 if self.senses[0] == "max" else -1.0
            return max(front, key=lambda i: (s * _f(self.trials[i].get(
                OBJECTIVES[self.objectives[0]][1])), -_f(self.trials[i].get("seconds"))))
        pts = self.points([self.trials[i] for i in front])
        k = par.knee_point(pts, self.senses, list(range(len(front))))
        return front[k]

    def hypervolume(self, ref_seconds: float | None = None) -> float:
        """Area of the accuracy/seconds front (ref: accuracy 0, seconds ``ref_seconds`` or
        1.1 x the slowest finished trial)."""
        idx = self.measured()
        if not idx:
            return 0.0
        pts = objective_matrix([self.trials[i] for i in idx], ["accuracy", "seconds"])
        ref = ref_seconds if ref_seconds is not None else 1.1 * float(np.nanmax(pts[:, 1]))
        return par.hypervolume_2d(pts, ["max", "min"], [0.0, ref])

    def told(self, weights) -> tuple[list[list], list[float]]:
        """(xs, ys) of every trial, scalarised with ``weights``."""
        xs = [t["x"] for t in self.trials]
        if not xs:
            return [], []
        ys = scalarise(self.points(), self.senses, weights)
        return xs, [float(y) for y in ys]

    # -------------------------------------------------------------------------- suggestions
    def weights(self, n: int) -> np.ndarray:
        rng = np.random.default_rng([int(self.seed), int(n)])
        return par.simplex_weights(len(self.objectives), rng)

    def initial_queue(self, warm: list[dict]) -> list[dict]:
        """Warm-start points, then each method's defaults (those not yet evaluated)."""
        queue: list[dict] = []
        for w in warm:
            if w["method"] in self.space.methods:
                queue.append({"method": w["method"], "params": dict(w["params"]),
                              "source": w.get("source", "warm"),
                              "objectives": w.get("objectives"), "from_task": w.get("task")})
        for m in self.space.methods:
            d = config_defaults(m, self.defaults)
            keys = set(self.space.params[m]) | {"lr"}
            params = {k: d[k] for k in keys if k in d}
            params.update(self.space.fixed.get(m, {}))
            if "lr" not in params:
                from metapeft.api import DEFAULT_LR

                params["lr"] = DEFAULT_LR.get(m, 1e-3)
            queue.append({"method": m, "params": params, "source": "default"})
        seen = {json.dumps(t["x"]) for t in self.trials}
        out = []
        for q in queue:
            q["x"] = self.space.clean(self.space.encode(q["method"], q["params"]))
            key = json.dumps(q["x"])
            if key not in seen:
                seen.add(key)
                out.append(q)
        return out

    def ask(self) -> dict:
        """The next point from skopt: {"method", "params", "x", "source", "weights"}."""
        from skopt import Optimizer

        n = len(self.trials)
        w = self.weights(n)
        xs, ys = self.told(w)
        dims = self.space.dimensions()
        opt = Optimizer(dims, base_estimator="GP", acq_func=self.acq_func,
                        n_initial_points=self.n_initial, initial_point_generator="lhs",
                        random_state=int(self.seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if xs:
                opt.tell([list(x) for x in xs], ys)
            x = self.space.clean(opt.ask())
        source = "lhs" if len(xs) < self.n_initial else "bo"
        seen = {json.dumps(t["x"]) for t in self.trials}
        attempt = 0
        while json.dumps(x) in seen and attempt < 20:
            x = self.space.random_points(1, seed=int(self.seed) * 1000 + n * 37 + attempt)[0]
            source, attempt = "random", attempt + 1
        method, params = self.space.decode(x)
        return {"method": method, "params": params, "x": x, "source": source,
                "weights": [round(float(v), 6) for v in w]}

    # -------------------------------------------------------------------------- running
    def run(self, evaluate: Callable[[str, dict], dict], *, trials: int,
            time_budget: float | None = None, warm: list[dict] | None = None,
            on_trial: Callable[["Study", dict], None] | None = None,
            on_start: Callable[["Study", dict], None] | None = None) -> "Study":
        """Evaluate until ``trials`` trials (in total, including earlier sessions) exist or
        ``time_budget`` seconds of this session have passed (no new trial starts after it).

        ``evaluate(method, params)`` returns ``{"accuracy", "seconds", "memory_mb", ...}`` or
        raises; the study is saved after every trial.
        """
        t0 = time.perf_counter()
        queue = self.initial_queue(warm or [])
        # measured-on-this-task warm records are observations, not evaluations
        for q in [q for q in queue if q.get("objectives")]:
            obj = q["objectives"]
            if not all(math.isfinite(_f(obj.get(OBJECTIVES[o][1]))) for o in self.objectives):
                continue  # not fully measured: evaluate it like any warm point
            queue.remove(q)
            self.trials.append({"index": len(self.trials), "method": q["method"],
                                "params": q["params"], "x": q["x"], "source": "experience",
                                "status": "prior", "reason": "measured earlier on this task "
                                "(experience store); told to the GP, not re-run",
                                "accuracy": obj.get("accuracy"), "seconds": obj.get("seconds"),
                                "memory_mb": obj.get("memory_mb")})
        while len([t for t in self.trials if t.get("status") != "prior"]) < trials:
            if time_budget is not None and time.perf_counter() - t0 >= time_budget:
                break
            if queue:
                q = queue.pop(0)
                sug = {"method": q["method"], "params": q["params"], "x": q["x"],
                       "source": q["source"], "weights": None}
                if q.get("from_task"):
                    sug["from_task"] = q["from_task"]
            else:
                sug = self.ask()
            trial = {"index": len(self.trials), **sug, "status": "running"}
            if on_start is not None:
                on_start(self, trial)
            start = time.perf_counter()
            try:
                res = evaluate(sug["method"], dict(sug["params"]))
                acc = _f(res.get("accuracy"))
                if not math.isfinite(acc):
                    raise FloatingPointError(f"query accuracy is {acc}")
                trial.update(status="ok", reason=None, **res)
            except FAILURES as e:
                msg = e.one_line() if isinstance(e, UserError) else str(e)
                trial.update(status="failed", reason=f"{type(e).__name__}: {msg}"[:500],
                             accuracy=None, seconds=None, memory_mb=None)
            trial["wall_seconds"] = round(time.perf_counter() - start, 3)
            self.trials.append(trial)
            self.save()
            if on_trial is not None:
                on_trial(self, trial)
        return self

    # -------------------------------------------------------------------------- reporting
    def trial_json(self, t: dict) -> dict:
        keys = ("index", "method", "params", "config", "lr", "steps", "accuracy", "seconds",
                "memory_mb", "trainable_parameters", "status", "reason", "source")
        return {k: t.get(k) for k in keys}

    def summary(self) -> dict:
        front = self.pareto()
        rec = self.recommended()
        return {"study": self.name, "path": str(self.path), "objectives": self.objectives,
                "pareto": [self.trial_json(self.trials[i]) for i in front],
                "recommended": self.trial_json(self.trials[rec]) if rec is not None else None,
                "hypervolume_accuracy_seconds": round(self.hypervolume(), 6),
                "trials": [self.trial_json(t) for t in self.trials]}


# ------------------------------------------------------------------------------- evaluation

def adapt_evaluator(task, *, model: str, steps: int, defaults: dict, init: str | None = None,
                    init_method: str | None = None, seed: int = 0, batch_size: int = 64,
                    on_report: Callable | None = None, adapt_fn: Callable | None = None,
                    compile: bool = False):
    """``evaluate(method, params)`` running ``api.adapt`` on ``task`` with that configuration.

    Options not searched keep configs/default.yaml's values; ``lr``/``steps`` go to adapt.

    ``compile=False`` (the default) runs trials under ``mx.disable_compile()``: MLX's CPU
    backend JIT-builds fused kernels for every new configuration (about 5 s each on our Linux
    machine, then cached), so with compilation the "seconds" objective would measure the kernel
    cache rather than the configuration. Uncompiled steps cost about the same on the tiny model.
    """

    def evaluate(method: str, params: dict) -> dict:
        from metapeft import api

        train, opts = split_params(params)
        base_opts = {k: v for k, v in defaults.get("methods", {}).get(method, {}).items()
                     if k != "lr"}
        config = {k: expand_option(method, k, v) for k, v in {**base_opts, **opts}.items()}
        n_steps = int(train.get("steps", steps))
        lr = train.get("lr")
        fn = adapt_fn or api.adapt
        import mlx.core as mx

        if not compile:
            mx.disable_compile()
        try:
            # only the final accuracy is an objective: evaluating the query set after every
            # step (adapt's default) made a 10-step trial ~2x slower
            report = fn(task, model=model, method=method, steps=n_steps, target=None,
                        init=init if (init and method == init_method) else None, config=config,
                        lr=lr, seed=seed, batch_size=batch_size, eval_at={n_steps})
        finally:
            if not compile:
                mx.enable_compile()
        ex = report.extra or {}
        out = {"accuracy": float(report.final_accuracy),
               "seconds": round(float(ex.get("train_seconds", report.seconds)), 4),
               "memory_mb": round(_f(ex.get("peak_memory_mb")), 3),
               "total_seconds": float(report.seconds),
               "trainable_parameters": ex.get("trainable_parameters"),
               "lr": ex.get("lr", lr), "steps": n_steps, "config": json.loads(
                   json.dumps(config, default=str))}
        if not math.isfinite(out["memory_mb"]):
            out["memory_mb"] = 0.0  # backends without a peak-memory counter
        if on_report is not None:
            on_report(report, method, params)
        return out

    return evaluate


@dataclass
class TuneResult:
    study: Study
    summary: dict
    experience_records: int = 0
    warm_points: int = 0


def _init_method_and_config(init: str, registry=None) -> tuple[str | None, dict]:
    from metapeft.artifacts import json_field, read_metadata

    p = Path(init)
    if p.is_dir():
        p = p / "adapters.safetensors"
    if not p.exists():
        from metapeft.registry import resolve

        p = resolve(init, registry)
    meta = read_metadata(p)
    cfg = json_field(meta, "config") or {}
    return json_field(meta, "method"), cfg if isinstance(cfg, dict) else {}


def tune(task, *, model: str = "tiny", methods: list[str] | str | None = None,
         trials: int = 20, time_budget: float | None = None, steps: int | None = None,
         objectives: str | list[str] | None = None, init: str | None = None,
         name: str | None = None, resume: str | None = None, registry=None,
         space_file: str | Path | None = None, seed: int = 0, n_initial: int | None = None,
         acq_func: str = "EI", warm_start: bool = True, k: int = 3, record: bool = True,
         shots: int | None = None, query: int | None = None, ways: int | None = None,
         text_field: str = "text", label_field: str = "label", batch_size: int = 64,
         compile: bool = False, on_trial=None, on_start=None, adapt_fn=None,
         evaluate=None) -> TuneResult:
    """Run (or resume) a study; returns the study and its summary (pareto/recommended/trials).

    ``trials`` is the total number of evaluated trials the study should have; a resumed study
    keeps its space, objectives, task, model, steps and seed and only runs the missing trials.
    """
    from metapeft import api

    if trials < 1:
        raise UserError(f"trials must be >= 1, got {trials}", field="trials")
    if time_budget is not None and time_budget <= 0:
        raise UserError(f"time budget must be > 0 seconds, got {time_budget}",
                        field="time_budget")
    if acq_func not in ("EI", "PI", "LCB", "gp_hedge"):
        raise UserError(f"acq_func must be EI, PI, LCB or gp_hedge, got {acq_func!r}",
                        field="acq_func")
    if resume:
        path = study_path(resume, registry)
        if not path.exists():
            raise UserError("no such study to resume", path=str(path), field="resume")
        study = Study.load(path)
        t = study.task
        if task is None and t.get("in_memory"):
            raise UserError(f"study {study.name!r} was run on an in-memory task; pass the task "
                            "again to resume it", field="task")
        task_obj = api.load_task_arg(task if task is not None else t.get("task"),
                                     shots=t.get("shots"), query=t.get("query"),
                                     ways=t.get("ways"), seed=t.get("seed", 0),
                                     text_field=t.get("text_field", "text"),
                                     label_field=t.get("label_field", "label"))
    else:
        if not name:
            raise UserError("a study needs a name (--name)", field="name")
        path = study_path(name, registry)
        if path.exists():
            raise UserError(f"study {name!r} exists; continue it with --resume {name} or pick "
                            "another --name", path=str(path), field="name")
        objs = parse_objectives(objectives)
        space = load_space(space_file, methods)
        defaults = load_defaults()
        task_obj = api.load_task_arg(task, shots=shots, query=query, ways=ways, seed=seed,
                                     text_field=text_field, label_field=label_field)
        init_method = None
        if init:
            init_method, init_cfg = _init_method_and_config(init, registry)
            if init_method in space.methods:
                space.fix(init_method, {k: v for k, v in init_cfg.items()
                                        if k in STRUCTURAL.get(init_method, ())})
        n_init = n_initial if n_initial is not None else max(3, min(10, trials // 3))
        study = Study(name=name if "/" not in name else path.stem, path=path, space=space,
                      objectives=objs,
                      task={"task": str(task) if not hasattr(task, "support") else task.name,
                            "name": task_obj.name, "shots": shots, "query": query,
                            "ways": ways, "seed": seed, "text_field": text_field,
                            "label_field": label_field, "init_method": init_method,
                            "in_memory": hasattr(task, "support")},
                      model=model, steps=int(steps if steps is not None else defaults["steps"]),
                      seed=seed, n_initial=n_init, acq_func=acq_func, init=init,
                      defaults=defaults)
    base = None
    features = None
    exp = _experience_module()
    if exp is not None and (record or warm_start) and evaluate is None:
        from metapeft.models import load_base_model

        base = load_base_model(study.model)
        features = _task_features(task_obj, base)
    warm = (warm_start_points(task_obj, study.space.methods, k, base=base, registry=registry,
                              features=features) if warm_start and not study.trials else [])
    counter = {"n": 0}

    def on_report(report, method, params):
        if record and features is not None:
            hp = {"lr": report.extra.get("lr"), "steps": len(report.losses)}
            try:
                hp.update(report.adapter.config.to_dict())
            except Exception:
                pass
            if record_experience(report, task_obj, registry=registry, features=features,
                                 base=base, hyperparameters=json.loads(json.dumps(hp,
                                                                                  default=str))):
                counter["n"] += 1

    if evaluate is None:
        evaluate = adapt_evaluator(task_obj, model=study.model, steps=study.steps,
                                   defaults=study.defaults, init=study.init,
                                   init_method=study.task.get("init_method"), seed=study.seed,
                                   batch_size=batch_size, on_report=on_report,
                                   adapt_fn=adapt_fn, compile=compile)
    if not study.trials:
        study.save()
    study.run(evaluate, trials=trials, time_budget=time_budget, warm=warm, on_trial=on_trial,
              on_start=on_start)
    return TuneResult(study=study, summary=study.summary(), experience_records=counter["n"],
                      warm_points=len(warm))


def plot_study(study: Study, out: str | Path) -> Path | None:
    """PNG: the accuracy/seconds front and best accuracy so far against trials; None when
    matplotlib (the ``plot`` extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = study.measured()
    front = set(study.pareto())
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [study.trials[i]["seconds"] for i in ok]
    ys = [study.trials[i]["accuracy"] for i in ok]
    a1.scatter(xs, ys, c="lightgray", label="trials")
    fr = sorted(front, key=lambda i: study.trials[i]["seconds"])
    a1.plot([study.trials[i]["seconds"] for i in fr], [study.trials[i]["accuracy"] for i in fr],
            "o-", c="tab:red", label="Pareto front")
    rec = study.recommended()
    if rec is not None:
        a1.scatter([study.trials[rec]["seconds"]], [study.trials[rec]["accuracy"]], s=160,
                   marker="*", c="gold", edgecolors="k", zorder=5, label="recommended")
    a1.set_xlabel("training seconds")
    a1.set_ylabel("query accuracy")
    a1.legend()
    best, curve = -math.inf, []
    for t in study.trials:
        if t.get("status") == "ok":
            best = max(best, _f(t.get("accuracy")))
        curve.append(best if math.isfinite(best) else math.nan)
    a2.plot(range(1, len(curve) + 1), curve, "o-")
    a2.set_xlabel("trial")
    a2.set_ylabel("best accuracy so far")
    fig.suptitle(f"study {study.name}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

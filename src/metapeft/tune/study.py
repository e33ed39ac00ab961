"""A study: its settings and trials, the ask/tell loop over them, and its file.

The optimiser is scikit-optimize's ``Optimizer(base_estimator="GP")`` driven by ask/tell; no
surrogate is hand-written here.

Multiple objectives (ParEGO, Knowles 2006; ``pareto.scalarise``). The objectives are query
accuracy (maximised), training seconds and peak memory (minimised). Before every suggestion a
weight vector λ is drawn uniformly on the simplex, seeded by the study seed and the trial number,
so a resumed study draws the same λ's. Every observation is scalarised with it and told to a
*fresh* skopt Optimizer: the scalarised values of old points change with λ, and skopt's ``tell``
cannot revise values it was told, so the Optimizer is rebuilt (same ``random_state``, hence the
same space-filling initial design) and all points are re-told at each ask. ``--objectives
accuracy`` is a plain single-objective search on ``1 - accuracy``. Rebuilding costs one GP fit per
trial (milliseconds to a second for a few dozen points, negligible against a training run).

Failed trials (NaN loss, an invalid configuration, out of memory) are kept with status "failed"
and their reason. They are told to skopt as the worst possible outcome: normalised objective
vector (1, ..., 1), i.e. as bad as the worst observed value of every objective (single
objective: the worst observed value, or accuracy 0), so the GP learns to avoid that region
without the huge values that a fixed penalty would put into its fit. They never enter the front.

Start of a study: (1) the warm-start points (``tune.warm_start``; records measured on this very
task are told to the GP as observations without being re-run), (2) each method's defaults, the
configuration ``metapeft adapt`` runs without options (``SearchSpace.default_params``), then (3)
skopt's Latin-hypercube initial design (``initial_point_generator="lhs"``) until ``n_initial``
points are known, then GP + expected improvement. A suggestion identical to an evaluated point is
replaced by a random point (an evaluation budget is too precious to repeat).

Parallel trials (``tune --workers N``, or ``tune`` under ``mlx.launch -n N``): the study runs
in batches of N suggestions from skopt's constant liar (``ask_batch``: ``Optimizer.ask(
n_points=N, strategy="cl_min")``, one ParEGO weight vector per batch), evaluated by the N
processes of an ``mx.distributed`` group at once (``run_batched`` on rank 0, ``serve_trials`` on
the others). Rank 0 alone asks, saves the study and writes the experience records; the same seed
and history give the same batch.

Where a study lives: a ``NAME`` (the registry's name rules) is
``<registry>/studies/NAME.safetensors``; anything else must be an explicit path ending in
``.safetensors``. Every save goes through
``metapeft.artifacts.save_safetensors`` (temp file, fsync, rename).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from metapeft.errors import UserError
from metapeft.tune import pareto as par
from metapeft.tune.space import SearchSpace

FORMAT = "metapeft-study"
SCHEMA = 1
SUFFIX = ".safetensors"
# name -> (sense, trial key)
OBJECTIVES: dict[str, tuple[str, str]] = {"accuracy": ("max", "accuracy"),
                                          "seconds": ("min", "seconds"),
                                          "memory": ("min", "memory_mb")}
ALL_OBJECTIVES = ("accuracy", "seconds", "memory")
# `recommended`: the most accurate trial, or one within this much accuracy of it that is faster
ACCURACY_TOLERANCE = 0.01
RECOMMEND_RULE = ("the most accurate trial; of those within 1 point of it, the fastest, then "
                  "the smallest")
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
    """``NAME`` -> ``<registry root>/studies/NAME.safetensors``, for a name that follows the
    registry's rules (``registry.validate_name``); an explicit path must end in ``.safetensors``
    (and is used as is). Anything else is refused: a name with "/" used to be taken as a path
    without that suffix, so ``out/studyz`` or ``../../y`` wrote files no one asked for."""
    from metapeft.registry import validate_name

    if not isinstance(name, str) or not name:
        raise UserError("a study needs a name", field="name")
    if name.endswith(SUFFIX) and len(name) > len(SUFFIX):
        return Path(name).expanduser()
    try:
        validate_name(name)
    except UserError:
        raise UserError(f"invalid study name {name!r}: use letters, digits, '.', '_' and '-' "
                        "(starting with a letter or digit), or a path ending in .safetensors",
                        field="name") from None
    return studies_dir(registry) / f"{name}{SUFFIX}"


def as_float(v) -> float:
    """``float(v)``, NaN for None or anything that is not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def objective_matrix(trials: list[dict], objectives: list[str]) -> np.ndarray:
    """(n, len(objectives)) in the trials' units; NaN rows for failed trials."""
    rows = []
    for t in trials:
        if t.get("status") == "failed":
            rows.append([math.nan] * len(objectives))
        else:
            rows.append([as_float(t.get(OBJECTIVES[o][1])) for o in objectives])
    return np.asarray(rows, dtype=np.float64).reshape(len(trials), len(objectives))


# an evaluator's result may carry the trial's experience record under this key (tune --workers:
# the ranks build the records, rank 0 alone writes them); it is never stored in the study
RECORD_KEY = "_experience_record"


def evaluate_trial(evaluate: Callable[[str, dict], dict], method: str, params: dict) -> dict:
    """One trial's outcome: ``evaluate``'s result with status "ok", or status "failed" and the
    reason for the failures a configuration can cause (``FAILURES``); ``wall_seconds`` too."""
    start = time.perf_counter()
    try:
        res = evaluate(method, dict(params))
        acc = as_float(res.get("accuracy"))
        if not math.isfinite(acc):
            raise FloatingPointError(f"query accuracy is {acc}")
        out = {"status": "ok", "reason": None, **res}
    except FAILURES as e:
        msg = e.one_line() if isinstance(e, UserError) else str(e)
        out = {"status": "failed", "reason": f"{type(e).__name__}: {msg}"[:500],
               "accuracy": None, "seconds": None, "memory_mb": None}
    out["wall_seconds"] = round(time.perf_counter() - start, 3)
    return out


def _from_queue(q: dict) -> dict:
    """A suggestion from a queued (warm-start or default) point."""
    sug = {"method": q["method"], "params": q["params"], "x": q["x"], "source": q["source"],
           "weights": None}
    if q.get("from_task"):
        sug["from_task"] = q["from_task"]
    return sug


def serve_trials(evaluate: Callable[[str, dict], dict], group) -> None:
    """The ranks other than 0 of ``tune --workers``: take each batch rank 0 broadcasts,
    evaluate this rank's share (trial j with j mod N = rank), send the outcomes back; until rank 0
    says stop (or that it failed, which becomes this rank's one-line error too)."""
    from metapeft.meta import distributed as dist

    while True:
        msg = dist.broadcast_json(None, group)
        if msg.get("error"):
            raise UserError(msg["error"])
        if msg.get("stop"):
            return
        batch = msg["batch"]
        dist.gather_json({str(j): evaluate_trial(evaluate, batch[j]["method"],
                                                 batch[j]["params"])
                          for j in dist.mine(len(batch), group)}, group)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
    target_trials: int = 20  # the --trials it was asked for: a resumed study runs up to it
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
                "target_trials": self.target_trials,
                "trials": self.trials, "num_trials": len(self.trials), "created": self.created,
                "updated": _now()}

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
        from metapeft.artifacts import read_metadata

        path = Path(path)
        return cls.from_metadata(read_metadata(path), path)

    @classmethod
    def from_metadata(cls, meta: dict, path: str | Path) -> "Study":
        """The study whose file at ``path`` holds ``meta`` (its safetensors metadata, or
        ``metadata()`` itself)."""
        from metapeft.artifacts import json_field

        path = Path(path)
        if json_field(meta, "format") != FORMAT:
            raise UserError("not a metapeft study file", path=str(path), field="format")
        get = lambda k, d=None: json_field(meta, k, d)  # noqa: E731
        name = get("name")
        if str(name).endswith(SUFFIX):  # a study named by its path: resumed by this path
            name = str(path)
        try:
            return cls(name=name, path=path, space=SearchSpace.from_dict(get("space")),
                       objectives=list(get("objectives")), task=get("task") or {},
                       model=get("model", "tiny"), steps=int(get("steps", 20)),
                       seed=int(get("seed", 0)), n_initial=int(get("n_initial", 5)),
                       acq_func=get("acq_func", "EI"), init=get("init"),
                       target_trials=int(get("target_trials", 20)),
                       trials=list(get("trials") or []), created=get("created") or _now())
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
        """The trial to use (``RECOMMEND_RULE``): with accuracy among the objectives, the most
        accurate trial of the front, traded only for a real saving: of the trials within
        ``ACCURACY_TOLERANCE`` of the best accuracy, the fastest (then the smallest). Without
        accuracy, the knee of the front (single objective: the best, ties to fewer seconds)."""
        front = self.pareto()
        if not front:
            return None
        if "accuracy" in self.objectives:
            acc = {i: as_float(self.trials[i].get("accuracy")) for i in front}
            finite = [i for i in front if math.isfinite(acc[i])]
            if finite:
                best = max(acc[i] for i in finite)
                near = [i for i in finite if acc[i] >= best - ACCURACY_TOLERANCE]
                def cost(i: int, key: str) -> float:
                    v = as_float(self.trials[i].get(key))
                    return v if math.isfinite(v) else math.inf

                return min(near, key=lambda i: (cost(i, "seconds"), cost(i, "memory_mb"),
                                                -acc[i], i))
        if len(self.objectives) == 1:
            s = 1.0 if self.senses[0] == "max" else -1.0
            return max(front, key=lambda i: (s * as_float(self.trials[i].get(
                OBJECTIVES[self.objectives[0]][1])), -as_float(self.trials[i].get("seconds"))))
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
        ys = par.scalarise(self.points(), self.senses, weights)
        return xs, [float(y) for y in ys]

    # -------------------------------------------------------------------------- suggestions
    def weights(self, n: int) -> np.ndarray:
        rng = np.random.default_rng([int(self.seed), int(n)])
        return par.simplex_weights(len(self.objectives), rng)

    def initial_queue(self, warm: list[dict]) -> list[dict]:
        """Warm-start points, then each method's defaults (those not yet evaluated)."""
        queue: list[dict] = []
        for w in warm:
            m = w["method"]
            if m in self.space.methods:
                queue.append({"method": m, "params": {**w["params"], **self.space.fixed.get(m, {})},
                              "source": w.get("source", "warm"),
                              "objectives": w.get("objectives"), "from_task": w.get("task")})
        for m in self.space.methods:
            queue.append({"method": m, "params": self.space.default_params(m),
                          "source": "default"})
        seen = {json.dumps(t["x"]) for t in self.trials}
        out = []
        for q in queue:
            q["x"] = self.space.clean(self.space.encode(q["method"], q["params"]))
            key = json.dumps(q["x"])
            if key not in seen:
                seen.add(key)
                out.append(q)
        return out

    def _optimizer(self, xs: list, ys: list):
        """A fresh skopt Optimizer (random_state = the study seed) told ``xs``/``ys``."""
        from metapeft.tune.gp import gp_optimizer

        opt = gp_optimizer(self.space.dimensions(), acq_func=self.acq_func,
                           n_initial=self.n_initial, seed=self.seed)
        if xs:
            opt.tell([list(x) for x in xs], ys)
        return opt

    def _unseen(self, x: list, seen: set, n: int) -> tuple[list, str | None]:
        """``x``, or a seeded random point when ``x`` was evaluated already (source "random")."""
        attempt, source = 0, None
        while json.dumps(x) in seen and attempt < 20:
            x = self.space.random_points(1, seed=int(self.seed) * 1000 + n * 37 + attempt)[0]
            source, attempt = "random", attempt + 1
        return x, source

    def ask(self) -> dict:
        """The next point from skopt: {"method", "params", "x", "source", "weights"}."""
        n = len(self.trials)
        w = self.weights(n)
        xs, ys = self.told(w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = self.space.clean(self._optimizer(xs, ys).ask())
        x, replaced = self._unseen(x, {json.dumps(t["x"]) for t in self.trials}, n)
        source = replaced or ("lhs" if len(xs) < self.n_initial else "bo")
        method, params = self.space.decode(x)
        return {"method": method, "params": params, "x": x, "source": source,
                "weights": [round(float(v), 6) for v in w]}

    def ask_batch(self, count: int, pending: list[list] | tuple = ()) -> list[dict]:
        """``count`` points to evaluate at once (``--workers``): skopt's constant liar,
        ``Optimizer.ask(n_points=count, strategy="cl_min")``: each point is told to a copy of the
        optimiser with the best value observed so far as its (lie) outcome before the next is
        asked, so the batch spreads out instead of repeating the single best guess.

        One ParEGO weight vector serves the whole batch (drawn for the batch's first trial
        number, as ``ask`` draws it for its one). ``pending``: points already chosen for this
        batch (warm-start or default points), told with the same lie first. Everything is seeded
        by the study seed and the number of trials, so the same seed and history give the same
        batch. Like ``ask``, a point equal to an evaluated (or pending, or earlier in the batch)
        one is replaced by a seeded random point."""
        n = len(self.trials)
        w = self.weights(n)
        xs, ys = self.told(w)
        pending = [list(p) for p in pending]
        lie = float(min(ys)) if ys else 0.0  # skopt's own cl_min lie
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = self._optimizer(xs + pending, ys + [lie] * len(pending))
            raw = opt.ask(n_points=count, strategy="cl_min")
        seen = {json.dumps(x) for x in [*(t["x"] for t in self.trials), *pending]}
        out = []
        for j, x in enumerate(raw):
            told = len(xs) + len(pending) + j  # what the optimiser knew when it chose x
            x, replaced = self._unseen(self.space.clean(x), seen, n + len(pending) + j)
            seen.add(json.dumps(x))
            method, params = self.space.decode(x)
            out.append({"method": method, "params": params, "x": x,
                        "source": replaced or ("lhs" if told < self.n_initial else "bo"),
                        "weights": [round(float(v), 6) for v in w]})
        return out

    def next_batch(self, count: int, queue: list[dict]) -> list[dict]:
        """The next ``count`` suggestions: the queue's points first (warm start, defaults), the
        rest from ``ask_batch`` with the queue's ones as pending."""
        batch = []
        while queue and len(batch) < count:
            batch.append(_from_queue(queue.pop(0)))
        if len(batch) < count:
            batch += self.ask_batch(count - len(batch), [b["x"] for b in batch])
        return batch

    # -------------------------------------------------------------------------- running
    def _queue(self, warm: list[dict]) -> list[dict]:
        """The initial queue; warm records measured on this very task become trials (status
        "prior": observations told to the GP, not evaluations)."""
        queue = self.initial_queue(warm)
        for q in [q for q in queue if q.get("objectives")]:
            obj = q["objectives"]
            if not all(math.isfinite(as_float(obj.get(OBJECTIVES[o][1]))) for o in self.objectives):
                continue  # not fully measured: evaluate it like any warm point
            queue.remove(q)
            self.trials.append({"index": len(self.trials), "method": q["method"],
                                "params": q["params"], "x": q["x"], "source": "experience",
                                "status": "prior", "reason": "measured earlier on this task "
                                "(experience store); told to the GP, not re-run",
                                "accuracy": obj.get("accuracy"), "seconds": obj.get("seconds"),
                                "memory_mb": obj.get("memory_mb")})
        return queue

    def evaluated(self) -> int:
        """Trials run in this study (the experience store's "prior" ones do not count)."""
        return len([t for t in self.trials if t.get("status") != "prior"])

    def run(self, evaluate: Callable[[str, dict], dict], *, trials: int,
            time_budget: float | None = None, warm: list[dict] | None = None,
            on_trial: Callable[["Study", dict], None] | None = None,
            on_start: Callable[["Study", dict], None] | None = None, group=None,
            on_records: Callable[[list[dict]], None] | None = None) -> "Study":
        """Evaluate until ``trials`` trials (in total, including earlier sessions) exist or
        ``time_budget`` seconds of this session have passed (no new trial starts after it).

        ``evaluate(method, params)`` returns ``{"accuracy", "seconds", "memory_mb", ...}`` or
        raises; the study is saved after every trial.

        ``group``: an ``mx.distributed`` group of more than one process (``tune --workers``)
        runs ``run_batched`` on rank 0 while the other ranks run ``serve_trials``.
        """
        from metapeft.meta import distributed as dist

        t0 = time.perf_counter()
        queue = self._queue(warm or [])
        if dist.size_of(group) > 1:
            return self.run_batched(evaluate, trials=trials, time_budget=time_budget,
                                    queue=queue, on_trial=on_trial, on_start=on_start,
                                    group=group, on_records=on_records, t0=t0)
        while self.evaluated() < trials:
            if time_budget is not None and time.perf_counter() - t0 >= time_budget:
                break
            sug = _from_queue(queue.pop(0)) if queue else self.ask()
            trial = {"index": len(self.trials), **sug, "status": "running"}
            if on_start is not None:
                on_start(self, trial)
            res = evaluate_trial(evaluate, sug["method"], sug["params"])
            res.pop(RECORD_KEY, None)
            trial.update(res)
            self.trials.append(trial)
            self.save()
            if on_trial is not None:
                on_trial(self, trial)
        return self

    def run_batched(self, evaluate: Callable[[str, dict], dict], *, trials: int, queue: list,
                    group, time_budget: float | None = None, on_trial=None, on_start=None,
                    on_records=None, t0: float | None = None) -> "Study":
        """Rank 0 of ``tune --workers N`` (N = the group's size): batches of N suggestions
        (``next_batch``) go to every rank (``broadcast_json``); rank r evaluates the batch's
        trials j with j mod N = r (rank 0 its share too) and the results come back in one
        ``gather_json``; rank 0 alone appends them in suggestion order, saves the study and
        hands the trials' experience records (``RECORD_KEY``) to ``on_records``. The last batch
        is cut to the trials still missing; no batch starts after ``time_budget``. Whatever
        ends this loop tells the other ranks (``serve_trials``) to stop, with the error line
        when it is an error."""
        from metapeft.meta import distributed as dist

        t0 = time.perf_counter() if t0 is None else t0
        size = dist.size_of(group)
        try:
            while self.evaluated() < trials:
                if time_budget is not None and time.perf_counter() - t0 >= time_budget:
                    break
                batch = self.next_batch(min(size, trials - self.evaluated()), queue)
                first = len(self.trials)
                running = [{"index": first + j, **sug, "status": "running"}
                           for j, sug in enumerate(batch)]
                dist.broadcast_json({"batch": [{"method": t["method"], "params": t["params"]}
                                               for t in running]}, group)
                if on_start is not None:
                    for t in running:
                        on_start(self, t)
                mine = {str(j): evaluate_trial(evaluate, running[j]["method"],
                                               running[j]["params"])
                        for j in dist.mine(len(running), group)}
                results = {}
                for part in dist.gather_json(mine, group):
                    results.update(part)
                records = []
                for j, trial in enumerate(running):
                    res = dict(results[str(j)])
                    rec = res.pop(RECORD_KEY, None)
                    if rec is not None:
                        records.append(rec)
                    trial.update(res)
                    self.trials.append(trial)
                self.save()
                if on_records is not None and records:
                    on_records(records)
                if on_trial is not None:
                    for t in running:
                        on_trial(self, t)
        except dist.DistributedError:
            raise  # the peers are gone: nobody to tell
        except BaseException as e:
            msg = e.one_line() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            try:
                dist.broadcast_json({"error": f"rank 0 stopped: {msg}"[:2000]}, group)
            except dist.DistributedError:
                pass
            raise
        dist.broadcast_json({"stop": True}, group)
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

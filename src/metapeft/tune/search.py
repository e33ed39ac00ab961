"""Bayesian hyperparameter search over PEFT configurations (``metapeft tune``): the evaluator
and ``tune()``, which creates or resumes a ``Study`` and runs it.

The pieces live by job: the search space (``tune.space``), the study with its ask/tell loop and
file (``tune.study``), ParEGO and the Pareto front (``tune.pareto``), the warm start from similar
past tasks (``tune.warm_start``) and the plot (``tune.plot``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from metapeft.errors import UserError
from metapeft.models import DEFAULT_MODEL
from metapeft.tune.space import load_space, split_params
from metapeft.tune.study import Study, as_float, parse_objectives, study_path
from metapeft.tune.warm_start import experience_path, task_feature_vector, warm_start_points


def record_experience(report, task, *, registry=None, features=None, base=None) -> bool:
    """Append a finished trial to the experience store; False when nothing was recorded."""
    from metapeft.experience import ExperienceStore, record_adapt

    try:
        return bool(record_adapt(report, task, features, source="tune", base=base,
                                 store=ExperienceStore(experience_path(registry))))
    except Exception:  # a trial's result is never lost to a failing store
        return False


def adapt_evaluator(task, *, model: str, steps: int, init: str | None = None,
                    init_method: str | None = None, seed: int = 0, batch_size: int = 64,
                    on_report: Callable | None = None, adapt_fn: Callable | None = None,
                    compile: bool = False, dequantize: str = "auto"):
    """``evaluate(method, params)`` running ``adapt`` on ``task`` with that configuration.

    Options not searched are not passed, so they keep the adapter's defaults, exactly as in
    ``metapeft adapt``; ``lr``/``steps`` go to adapt.

    ``compile=False`` (the default) runs trials under ``mx.disable_compile()``: MLX's CPU
    backend JIT-builds fused kernels for every new configuration (about 5 s each on our Linux
    machine, then cached), so with compilation the "seconds" objective would measure the kernel
    cache rather than the configuration. Uncompiled steps cost about the same on the tiny model.
    """

    def evaluate(method: str, params: dict) -> dict:
        from metapeft.adapt import adapt

        train, config = split_params(params)
        n_steps = int(train.get("steps", steps))
        lr = train.get("lr")
        fn = adapt_fn or adapt
        import mlx.core as mx

        if not compile:
            mx.disable_compile()
        try:
            # only the final accuracy is an objective: evaluating the query set after every
            # step (adapt's default) made a 10-step trial ~2x slower
            report = fn(task, model=model, method=method, steps=n_steps, target=None,
                        init=init if (init and method == init_method) else None, config=config,
                        lr=lr, seed=seed, batch_size=batch_size, eval_at={n_steps},
                        dequantize=dequantize)
        finally:
            if not compile:
                mx.enable_compile()
        ex = report.extra or {}
        adapter = getattr(report, "adapter", None)  # the full config it ran with, defaults too
        used = adapter.config.to_dict() if adapter is not None else config
        out = {"accuracy": float(report.final_accuracy),
               "seconds": round(float(ex.get("train_seconds", report.seconds)), 4),
               "memory_mb": round(as_float(ex.get("peak_memory_mb")), 3),
               "total_seconds": float(report.seconds),
               "trainable_parameters": ex.get("trainable_parameters"),
               "lr": ex.get("lr", lr), "steps": n_steps,
               "config": json.loads(json.dumps(used, default=str))}
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
    from metapeft.adapter_io import init_path
    from metapeft.artifacts import json_field, read_metadata

    meta = read_metadata(init_path(init, registry))
    cfg = json_field(meta, "config") or {}
    return json_field(meta, "method"), cfg if isinstance(cfg, dict) else {}


DEFAULT_TRIALS = 20


def tune(task, *, model: str = DEFAULT_MODEL, dequantize: str = "auto",
         methods: list[str] | str | None = None, trials: int | None = None,
         time_budget: float | None = None, steps: int | None = None,
         objectives: str | list[str] | None = None, init: str | None = None,
         name: str | None = None, resume: str | None = None, registry=None,
         space_file: str | Path | None = None, seed: int = 0, n_initial: int | None = None,
         acq_func: str = "EI", warm_start: bool = True, k: int = 3, record: bool = True,
         shots: int | None = None, query: int | None = None, ways: int | None = None,
         text_field: str = "text", label_field: str = "label", batch_size: int = 64,
         compile: bool = False, on_trial=None, on_start=None, adapt_fn=None,
         evaluate=None) -> TuneResult:
    """Run (or resume) a study; returns the study and its summary (pareto/recommended/trials).

    ``trials`` is the total number of evaluated trials the study should have (default 20); a
    resumed study keeps its space, objectives, task, model, steps, seed and ``trials`` (unless
    ``trials`` is given, which then becomes the study's) and only runs the missing trials.

    Under ``mlx.launch`` (``tune --workers N``: ``mx.distributed``, a group of N processes) the
    trials run N at a time (``Study.run_batched``): rank 0 creates or resumes the study, draws the
    warm start, asks skopt for batches, saves the study and writes the experience records; the
    other ranks evaluate their share of each batch (``Study``'s ``serve_trials``), and every rank
    returns the same result.
    """
    from metapeft.meta import distributed as dist

    group = dist.world()  # this process alone unless started by mlx.launch (tune --workers)
    if dist.size_of(group) > 1 and not dist.is_root(group):
        return _serve(task, group, evaluate=evaluate, batch_size=batch_size, adapt_fn=adapt_fn,
                      compile=compile, dequantize=dequantize)
    try:
        study, task_obj, base, features, warm = _prepare(
            task, model=model, methods=methods, trials=trials, time_budget=time_budget,
            steps=steps, objectives=objectives, init=init, name=name, resume=resume,
            registry=registry, space_file=space_file, seed=seed, n_initial=n_initial,
            acq_func=acq_func, warm_start=warm_start, k=k, record=record, shots=shots,
            query=query, ways=ways, text_field=text_field, label_field=label_field,
            dequantize=dequantize, load_base=(record or warm_start) and evaluate is None)
        counter = {"n": 0}
        parallel = dist.size_of(group) > 1
        recording = record and features is not None

        def on_report(report, method, params):
            if recording and record_experience(report, task_obj, registry=registry,
                                               features=features, base=base):
                counter["n"] += 1

        if evaluate is None:
            rec = _Recorder(task_obj, features) if parallel and recording else None
            evaluate = adapt_evaluator(task_obj, model=study.model, steps=study.steps,
                                       init=study.init,
                                       init_method=study.task.get("init_method"),
                                       seed=study.seed, batch_size=batch_size,
                                       on_report=rec.on_report if rec else on_report,
                                       adapt_fn=adapt_fn, compile=compile,
                                       dequantize=dequantize)
            if rec is not None:
                evaluate = rec.wrap(evaluate)
        if not study.trials:
            study.save()
    except BaseException as e:
        if dist.size_of(group) > 1:  # the other ranks wait for the setup: hand them the error
            msg = e.one_line() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            dist.broadcast_json({"error": msg}, group)
        raise

    def on_records(records):
        counter["n"] += append_experience(records, registry)

    if parallel:
        dist.broadcast_json({"task": study.task, "model": study.model, "steps": study.steps,
                             "init": study.init, "seed": study.seed,
                             "features": features if recording else None}, group)
    study.run(evaluate, trials=study.target_trials, time_budget=time_budget, warm=warm,
              on_trial=on_trial, on_start=on_start, group=group, on_records=on_records)
    if parallel:  # every rank returns the same result
        dist.broadcast_json({"study": study.metadata(), "path": str(study.path),
                             "experience_records": counter["n"], "warm_points": len(warm)},
                            group)
    return TuneResult(study=study, summary=study.summary(), experience_records=counter["n"],
                      warm_points=len(warm))


def _prepare(task, *, model, methods, trials, time_budget, steps, objectives, init, name,
             resume, registry, space_file, seed, n_initial, acq_func, warm_start, k, record,
             shots, query, ways, text_field, label_field, dequantize, load_base):
    """(study, task, base model or None, task features or None, warm-start points): a new or
    resumed study, checked before anything is evaluated."""
    from metapeft.adapt import load_task_arg
    from metapeft.adapters import get_adapter_class
    from metapeft.config import run_defaults

    if trials is not None and trials < 1:
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
        if trials is not None:
            study.target_trials = trials
        t = study.task
        if task is None and t.get("in_memory"):
            raise UserError(f"study {study.name!r} was run on an in-memory task; pass the task "
                            "again to resume it", field="task")
        task_obj = _task_of(task, t)
    else:
        if not name:
            raise UserError("a study needs a name (--name)", field="name")
        path = study_path(name, registry)
        from metapeft.artifacts import writable_file

        writable_file(path, field="name")
        if path.exists():
            raise UserError(f"study {name!r} exists; continue it with --resume {name} or pick "
                            "another --name", path=str(path), field="name")
        objs = parse_objectives(objectives)
        space = load_space(space_file, methods)
        task_obj = load_task_arg(task, shots=shots, query=query, ways=ways, seed=seed,
                                 text_field=text_field, label_field=label_field)
        init_method = None
        if init:
            init_method, init_cfg = _init_method_and_config(init, registry)
            if init_method in space.methods:
                structural = get_adapter_class(init_method).structural
                space.fix(init_method, {k: v for k, v in init_cfg.items() if k in structural})
        trials = DEFAULT_TRIALS if trials is None else trials
        n_init = n_initial if n_initial is not None else max(3, min(10, trials // 3))
        study = Study(name=name, path=path, space=space, objectives=objs,
                      task={"task": str(task) if not hasattr(task, "support") else task.name,
                            "name": task_obj.name, "shots": shots, "query": query,
                            "ways": ways, "seed": seed, "text_field": text_field,
                            "label_field": label_field, "init_method": init_method,
                            "in_memory": hasattr(task, "support")},
                      model=model,
                      steps=int(steps if steps is not None else run_defaults()["steps"]),
                      seed=seed, n_initial=n_init, acq_func=acq_func, init=init,
                      target_trials=trials)
    base = features = None
    if load_base:
        from metapeft.models import load_base_model

        base = load_base_model(study.model, dequantize=dequantize)
        features = task_feature_vector(task_obj, base)
    warm = (warm_start_points(task_obj, study.space.methods, k, base=base, registry=registry,
                              features=features) if warm_start and not study.trials else [])
    return study, task_obj, base, features, warm


def _task_of(task, spec: dict):
    """The study's task from its settings (``Study.task``), or ``task`` itself when given."""
    from metapeft.adapt import load_task_arg

    return load_task_arg(task if task is not None else spec.get("task"),
                         shots=spec.get("shots"), query=spec.get("query"), ways=spec.get("ways"),
                         seed=spec.get("seed", 0), text_field=spec.get("text_field", "text"),
                         label_field=spec.get("label_field", "label"))


class _Recorder:
    """Builds each trial's experience record where the trial ran (``tune --workers``), for rank 0
    to write: ``on_report`` goes to ``adapt_evaluator``, ``wrap`` puts the record into the
    evaluator's result (``RECORD_KEY``)."""

    def __init__(self, task, features):
        self.task, self.features, self.last = task, features, None

    def on_report(self, report, method, params):
        from metapeft.experience import record_from_report

        try:
            self.last = record_from_report(report, self.task, self.features,
                                           source="tune").to_json()
        except Exception:  # a trial's result is never lost to a record that cannot be built
            self.last = None

    def wrap(self, evaluate):
        from metapeft.tune.study import RECORD_KEY

        def run(method: str, params: dict) -> dict:
            self.last = None
            out = evaluate(method, params)
            rec, self.last = self.last, None
            return {**out, RECORD_KEY: rec} if rec is not None else out

        return run


def append_experience(records: list[dict], registry=None) -> int:
    """Append records built on the ranks (``tune --workers``) to the experience store; how many
    were written (0 when recording is off or the store fails: a trial is never lost to it)."""
    import os

    from metapeft.experience import ExperienceStore

    if os.environ.get("METAPEFT_EXPERIENCE", "").lower() in ("off", "0", "false", "no"):
        return 0
    try:
        return len(ExperienceStore(experience_path(registry)).append(records))
    except Exception:
        return 0


def _serve(task, group, *, evaluate, batch_size, adapt_fn, compile, dequantize) -> TuneResult:
    """A rank other than 0 of ``tune --workers``: rank 0's settings, then its share of every
    batch (``serve_trials``), then rank 0's final study."""
    from metapeft.meta import distributed as dist
    from metapeft.tune.study import serve_trials

    setup = dist.broadcast_json(None, group)
    if setup.get("error"):
        raise UserError(setup["error"])
    if evaluate is None:
        task_obj = _task_of(task, setup["task"])
        rec = _Recorder(task_obj, setup["features"]) if setup.get("features") else None
        evaluate = adapt_evaluator(task_obj, model=setup["model"], steps=setup["steps"],
                                   init=setup["init"],
                                   init_method=setup["task"].get("init_method"),
                                   seed=setup["seed"], batch_size=batch_size,
                                   on_report=rec.on_report if rec else None, adapt_fn=adapt_fn,
                                   compile=compile, dequantize=dequantize)
        if rec is not None:
            evaluate = rec.wrap(evaluate)
    serve_trials(evaluate, group)
    final = dist.broadcast_json(None, group)
    study = Study.from_metadata(final["study"], final["path"])
    return TuneResult(study=study, summary=study.summary(),
                      experience_records=final["experience_records"],
                      warm_points=final["warm_points"])

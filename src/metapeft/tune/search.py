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
    """
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
        task_obj = load_task_arg(task if task is not None else t.get("task"),
                                     shots=t.get("shots"), query=t.get("query"),
                                     ways=t.get("ways"), seed=t.get("seed", 0),
                                     text_field=t.get("text_field", "text"),
                                     label_field=t.get("label_field", "label"))
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
    base = None
    features = None
    if (record or warm_start) and evaluate is None:
        from metapeft.models import load_base_model

        base = load_base_model(study.model, dequantize=dequantize)
        features = task_feature_vector(task_obj, base)
    warm = (warm_start_points(task_obj, study.space.methods, k, base=base, registry=registry,
                              features=features) if warm_start and not study.trials else [])
    counter = {"n": 0}

    def on_report(report, method, params):
        if record and features is not None and record_experience(
                report, task_obj, registry=registry, features=features, base=base):
            counter["n"] += 1

    if evaluate is None:
        evaluate = adapt_evaluator(task_obj, model=study.model, steps=study.steps,
                                   init=study.init,
                                   init_method=study.task.get("init_method"), seed=study.seed,
                                   batch_size=batch_size, on_report=on_report,
                                   adapt_fn=adapt_fn, compile=compile, dequantize=dequantize)
    if not study.trials:
        study.save()
    study.run(evaluate, trials=study.target_trials, time_budget=time_budget, warm=warm, on_trial=on_trial,
              on_start=on_start)
    return TuneResult(study=study, summary=study.summary(), experience_records=counter["n"],
                      warm_points=len(warm))

"""One adaptation run: train an adapter on a task's support set and score the query set at every
step (``adapt``), reading the task from a path or taking a ``Task`` (``load_task_arg``).

``metapeft.api.adapt`` is this function. It lives below the API because sweeps (``sweep.py``)
and the tuner's evaluator (``tune.search``) run it too, and the API calls those. With
``method="auto"`` it lets ``metapeft.auto`` choose the method, its hyperparameters and an init
first; ``budget_seconds`` bounds the whole run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from metapeft.adapters import AUTO_METHOD, DEFAULT_METHOD
from metapeft.init_sources import AUTO as AUTO_INIT
from metapeft.errors import UserError
from metapeft.models import DEFAULT_MODEL
from metapeft.reports import AdaptReport

DEFAULT_OBJECTIVE = "ce"


def load_task_arg(task, *, shots=None, query=None, ways=None, seed=0, text_field="text",
                  label_field="label"):
    """A Task object as is, else a path (directory, JSONL or CSV) read with ``load_task``."""
    from metapeft.data import Task, load_task

    if isinstance(task, Task):
        return task
    return load_task(task, shots=shots, query=query, ways=ways, seed=seed,
                     text_field=text_field, label_field=label_field)


# Run options that `select` recommends next to the adapter's own
# (selector.default_hyperparameters), so `--set` takes them too:
# (adapt's argument, its default, its type, its flag).
RUN_OPTIONS = {"lr": ("lr", None, float, "--lr"), "steps": ("steps", 20, int, "--steps"),
               "optimizer": ("optimizer", "adam", str, "--optimizer"),
               "objective": ("objective", "ce", str, "--loss"),
               "loss": ("objective", "ce", str, "--loss")}


def split_run_options(config: dict | None, **given) -> tuple[dict, dict]:
    """(adapter options, run options) from ``--set``/``--config`` values: ``lr``, ``steps``,
    ``optimizer`` and ``objective``/``loss`` there set the run's own option, unless the
    matching flag was given with a different value (then a one-line error)."""
    from metapeft.adapters.base import typed_value

    run = dict(given)
    if config is not None and not isinstance(config, dict):  # an AdapterConfig, as is
        return config, run
    config = dict(config or {})
    for key, (arg, default, kind, flag) in RUN_OPTIONS.items():
        if key not in config:
            continue
        value = typed_value(key, config.pop(key), kind)
        if given[arg] not in (default, value):
            raise UserError(f"--set {key}={value} disagrees with {flag} {given[arg]}; give one "
                            "of them", field=key)
        run[arg] = value
    return config, run


def check_run_options(*, steps: int | None = None, lr: float | None = None,
                      batch_size: int | None = None) -> None:
    """One-line errors for training options no run can use (before anything loads)."""
    import math

    if steps is not None and steps < 0:
        raise UserError(f"--steps must be >= 0, got {steps}", field="steps")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr must be a positive number, got {lr}", field="lr")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}", field="batch_size")


def adapt(task, *, model: str = DEFAULT_MODEL, method: str = DEFAULT_METHOD, steps: int = 20,
          route: str | None = None, keep: bool = False, max_size: int | None = None,
          target: float | None = 0.8, init: str | None = None, out: str | Path | None = None,
          config: dict | None = None, lr: float | None = None, optimizer: str = "adam",
          batch_size: int = 64, seed: int = 0, objective: str = DEFAULT_OBJECTIVE,
          shots: int | None = None, query: int | None = None, ways: int | None = None,
          text_field: str = "text", label_field: str = "label", dequantize: str = "auto",
          on_step: Callable[[int, float, float | None], None] | None = None,
          on_start: Callable[[], None] | None = None,
          eval_at: set[int] | None = None, record_experience: bool = False,
          stop_at_target: bool = False, budget_seconds: float | None = None,
          on_decision: Callable[[dict], None] | None = None, switch: str = "off",
          switch_window: int = 3, switch_tolerance: float = 0.01,
          on_switch: Callable[[dict], None] | None = None,
          inner_lr_scales: bool = True, lr_decay: float | None = None,
          record_composition: bool = True, merge_bound: float | None = None,
          merge_lr_factor: float | None = None) -> AdaptReport:
    """Train one adapter on a task's support set; query accuracy at step 0 and after every step.
    ``stop_at_target``: end the run at the first step whose query accuracy reaches ``target``
    (that step is ``steps_to_target``; the curve stops there).
    ``on_start`` is called once the inputs are validated, right before training.

    ``method="auto"``: profile the task, rank the methods (``select``), and run the top one with
    its recommended hyperparameters (``lr``/``steps``/``optimizer``/``objective`` given with
    other than their defaults, and ``config`` options, win) from the newest valid registry
    meta-weights for it and this model, if any (``auto.decide``); ``on_decision(decision)`` is
    called before training, and the report's ``extra["decision"]`` says what was chosen and why.
    ``budget_seconds`` limits the whole run, profiling included: no optimizer step starts that
    the last one's time says would end past it (``extra["budget"]`` reports it).
    ``init="auto"`` (and ``method="auto"`` without an init): start from the init source that
    ``init_sources.recommend`` ranks first for this task (fresh, meta, compose, merge, generate or
    route); ``extra["init_choice"]`` is that ranking.

    The adapter library (``metapeft.library``): ``init="library:compose[:K][+INIT]"`` starts from
    a LoraHub-style mixture of the K nearest library LoRAs (``metapeft.compose``;
    ``extra["composition"]``), ``route="arrow"`` from Arrow's per-token routing over them
    (``metapeft.route``; ``extra["route"]`` has the routed step-0 accuracy), and ``keep``
    adds the trained adapter to the library (bounded by ``max_size``; ``extra["library"]``).
    ``record_composition=False`` leaves the library's store of past compositions as it was (an
    evaluation whose tasks must stay independent, or several processes on one library).
    ``init="library:merge[:K][+INIT]"`` merges the members' updates under INIT's trained factors
    (``compose.merge_init``); ``merge_bound`` bounds their weights (|wᵢ| ≤ it; None: the bound
    ``library calibrate`` kept for the spec, else ``compose.BOUND``); ``merge_lr_factor`` is
    the factor on INIT's lr the merged start trains at (None: the one kept with the calibrated
    bound, else 1).

    ``switch="auto"``: when the query curve plateaus (no gain above ``switch_tolerance`` over
    ``switch_window`` steps), freeze what was trained and train the next method of the selector's
    ranking on top of it for the remaining steps (``metapeft.switching``); ``on_switch(record)``
    is called at the switch and ``extra["switches"]`` lists it.

    ``inner_lr_scales``: meta-weights trained with per-layer inner lrs (``meta-train
    --inner-lr-mode per-layer``) carry a step multiplier per parameter leaf; they scale each
    leaf's update (``train.train(lr_scales=...)``) unless this is False
    (``--no-inner-lr-scales``). ``extra["inner_lr_scales"]`` says whether they were applied.
    With ``switch="auto"`` they are not applied (the stack's tree is not the init's).

    ``lr_decay``: step t runs at ``lr / (1 + lr_decay · (t − 1))`` (``train.lr_schedule``). None:
    the decay the init's calibration chose (``adapt_lr_decay``; 0 when it has none or ``lr`` is
    given)."""
    import time

    from metapeft.adapter_io import describe_init, init_step_size, resolve_init, save_adapter
    from metapeft.adapters import get_adapter_class
    from metapeft.models import load_base_model
    from metapeft.scoring import OBJECTIVES
    from metapeft.train import encode_task, train

    from metapeft.train import OPTIMIZERS

    t_start = time.monotonic()
    if target is not None and not 0.0 <= target <= 1.0:
        raise UserError(f"target must be in [0, 1], got {target}", field="target")
    if stop_at_target and target is None:
        raise UserError("--stop-at-target needs a --target", field="target")
    for name, value in (("merge_bound", merge_bound), ("merge_lr_factor", merge_lr_factor)):
        if value is not None and not str(init).startswith("library:merge"):
            raise UserError(f"--{name.replace('_', '-')} applies to --init "
                            f"library:merge[:K][+INIT], not to --init {init}", field=name)
    config, run = split_run_options(config, lr=lr, steps=steps, optimizer=optimizer,
                                    objective=objective)
    lr, steps, optimizer, objective = run["lr"], run["steps"], run["optimizer"], run["objective"]
    if objective not in OBJECTIVES:
        raise UserError(f"unknown loss {objective!r}; choose from {', '.join(OBJECTIVES)}",
                        field="loss")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}",
                        field="optimizer")
    check_run_options(steps=steps, lr=lr, batch_size=batch_size)
    from metapeft.switching import check_switch_options

    check_switch_options(switch, switch_window, switch_tolerance)
    if budget_seconds is not None and not budget_seconds > 0:
        raise UserError(f"--budget-seconds must be > 0, got {budget_seconds}",
                        field="budget_seconds")
    if out is not None:
        from metapeft.artifacts import writable_dir

        writable_dir(out, field="out")  # before training: a result is never lost to a bad --out
    task = load_task_arg(task, shots=shots, query=query, ways=ways, seed=seed,
                         text_field=text_field, label_field=label_field)
    decision = features = init_choice = None
    if method == AUTO_METHOD:
        from metapeft.auto import decide

        decision, features = decide(task, load_base_model(model, dequantize=dequantize),
                                    init=None if init == AUTO_INIT else init, route=route,
                                    config=config,  # --steps when given, as apply_decision reads it
                                    steps=None if steps == RUN_OPTIONS["steps"][1] else steps)
        method, init, route = decision["method"], decision["init"], decision.pop("route")
        init_choice = decision.pop("init_choice")
        config, run = apply_decision(decision, config, run)
        lr, steps, optimizer, objective = (run["lr"], run["steps"], run["optimizer"],
                                           run["objective"])
        if objective not in OBJECTIVES or optimizer not in OPTIMIZERS:
            raise UserError(f"the recommended loss {objective!r} or optimizer {optimizer!r} is "
                            "unknown; give --loss and --optimizer", field="method")
        check_run_options(steps=steps, lr=lr)
    cls = get_adapter_class(method)
    if init == AUTO_INIT:  # the top init source available for this method (init_sources)
        init, route, config, init_choice, features = auto_init(
            task, load_base_model(model, dequantize=dequantize), method, config, route, features,
            steps)
    if cls.training_free and init is not None:
        raise UserError(f"{method} is training-free: it starts from no init (drop --init)",
                        field="init")
    if cls.training_free and switch != "off":
        raise UserError(f"{method} is training-free: its curve has no steps to watch (drop "
                        "--switch)", field="switch")
    if route is not None and (route != "arrow" or init is not None):  # the adapter library
        raise UserError(f"unknown --route {route!r}; the one router is arrow" if route != "arrow"
                        else "--route arrow builds its own init from the library; drop --init",
                        field="route")
    if max_size is not None and max_size < 1:
        raise UserError(f"--max-size must be >= 1, got {max_size}", field="max_size")
    base = load_base_model(model, dequantize=dequantize)
    adapter = cls.attach(base, config or {})
    params = resolve_init(init, adapter)
    init_name = describe_init(init)  # provenance: NAME@VERSION as resolved now
    if params is None:
        params = adapter.init_params(seed)
    data = encode_task(task, base.tokenizer)
    _check_memory(adapter, data, batch_size)
    from metapeft.compose import is_library_init

    library_start = None  # (report key, report): an init built from the adapter library
    if is_library_init(init) or route is not None:
        from metapeft.compose import library_init

        adapter, params, library_start = library_init(
            init, route, adapter, data, task, seed=seed, record=record_composition,
            merge_bound=merge_bound, merge_lr_factor=merge_lr_factor)
    step_size = None  # the init's step size calibrated for this run length (stepsize horizons)
    if lr is None:  # a learned init brings the step size chosen for it on validation tasks
        calibrated = init_step_size(init, steps=steps) if optimizer == "adam" else None
        if (optimizer == "adam" and library_start is not None
                and library_start[1].get("anchor")):  # a generator anchored at a meta-init
            from metapeft.adapter_io import stored_step_size
            from metapeft.artifacts import read_metadata

            calibrated = stored_step_size(read_metadata(library_start[1]["generator"]), steps)
            if calibrated:  # the report says which step size the anchor brought
                library_start[1]["step_size"] = {"lr": calibrated["adapt_lr"],
                                                 "lr_decay": calibrated["adapt_lr_decay"]}
        if (optimizer == "adam" and library_start is not None
                and library_start[0] == "composition"):  # a step size kept for this spec
            from metapeft.compose import calibrated_step_size

            kept = calibrated_step_size(init, adapter, steps)
            if kept:  # chosen for composed starts, ahead of INIT's own (compose module doc)
                calibrated = kept
                library_start[1]["step_size"] = {
                    "lr": kept["adapt_lr"], "lr_decay": kept["adapt_lr_decay"],
                    "source": "library calibration", "tasks": kept["num_tasks"]}
        lr = (calibrated or {}).get("adapt_lr") or cls.default_lr
        # a merge's start trains at the factor on INIT's lr calibrated with its bound
        factor = 1.0 if library_start is None else library_start[1].get("lr_factor", 1.0)
        if lr_decay is None and calibrated:  # and its schedule, when one was chosen
            lr_decay = calibrated["adapt_lr_decay"]
        if factor != 1 and optimizer == "adam":
            lr *= factor
            library_start[1]["step_size"] = {
                "lr": lr, "lr_decay": lr_decay or 0.0, "lr_factor": factor,
                "source": "library calibration (with the bound)"}
        if calibrated and calibrated["horizon"]:  # the choice for runs of this length
            step_size = {"lr": lr, "lr_decay": lr_decay or 0.0,
                         "horizon": calibrated["horizon"], "source": "init calibration"}
    lr_decay = lr_decay or 0.0
    from metapeft.adapter_io import init_lr_scales, inner_lr_summary

    lr_scales = None if cls.training_free else init_lr_scales(init)
    scales_note = None
    if lr_scales:  # per-layer inner lrs learned with the init: applied unless opted out
        scales_note = {"applied": bool(inner_lr_scales and switch != "auto"),
                       "by_module": inner_lr_summary(lr_scales)}
        if not scales_note["applied"]:
            lr_scales = None
    if cls.training_free:  # the parameters come from the support set; no optimizer step runs
        params, steps, eval_at = adapter.fit(params, data.prepared(adapter, "support")), 0, None
    if decision is not None:  # what runs, as resolved now
        decision["hyperparameters"] = {
            **({} if cls.training_free else {"lr": lr, "optimizer": optimizer,
                                             "objective": objective}),
            **({"lr_decay": lr_decay} if lr_decay and not cls.training_free else {}),
            "steps": steps, **adapter.config.to_dict()}
        if on_decision is not None:
            on_decision(decision)
    if on_start is not None:
        on_start()
    stop = None if budget_seconds is None else _budget_stop(t_start, budget_seconds)
    switches = None
    try:
        if switch == "auto":
            from metapeft.switching import train_with_switching

            adapter, res, switches = train_with_switching(
                adapter, params, data, steps=steps, lr=lr,
                candidates=lambda: _switch_candidates(task, base, method, features),
                window=switch_window, tolerance=switch_tolerance, target=target, seed=seed,
                on_step=on_step, on_switch=on_switch, stop=stop, optimizer=optimizer,
                batch_size=batch_size, objective=objective, eval_at=eval_at,
                stop_at_target=stop_at_target)
        else:
            res = train(adapter, params, data, steps=steps, lr=lr, optimizer=optimizer,
                        batch_size=batch_size, seed=seed, target=target, objective=objective,
                        on_step=on_step, eval_at=eval_at, stop_at_target=stop_at_target,
                        stop=stop, lr_scales=lr_scales, lr_decay=lr_decay)
    except FloatingPointError as e:
        raise UserError(str(e), field="lr") from None
    if cls.training_free:
        lr = None  # trained by no optimizer: no learning rate to report or record
    report = AdaptReport.from_result(
        res, method=method, adapter=adapter, num_support=data.num_support,
        num_query=data.num_query, lr=lr, objective=objective, task=task.name,
        labels=list(task.labels), model=base.model_id, target=target, init=init_name,
        **({} if decision is None else {"decision": decision}),
        **({} if switches is None else {"switches": switches}),
        **({} if init_choice is None else {"init_choice": init_choice_json(init_choice)}),
        **({} if library_start is None else dict([library_start])),
        **({} if scales_note is None else {"inner_lr_scales": scales_note}),
        **({"lr_decay": lr_decay} if lr_decay else {}),
        **({} if step_size is None or cls.training_free else {"step_size": step_size}))
    switched = bool(switches) and switches[0].get("to") is not None
    if out is not None:
        save_adapter(out, adapter, res.params, extra=describe_run(
            report, data.encoder, task=task.name, objective=objective, init=init_name, seed=seed,
            lr=lr, optimizer=optimizer, batch_size=batch_size, target=target,
            decision=decision))
    if keep:  # into the adapter library, with the task's profile
        report.extra["library"] = keep_in_library(out, adapter, res.params, report, data, task,
                                                  max_size=max_size, run=dict(
            objective=objective, init=init_name, seed=seed, lr=lr, optimizer=optimizer,
            batch_size=batch_size, target=target))
    if budget_seconds is not None:
        used = time.monotonic() - t_start
        report.extra["budget"] = {
            "seconds": budget_seconds, "used": round(used, 3), "exceeded": used > budget_seconds,
            "stopped_after_step": res.extra.get("stopped_early_at"), "steps": steps}
    if record_experience and not report.accuracies:
        print("note: not recorded in the experience store: no query set was scored",
              file=sys.stderr)
    elif record_experience and switched:  # the curve is no one method's
        print("note: not recorded in the experience store: the run switched methods "
              f"({' -> '.join(adapter.stage_methods)})", file=sys.stderr)
    elif record_experience:
        record_run(report, task, base, "adapt", {"lr": lr, **adapter.config.to_dict()},
                   features=features)
    return report


def auto_init(task, base, method: str, config, route: str | None, features: dict | None,
              steps: int | None = None):
    """``--init auto``: (init, route, adapter options, the init-source ranking, the task's
    features) from the top init source available for ``method`` on ``base`` for a run of
    ``steps`` steps (``init_sources.recommend``); a meta-init brings its own adapter options,
    under ``config``'s."""
    from metapeft.init_sources import recommend
    from metapeft.select.features import task_domain, task_features

    if route is not None:
        raise UserError("--init auto picks the init source itself (routing included); drop "
                        "--route", field="init")
    if features is None:
        features = task_features(task, base)
    options = config if isinstance(config, dict) or config is None else config.to_dict()
    choice = recommend(features, method, base, config=options, domain=task_domain(task),
                       steps=steps)
    best = choice["ranking"][0]
    options = {**(best["init_options"] or {}), **(options or {})}
    return best["init"], best["route"], options, choice, features


def init_choice_json(choice: dict) -> dict:
    from metapeft.init_sources import public_json

    return public_json(choice)


def _switch_candidates(task, base, method: str, features: dict | None):
    """The methods ``--switch auto`` may move to, in the selector's order for this task (its
    features are computed now unless ``--method auto`` already did)."""
    from metapeft.experience import ExperienceStore
    from metapeft.select.features import task_features
    from metapeft.select.selector import select
    from metapeft.switching import ranking_candidates

    if features is None:
        features = task_features(task, base)
    ranking = select(features, store=ExperienceStore(None))["ranking"]
    return ranking_candidates(ranking, method)


def keep_in_library(out, adapter, params, report: AdaptReport, data, task, *, max_size=None,
                    registry=None, run: dict | None = None) -> dict:
    """``adapt --keep``: the adapter just trained into the adapter library (``metapeft.library``;
    from ``out`` when it was written there, else through a temporary directory), with its
    task's profile."""
    import tempfile

    from metapeft.adapter_io import save_adapter
    from metapeft.library import add

    if out is not None:
        res = add(out, task=task, base=adapter.base, registry=registry, max_size=max_size)
    else:
        with tempfile.TemporaryDirectory(prefix="metapeft-keep-") as tmp:
            save_adapter(tmp, adapter, params, extra=describe_run(
                report, data.encoder, task=task.name, **(run or {})))
            res = add(tmp, task=task, base=adapter.base, registry=registry, max_size=max_size,
                      source="adapt --keep")
    return res.to_json()


def apply_decision(decision: dict, config, run: dict) -> tuple[dict, dict]:
    """(adapter options, run options) for an ``auto`` run: the recommended hyperparameters,
    under the init's own options (it was meta-learned with them), under the caller's ``config``
    and the run settings given with other than their defaults. With an init and no experience
    behind the recommendation, the learning rate is left to the init (its calibrated one, else
    the method's). ``hyperparameters_from`` then says where the parts came from."""
    from metapeft.adapters import get_adapter_class
    from metapeft.adapters.base import typed_value
    from metapeft.select.selector import DEFAULTS_SOURCE

    known = get_adapter_class(decision["method"]).Config.defaults()
    rec = decision["hyperparameters"]
    init_options = decision.pop("init_options", None) or {}
    if not isinstance(config, dict):  # an AdapterConfig, as is
        config = config.to_dict()
    options = {**{k: v for k, v in rec.items() if k in known}, **init_options, **config}
    given = {arg for arg, default, _, _ in RUN_OPTIONS.values() if run[arg] != default}
    run = dict(run)
    for key, (arg, _default, kind, _flag) in RUN_OPTIONS.items():
        if key == "lr" and decision["init"] and decision["hyperparameters_from"] == DEFAULTS_SOURCE:
            continue
        if key in rec and rec[key] is not None and arg not in given:
            run[arg] = typed_value(key, rec[key], kind)
    sources = [decision["hyperparameters_from"]]
    if init_options:
        sources.append(f"the options of {decision['init']}")
    if config or given:
        sources.append("your options")
    decision["hyperparameters_from"] = " + ".join(sources)
    return options, run


def _budget_stop(t_start: float, budget: float) -> Callable[[int], bool]:
    """``train``'s ``stop``: True before a step that, taking as long as the previous one (with its
    evaluation), would end past ``budget`` seconds after ``t_start``."""
    import time

    last = [None]

    def stop(step: int) -> bool:
        now = time.monotonic()
        previous = 0.0 if last[0] is None else now - last[0]
        last[0] = now
        return now - t_start + previous > budget

    return stop


def _check_memory(adapter, data, batch_size: int) -> None:
    """Refuse a step that cannot fit in memory (``scoring.check_memory``): a step scores its
    minibatch of support examples against every label of the task."""
    from metapeft.scoring import check_memory

    if not data.support or adapter.training_free:  # one forward pass per text, no step
        return
    examples = min(batch_size, data.num_support)
    labels = data.support[0].label_tokens.shape[0]
    virtual = int(getattr(adapter.config, "num_virtual_tokens", 0) or 0)
    check_memory(adapter.base.model, examples * labels,
                 max(b.prompt.shape[1] for b in data.support) + virtual,
                 data.support[0].label_tokens.shape[1],
                 what=f"a step of {examples} examples x {labels} labels",
                 hint="lower --batch-size or --ways", field="batch_size")


def describe_run(report: AdaptReport, encoder, *, task: str, objective: str, init: str | None,
                 seed: int, lr: float, optimizer: str, batch_size: int,
                 target: float | None, decision: dict | None = None) -> dict:
    """What an adapter directory says about the run that wrote it (``adapter_io.AdapterInfo``):
    the label set in order with the text scored for each, the prompt, the objective, and the
    provenance (init, seed, steps run, final query accuracy, ...)."""
    from datetime import datetime, timezone

    return {"task": task, "labels": list(encoder.labels),
            "verbalisations": list(encoder.verbalisations), "template": encoder.template,
            "max_prompt_tokens": encoder.max_prompt_tokens, "objective": objective,
            "provenance": {
                "init": init, "seed": seed, "steps": len(report.losses),
                "final_accuracy": report.final_accuracy,
                "steps_to_target": report.steps_to_target, "target": target, "lr": lr,
                **({"lr_decay": report.extra["lr_decay"]} if report.extra.get("lr_decay")
                   else {}),
                "optimizer": optimizer, "batch_size": batch_size,
                "num_support": report.num_support, "num_query": report.num_query,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **({} if decision is None else {"decision": decision})}}


def record_run(report: AdaptReport, task, base, source: str, hyperparameters: dict,
               features: dict | None = None) -> None:
    """Append a run to the experience store; a failure to record never fails the run itself.
    ``features``: the task's, when already computed (else they are computed now)."""
    from metapeft.experience import record_adapt

    try:
        record_adapt(report, task, features, base=base, source=source,
                     hyperparameters=hyperparameters)
    except (UserError, OSError) as e:
        print(f"warning: not recorded in the experience store: {e}", file=sys.stderr)

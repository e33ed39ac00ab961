"""One adaptation run: train an adapter on a task's support set and score the query set at every
step (``adapt``), reading the task from a path or taking a ``Task`` (``load_task_arg``).

``metapeft.api.adapt`` is this function. It lives below the API because sweeps (``sweep.py``)
and the tuner's evaluator (``tune.search``) run it too, and the API calls those.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from metapeft.adapters import DEFAULT_METHOD
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


def adapt(task, *, model: str = DEFAULT_MODEL, method: str = DEFAULT_METHOD, steps: int = 20,
          target: float | None = 0.8, init: str | None = None, out: str | Path | None = None,
          config: dict | None = None, lr: float | None = None, optimizer: str = "adam",
          batch_size: int = 64, seed: int = 0, objective: str = DEFAULT_OBJECTIVE,
          shots: int | None = None, query: int | None = None, ways: int | None = None,
          text_field: str = "text", label_field: str = "label", dequantize: str = "auto",
          on_step: Callable[[int, float, float | None], None] | None = None,
          on_start: Callable[[], None] | None = None,
          eval_at: set[int] | None = None, record_experience: bool = False,
          stop_at_target: bool = False) -> AdaptReport:
    """Train one adapter on a task's support set; query accuracy at step 0 and after every step.
    ``stop_at_target``: end the run at the first step whose query accuracy reaches ``target``
    (that step is ``steps_to_target``; the curve stops there).
    ``on_start`` is called once the inputs are validated, right before training."""
    from metapeft.adapter_io import describe_init, resolve_init, save_adapter
    from metapeft.adapters import get_adapter_class
    from metapeft.models import load_base_model
    from metapeft.scoring import OBJECTIVES
    from metapeft.train import encode_task, train

    if target is not None and not 0.0 <= target <= 1.0:
        raise UserError(f"target must be in [0, 1], got {target}", field="target")
    if stop_at_target and target is None:
        raise UserError("--stop-at-target needs a --target", field="target")
    if objective not in OBJECTIVES:
        raise UserError(f"unknown loss {objective!r}; choose from {', '.join(OBJECTIVES)}",
                        field="loss")
    task = load_task_arg(task, shots=shots, query=query, ways=ways, seed=seed,
                         text_field=text_field, label_field=label_field)
    cls = get_adapter_class(method)
    base = load_base_model(model, dequantize=dequantize)
    adapter = cls.attach(base, config or {})
    params = resolve_init(init, adapter)
    init_name = describe_init(init)  # provenance: NAME@VERSION as resolved now
    if params is None:
        params = adapter.init_params(seed)
    data = encode_task(task, base.tokenizer)
    lr = cls.default_lr if lr is None else lr
    if on_start is not None:
        on_start()
    try:
        res = train(adapter, params, data, steps=steps, lr=lr, optimizer=optimizer,
                    batch_size=batch_size, seed=seed, target=target, objective=objective,
                    on_step=on_step, eval_at=eval_at, stop_at_target=stop_at_target)
    except FloatingPointError as e:
        raise UserError(str(e), field="lr") from None
    report = AdaptReport.from_result(
        res, method=method, adapter=adapter, num_support=data.num_support,
        num_query=data.num_query, lr=lr, objective=objective, task=task.name,
        labels=list(task.labels), model=base.model_id)
    if out is not None:
        save_adapter(out, adapter, res.params, extra=describe_run(
            report, data.encoder, task=task.name, objective=objective, init=init_name, seed=seed,
            lr=lr, optimizer=optimizer, batch_size=batch_size, target=target))
    if record_experience:
        record_run(report, task, base, "adapt", {"lr": lr, **adapter.config.to_dict()})
    return report


def describe_run(report: AdaptReport, encoder, *, task: str, objective: str, init: str | None,
                 seed: int, lr: float, optimizer: str, batch_size: int,
                 target: float | None) -> dict:
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
                "optimizer": optimizer, "batch_size": batch_size,
                "num_support": report.num_support, "num_query": report.num_query,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}}


def record_run(report: AdaptReport, task, base, source: str, hyperparameters: dict) -> None:
    """Append a run to the experience store; a failure to record never fails the run itself."""
    from metapeft.experience import record_adapt

    try:
        record_adapt(report, task, base=base, source=source, hyperparameters=hyperparameters)
    except (UserError, OSError) as e:
        print(f"warning: not recorded in the experience store: {e}", file=sys.stderr)

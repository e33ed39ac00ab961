"""The Python API behind the CLI. Everything a command does is one call here, so a notebook can
do the same without Typer:

    from metapeft.api import adapt
    report = adapt("data/my_task", model="tiny", method="lora", steps=20, out="runs/a")
    report.final_accuracy, report.steps_to_target
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from metapeft import __version__
from metapeft.errors import UserError

# Learning rates per method for `adapt` when none is given (configs/default.yaml mirrors these).
DEFAULT_LR = {"lora": 1e-3, "dora": 1e-3, "adalora": 3e-3, "prompt": 3e-2, "prefix": 1e-2,
              "ptuning": 3e-3}
DEFAULT_OBJECTIVE = "ce"


@dataclass
class AdaptReport:
    method: str
    steps_to_target: int | None
    final_accuracy: float
    accuracies: list[float]
    losses: list[float]
    target_reached: bool
    num_support: int
    num_query: int
    seconds: float
    extra: dict = field(default_factory=dict)
    params: Any = None
    adapter: Any = None

    JSON_KEYS = ("steps_to_target", "final_accuracy", "accuracies", "losses", "target_reached",
                 "num_support", "num_query", "seconds", "method")

    def to_json(self) -> dict:
        """Exactly the documented keys of ``metapeft adapt --json``."""
        return {k: getattr(self, k) for k in self.JSON_KEYS}


def load_task_arg(task, *, shots=None, query=None, ways=None, seed=0, text_field="text",
                  label_field="label"):
    """A Task object as is, else a path (directory, JSONL or CSV) read with ``load_task``."""
    from metapeft.data.tasks import Task, load_task

    if isinstance(task, Task):
        return task
    return load_task(task, shots=shots, query=query, ways=ways, seed=seed,
                     text_field=text_field, label_field=label_field)


def resolve_init(init: str | None, adapter) -> dict | None:
    """Load initial adapter params from a safetensors file (or ``None`` for a fresh init)."""
    if init is None:
        return None
    from metapeft.artifacts import load_safetensors

    path = Path(init)
    if path.is_dir():
        path = path / "adapters.safetensors"
    if not path.exists():
        try:  # NAME[@VERSION] in the meta-weights registry, when that module exists
            from metapeft.registry import resolve as registry_resolve
        except ImportError:
            registry_resolve = None
        if registry_resolve is None:
            raise UserError("init file does not exist", path=str(init), field="init")
        path = registry_resolve(init)
    arrays, meta = load_safetensors(path)
    return adapter.check_compatible(adapter.unflat(arrays), meta, str(path))


def save_adapter(out: str | Path, adapter, params: dict, extra: dict | None = None) -> Path:
    """Write ``out/adapters.safetensors`` (metadata in the header) and ``out/adapter_config.json``.

    For LoRA/DoRA the config is mlx-lm's own, so ``mlx_lm.load(model, adapter_path=out)`` works.
    """
    from metapeft.artifacts import atomic_write_json, save_safetensors

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError("output path exists and is not a directory", path=str(out), field="out")
    params = adapter.scoring_params(params)
    save_safetensors(out / "adapters.safetensors", adapter.flat(params),
                     adapter.metadata(**(extra or {})))
    config = {"metapeft_version": __version__, "method": adapter.method,
              "config": adapter.config.to_dict(), "model": adapter.base.path,
              "base_model": adapter.base.model_id, "base_model_hash": adapter.base.fingerprint}
    if hasattr(adapter, "mlx_lm_config"):
        config.update(adapter.mlx_lm_config())
    atomic_write_json(out / "adapter_config.json", config)
    return out


def load_adapter(path: str | Path, model: str | None = None):
    """(adapter, params) from a directory written by ``save_adapter``."""
    from metapeft.adapters import get_adapter_class
    from metapeft.artifacts import load_safetensors
    from metapeft.models import load_base_model

    path = Path(path)
    weights = path / "adapters.safetensors" if path.is_dir() else path
    arrays, meta = load_safetensors(weights)
    method = meta.get("method")
    if method is None:
        raise UserError("no 'method' in the safetensors header; not a metapeft adapter",
                        path=str(weights), field="method")
    cls = get_adapter_class(method)
    config = json.loads(meta.get("config", "{}"))
    base_id = model or meta.get("base_model") or "tiny"
    adapter = cls.attach(load_base_model(base_id), cls.Config.from_dict(config, source=str(weights)))
    params = adapter.check_compatible(adapter.unflat(arrays), meta, str(weights))
    return adapter, params


def adapt(task, *, model: str = "tiny", method: str = "lora", steps: int = 20,
          target: float | None = 0.8, init: str | None = None, out: str | Path | None = None,
          config: dict | None = None, lr: float | None = None, optimizer: str = "adam",
          batch_size: int = 64, seed: int = 0, objective: str = DEFAULT_OBJECTIVE,
          shots: int | None = None, query: int | None = None, ways: int | None = None,
          text_field: str = "text", label_field: str = "label",
          on_step: Callable[[int, float, float | None], None] | None = None) -> AdaptReport:
    """Train one adapter on a task's support set; query accuracy at step 0 and after every step."""
    from metapeft.adapters import get_adapter_class
    from metapeft.models import load_base_model
    from metapeft.train import encode_task, train

    if target is not None and not 0.0 <= target <= 1.0:
        raise UserError(f"target must be in [0, 1], got {target}", field="target")
    task = load_task_arg(task, shots=shots, query=query, ways=ways, seed=seed,
                         text_field=text_field, label_field=label_field)
    cls = get_adapter_class(method)
    base = load_base_model(model)
    adapter = cls.attach(base, config or {})
    params = resolve_init(init, adapter)
    if params is None:
        params = adapter.init_params(seed)
    data = encode_task(task, base.tokenizer)
    lr = DEFAULT_LR.get(method, 1e-3) if lr is None else lr
    try:
        res = train(adapter, params, data, steps=steps, lr=lr, optimizer=optimizer,
                    batch_size=batch_size, seed=seed, target=target, objective=objective,
                    on_step=on_step)
    except FloatingPointError as e:
        raise UserError(str(e), field="lr") from None
    report = AdaptReport(
        method=method, steps_to_target=res.steps_to_target, final_accuracy=res.final_accuracy,
        accuracies=[round(a, 6) for a in res.accuracies], losses=[round(v, 6) for v in res.losses],
        target_reached=res.target_reached, num_support=data.num_support,
        num_query=data.num_query, seconds=round(res.seconds, 3),
        extra={"lr": lr, "objective": objective, "train_seconds": res.train_seconds,
               "peak_memory_mb": res.peak_memory_mb, "tokens_per_second": res.tokens_per_second,
               "trainable_parameters": adapter.num_trainable(res.params), "task": task.name,
               "labels": list(task.labels), "model": base.model_id},
        params=res.params, adapter=adapter)
    if out is not None:
        save_adapter(out, adapter, res.params, extra={
            "task": task.name, "steps": steps, "lr": lr, "final_accuracy": report.final_accuracy,
            "labels": list(task.labels), "template": data.encoder.template})
    return report

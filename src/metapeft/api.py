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
    from metapeft.data import Task, load_task

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
    if not path.exists():  # NAME[@VERSION] in the meta-weights registry
        from metapeft.registry import resolve as registry_resolve

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
                     adapter.metadata(params, **(extra or {})))
    config = {"metapeft_version": __version__, "method": adapter.method,
              "config": adapter.config.to_dict(), "model": adapter.base.path,
              "base_model": adapter.base.model_id, "base_model_hash": adapter.base.fingerprint}
    config.update(adapter.mlx_lm_config() or {})
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
          on_step: Callable[[int, float, float | None], None] | None = None,
          on_start: Callable[[], None] | None = None,
          eval_at: set[int] | None = None, record_experience: bool = False) -> AdaptReport:
    """Train one adapter on a task's support set; query accuracy at step 0 and after every step.
    ``on_start`` is called once the inputs are validated, right before training."""
    from metapeft.adapters import get_adapter_class
    from metapeft.models import load_base_model
    from metapeft.train import encode_task, train

    if target is not None and not 0.0 <= target <= 1.0:
        raise UserError(f"target must be in [0, 1], got {target}", field="target")
    from metapeft.scoring import OBJECTIVES

    if objective not in OBJECTIVES:
        raise UserError(f"unknown loss {objective!r}; choose from {', '.join(OBJECTIVES)}",
                        field="loss")
    task = load_task_arg(task, shots=shots, query=query, ways=ways, seed=seed,
                         text_field=text_field, label_field=label_field)
    cls = get_adapter_class(method)
    base = load_base_model(model)
    adapter = cls.attach(base, config or {})
    params = resolve_init(init, adapter)
    if params is None:
        params = adapter.init_params(seed)
    data = encode_task(task, base.tokenizer)
    lr = cls.default_lr if lr is None else lr
    if on_start is not None:
        on_start()
    try:
        res = train(adapter, params, data, steps=steps, lr=lr, optimizer=optimizer,
                    batch_size=batch_size, seed=seed, target=target, objective=objective,
                    on_step=on_step, eval_at=eval_at)
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
               "labels": list(task.labels), "model": base.model_id,
               "eval_steps": res.extra["eval_steps"]},
        params=res.params, adapter=adapter)
    if out is not None:
        save_adapter(out, adapter, res.params, extra={
            "task": task.name, "steps": steps, "lr": lr, "final_accuracy": report.final_accuracy,
            "labels": list(task.labels), "template": data.encoder.template})
    if record_experience:
        _record(report, task, base, "adapt", {"lr": lr, **adapter.config.to_dict()})
    return report


def _record(report, task, base, source: str, hyperparameters: dict) -> None:
    """Append a run to the experience store; a failure to record never fails the run itself."""
    import sys

    try:
        from metapeft.experience import record_adapt

        record_adapt(report, task, base=base, source=source, hyperparameters=hyperparameters)
    except (UserError, OSError) as e:
        print(f"warning: not recorded in the experience store: {e}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Meta-training
# --------------------------------------------------------------------------------------------

class MixtureSource:
    """Episodes from several sources: each draw picks a source uniformly, then an episode."""

    def __init__(self, sources: list, name: str = "mixture"):
        if not sources:
            raise UserError("no usable tasks for meta-training", field="data")
        self.sources, self.name = sources, name
        self.classes = sorted({c for s in sources for c in getattr(s, "classes", [])})

    def sample(self, seed: int):
        import random

        src = self.sources[random.Random(seed).randrange(len(self.sources))]
        return src.sample(seed)


class FixedTasks:
    """A list of ready-made tasks (a directory of task folders, or small feedback groups)."""

    def __init__(self, tasks: list, name: str = "tasks"):
        self.tasks, self.name = tasks, name
        self.classes = sorted({lab for t in tasks for lab in t.labels})

    def sample(self, seed: int):
        import random

        return self.tasks[random.Random(seed).randrange(len(self.tasks))]


def synthetic_pool(per_label: int = 40, seed: int = 0) -> list:
    """Every synthetic family's pool, with ``domain`` = family (the embedded meta-train data)."""
    from metapeft.data.synthetic import FAMILIES, generate_pool

    return [e for fam in FAMILIES if fam != "topic_long" for e in generate_pool(fam, seed, per_label)]


def build_meta_sources(data: str | Path, *, ways: int = 5, shots: int = 5, query: int = 15,
                       domains=None, exclude_domains=None, labels_from=None, exclude_labels=None,
                       val_fraction: float = 0.2, task_strategy: str | None = None,
                       min_samples: int = 20, replay=None, seed: int = 0,
                       text_field: str = "text", label_field: str = "label"):
    """(train source, validation source or None, data spec, extraction report or None).

    ``data`` is ``synthetic`` (the embedded families), a labelled pool file (episodes; classes
    split into meta-train and validation classes, disjoint), a directory of task folders/files,
    or with ``task_strategy`` a feedback log (project/intent/temporal/mixed groups).
    """
    from metapeft import data as ex
    from metapeft.data import load_task, read_rows

    spec = {"data": str(data), "ways": ways, "shots": shots, "query": query,
            "domains": domains, "exclude_domains": exclude_domains,
            "exclude_labels": exclude_labels, "labels_from": labels_from,
            "val_fraction": val_fraction, "task_strategy": task_strategy}
    report = None
    if task_strategy is not None:
        rows = ex.read_feedback(data, text_field, label_field)
        groups, report = ex.extract_tasks(rows, task_strategy, min_samples)
        if not groups:
            raise UserError(f"no group has more than {min_samples} rows and 2 labels",
                            path=str(data), field="min_samples")
        import random

        order = list(range(len(groups)))
        random.Random(seed).shuffle(order)
        n_val = int(round(len(groups) * val_fraction)) if len(groups) > 2 else 0
        def to_src(g):
            try:
                return g.to_source(ways, shots, query, replay)
            except UserError:  # too small for episodes: a fixed support/query split
                return FixedTasks([g.split(0.5, seed)], g.name)
        val = [to_src(groups[i]) for i in order[:n_val]]
        train = [to_src(groups[i]) for i in order[n_val:]]
        spec["groups_train"] = [groups[i].name for i in order[n_val:]]
        spec["groups_val"] = [groups[i].name for i in order[:n_val]]
        tr, va = MixtureSource(train, "feedback"), (MixtureSource(val, "feedback-val") if val else None)
    elif str(data) == "synthetic" or Path(data).is_file():
        if str(data) == "synthetic":
            pool = synthetic_pool()
        else:
            pool = read_rows(data, text_field=text_field, label_field=label_field)
        pool = ex.filter_pool(pool, domains=domains, exclude_domains=exclude_domains,
                              labels_from=labels_from, exclude_labels=exclude_labels)
        labels = sorted({e.label for e in pool})
        train_labels, val_labels = ex.split_classes(labels, val_fraction, seed)
        weights = None
        if replay is not None and any("rating" in e.extra for e in pool):
            weights = ex.replay_weights(pool, replay)
        tr = ex.EpisodeSource(pool, train_labels, ways=min(ways, len(train_labels)), shots=shots,
                              query=query, weights=weights, name=str(data))
        va = (ex.EpisodeSource(pool, val_labels, ways=min(ways, len(val_labels)), shots=shots,
                               query=query, name=f"{data} (validation classes)")
              if val_labels else None)
        spec["train_classes"], spec["val_classes"] = train_labels, val_labels
    elif Path(data).is_dir():
        entries = sorted(p for p in Path(data).iterdir()
                         if p.is_dir() or p.suffix.lower() in (".jsonl", ".csv"))
        tasks = [load_task(p, shots=shots if p.is_file() else None, query=query, ways=ways,
                           seed=seed, text_field=text_field, label_field=label_field)
                 for p in entries]
        if len(tasks) < 2:
            raise UserError("a task directory needs at least 2 tasks", path=str(data))
        n_val = max(1, int(round(len(tasks) * val_fraction))) if val_fraction > 0 else 0
        tr = FixedTasks(tasks[n_val:], str(data))
        va = FixedTasks(tasks[:n_val], f"{data} (validation tasks)") if n_val else None
        spec["tasks_train"] = [t.name for t in tasks[n_val:]]
        spec["tasks_val"] = [t.name for t in tasks[:n_val]]
    else:
        raise UserError("meta-train data does not exist (a pool file, a task directory, or "
                        "'synthetic')", path=str(data), field="data")
    spec["num_train_classes"] = len(getattr(tr, "classes", []))
    return tr, va, spec, report


def meta_train(data: str | Path = "synthetic", *, model: str = "tiny", method: str = "lora",
               algorithm: str = "reptile", name: str = "default", registry: str | Path | None = None,
               config: dict | None = None, ways: int = 5, shots: int = 5, query: int = 15,
               meta_steps: int = 100, meta_batch: int = 4, inner_steps: int = 5,
               inner_lr: float | None = None, inner_optimizer: str | None = None,
               outer_lr: float | None = None, seed: int = 0, eval_every: int = 10,
               eval_episodes: int = 8, val_fraction: float = 0.2, domains=None,
               exclude_domains=None, labels_from=None, exclude_labels=None,
               task_strategy: str | None = None, min_samples: int = 20, replay=None,
               resume: bool = False, vectorise: bool = True, compile: bool = False,
               checkpoint_every: int = 5, on_step=None, on_start=None, sources=None,
               record_experience: bool = False):
    """Meta-learn an adapter init and publish it as a new version of ``name`` in the registry.
    ``on_start`` is called once the inputs are validated, right before the first meta-step."""
    from metapeft import registry as reg
    from metapeft.adapters import get_adapter_class
    from metapeft.artifacts import save_safetensors
    from metapeft.meta.learner import MetaConfig
    from metapeft.meta.run import meta_train as run, version_metadata
    from metapeft.models import load_base_model

    reg.validate_name(name)
    cls = get_adapter_class(method)
    cfg = MetaConfig(algorithm=algorithm, inner_steps=inner_steps,
                     inner_lr=inner_lr if inner_lr is not None else cls.default_lr * 3,
                     inner_optimizer=inner_optimizer or ("sgd" if algorithm == "maml" else "adam"),
                     outer_lr=outer_lr if outer_lr is not None else (1.0 if algorithm == "reptile" else 1e-3))
    cfg.validate()
    if sources is None:
        sources = build_meta_sources(data, ways=ways, shots=shots, query=query, domains=domains,
                                     exclude_domains=exclude_domains, labels_from=labels_from,
                                     exclude_labels=exclude_labels, val_fraction=val_fraction,
                                     task_strategy=task_strategy, min_samples=min_samples,
                                     replay=replay, seed=seed)
    train_src, val_src, spec, report = sources
    base = load_base_model(model)
    adapter = cls.attach(base, config or {})
    ckpt = reg.checkpoint_path(name, registry)
    if on_start is not None:
        on_start()
    result = run(adapter, cfg, train_src, val_source=val_src, meta_steps=meta_steps,
                 meta_batch=meta_batch, seed=seed, eval_every=eval_every,
                 eval_episodes=eval_episodes, checkpoint=ckpt, checkpoint_every=checkpoint_every,
                 resume=resume, vectorise=vectorise, compile=compile, spec=spec, on_step=on_step)
    meta = version_metadata(adapter, cfg, result, spec=spec, meta_steps=meta_steps,
                            meta_batch=meta_batch, hyper={"ways": ways, "shots": shots,
                                                          "query": query, "seed": seed})
    version, path = reg.save_version(name, adapter.flat(result.best_theta), meta, registry)
    try:
        Path(ckpt).unlink()  # the run is complete and published
    except FileNotFoundError:
        pass
    result.version, result.path = version, str(path)
    result.extra.update({"report": report, "spec": spec, "adapter": adapter, "config": cfg})
    if record_experience and result.val_accuracies and val_src is not None:
        # One record: the meta-learned init on held-out validation episodes after inner_steps.
        val_task = val_src.sample(0)
        summary = AdaptReport(
            method=method, steps_to_target=None, final_accuracy=max(result.val_accuracies),
            accuracies=result.val_accuracies, losses=result.meta_losses, target_reached=False,
            num_support=len(val_task.support), num_query=len(val_task.query),
            seconds=round(result.seconds, 3),
            extra={"model": base.model_id, "peak_memory_mb": float("nan"),
                   "trainable_parameters": adapter.num_trainable(result.best_theta),
                   "train_seconds": result.seconds, "meta_weights": f"{name}@{version}"})
        _record(summary, val_task, base, "meta-train",
                {**cfg.to_dict(), "meta_steps": meta_steps, "meta_batch": meta_batch,
                 **adapter.config.to_dict()})
    return result

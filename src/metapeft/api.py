"""The Python API: every ``metapeft`` command is one call here, and returns a report whose
``to_json()`` is what the command's ``--json`` prints (``metapeft.reports``). The CLI only parses
arguments and prints, so a notebook can do everything a command does:

    from metapeft import api
    report = api.adapt("data/my_task", model="tiny", steps=20, out="runs/a")
    report.final_accuracy, report.steps_to_target
    api.select("data/my_task").ranking[0]["method"]
    api.meta_train("synthetic", name="mine", meta_steps=50).version

Commands: ``adapt``, ``meta_train``, ``profile``, ``select``, ``sweep``, ``train_selector``,
``tune``, ``export_adapter``, ``predict``, ``evaluate``. Helpers: ``load_task_arg``, ``build_meta_sources``,
``replay_stats``, ``save_adapter`` / ``load_adapter``, the experience store (``list_experience``,
``experience_record``, ``experience_stats``, ``import_experience``, ``export_experience``) and the
meta-weights registry (``list_weights``, ``show_weights``, ``compare_weights``,
``rollback_weights``, ``delete_weights_plan``, ``delete_weights``, and the drift gate
``check_weights``).

Every call that loads a model takes ``dequantize`` (``auto``, ``always`` or ``never``; see
``models.load_base_model``). Importing this module is cheap; MLX loads inside the calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from metapeft.adapt import DEFAULT_OBJECTIVE, adapt, load_task_arg, record_run
from metapeft.adapter_io import load_adapter, save_adapter
from metapeft.adapters import DEFAULT_METHOD
from metapeft.config import META_RECIPE
from metapeft.errors import UserError
from metapeft.models import DEFAULT_MODEL
from metapeft.registry import compare as compare_weights
from metapeft.registry import delete as delete_weights
from metapeft.registry import delete_plan as delete_weights_plan
from metapeft.registry import list_weights, registry_root
from metapeft.registry import show as show_weights
from metapeft.reports import (AdaptReport, EvaluateReport, ExperienceListing,
                              ExperienceStatsReport, MetaTrainReport, PredictReport, ProfileReport,
                              SelectorReport, SelectReport, SweepReport, TuneReport)

__all__ = [
    "DEFAULT_OBJECTIVE", "AdaptReport", "ExperienceListing", "MetaTrainReport", "ProfileReport",
    "SelectReport", "SelectorReport", "SweepReport", "TuneReport", "adapt", "build_meta_sources",
    "compare_weights", "delete_weights", "delete_weights_plan", "experience_record", "export_adapter",
    "export_experience", "import_experience", "list_experience", "list_weights", "load_adapter",
    "load_task_arg", "meta_train", "profile", "registry_root", "replay_stats", "rollback_weights",
    "save_adapter", "select", "show_weights", "sweep", "train_selector", "tune",
    "EvaluateReport", "PredictReport", "evaluate", "predict", "ExperienceStatsReport",
    "experience_stats", "check_weights", "library_build",
]


# --------------------------------------------------------------------------------------------
# Meta-training
# --------------------------------------------------------------------------------------------

def build_meta_sources(data: str | Path = "synthetic", **options):
    """``MetaSources(train, validation, spec, extraction_report)`` for ``meta_train``'s ``data``;
    the options are ``meta.sources.build_meta_sources``'s."""
    from metapeft.meta.sources import build_meta_sources as build

    return build(data, **options)


def replay_stats(data: str | Path, weights=None) -> dict:
    """How replay weighting (``data.feedback.ReplayWeights``, default weights when None) would
    sample a feedback log: rows, weight and sampling share per rating category."""
    from metapeft.data.feedback import ReplayWeights, read_feedback
    from metapeft.data.feedback import replay_stats as stats

    rows = read_feedback(data) if Path(data).is_file() else []
    return stats(rows, weights or ReplayWeights())


def meta_train(data: str | Path = "synthetic", *, model: str = DEFAULT_MODEL,
               method: str = DEFAULT_METHOD, algorithm: str = "reptile", name: str = "default",
               registry: str | Path | None = None, config: dict | None = None, ways: int = 5,
               shots: int = 5, query: int = META_RECIPE["query"],
               meta_steps: int | None = None,
               meta_batch: int = META_RECIPE["meta_batch"],
               inner_steps: int = META_RECIPE["inner_steps"], inner_lr: float | None = None,
               inner_optimizer: str | None = None, outer_lr: float | None = None, seed: int = 0,
               eval_every: int = META_RECIPE["eval_every"],
               eval_episodes: int = META_RECIPE["eval_episodes"],
               val_fraction: float = META_RECIPE["val_fraction"], val_domains=None,
               domains=None, exclude_domains=None, labels_from=None, exclude_labels=None,
               task_strategy: str | None = None, min_samples: int = 20, replay=None,
               resume: bool = False, vectorise: bool = True, compile: bool = False,
               checkpoint_every: int = 5, dequantize: str = "auto", on_step=None, on_start=None,
               on_sources: Callable | None = None, sources=None,
               record_experience: bool = False, calibrate_lr: bool = True,
               on_calibrate=None, gate: bool = False, gate_data: str | Path | None = None,
               gate_tasks: int = 20, gate_steps: int = 5, gate_tolerance: float = 0.02,
               gate_max_drift: float = 0.3, init: str | None = None,
               forgetting: str | None = None, ewc_lambda: float | None = None,
               replay_fraction: float | None = None, since=None,
               inner_lr_mode: str = "shared",
               inner_lr_meta_lr: float | None = None,
               calibrate_decays=None, calibrate_factors=None,
               calibrate_tasks: int | None = None, calibrate_horizons=(),
               pretrain_steps: int = 0, start_from: str | Path | None = None,
               on_pretrain_step: Callable | None = None) -> MetaTrainReport:
    """Meta-learn an adapter init and publish it as a new version of ``name`` in the registry.
    The defaults are the measured recipe (``config.META_RECIPE``); ``meta_steps`` and the
    calibration's ``calibrate_factors``, ``calibrate_decays`` and ``calibrate_tasks`` default to
    the model size's (``config.recipe_for``: from 10M parameters, SmolLM2-135M's recipe); the
    inner lr defaults to the method's own ``default_lr`` with Adam (3x it with second-order
    MAML's plain SGD).

    ``sources`` (a ``MetaSources``) replaces building them from ``data`` and its options;
    ``on_sources(sources)`` is called once they are built, ``on_start(meta_steps)`` (the number
    of meta-steps, resolved) once the inputs are validated, right before the first meta-step,
    and ``on_step(t, loss, acc, val)`` after each. The validation classes (early stopping and
    the calibration below) are ``val_fraction`` of the pool's classes, or with ``val_domains``
    every class of those domains (``build_meta_sources``).

    ``calibrate_lr``: after training, choose the test-time Adam lr for the published init on the
    validation tasks (``meta.stepsize``; ``on_calibrate(key, row)`` after each candidate, keyed
    by ``stepsize.candidate_key``) and store it as ``adapt_lr``, which ``adapt --init`` then uses
    unless ``--lr`` is given.
    ``calibrate_factors``: the lr factors tried (x the method's lr); ``calibrate_decays``: the
    inverse-time lr decays tried with every factor (0: a constant lr); the chosen one, when not
    0, is stored as ``adapt_lr_decay`` and ``adapt --init`` applies it. ``calibrate_tasks``:
    validation tasks the calibration adapts (None in the recipe: ``eval_episodes``, the
    early-stopping episodes, which are also the first ones of a longer list). On SmolLM2-135M,
    6 could not separate candidates 0.3 points apart and 24 could. ``calibrate_horizons``: run
    lengths (steps) that get a choice of their own, by the accuracy at that step; ``adapt --steps
    N`` then takes the one for N (``stepsize.schedule_for_steps``). The calibration runs to the
    last of them, so a horizon of 50 costs 5x the default's 10 steps.

    ``gate``: publish only when the new weights pass the drift check (``drift``, as ``weights
    check``) against ``name``'s latest version on ``gate_tasks`` probe tasks from ``gate_data``
    (default: ``data`` with its filters), ``gate_steps`` steps each at their own lr; otherwise
    keep them unpublished under ``candidates/NAME/`` with the check's report (the returned
    report's ``published`` is False, ``version`` None, ``path`` the candidate). The check's
    summary is in ``result.extra["gate"]`` and in the published version's metadata.

    ``init`` (``NAME@V``): continue from that published version (``meta.continual``): θ starts
    at it (same method, base model and shapes, else a one-line ``UserError``; its adapter config
    is used unless ``config`` is given), ``forgetting`` (ewc, replay, both or none; default both)
    keeps what it knew (``ewc_lambda``, ``replay_fraction``), and the published version records
    ``parent``, ``forgetting`` and ``gain`` (also in ``result.extra["continual"]``). ``since`` (a
    datetime) keeps only the feedback rows from then on. Every published version stores its
    diagonal Fisher (``fisher.*`` tensors) for a later continuation's EWC.

    ``pretrain_steps``: first train θ jointly on that many meta-train episodes (multitask
    pretraining, ``meta.pretrain``; Meta-Baseline's classifier-then-meta recipe) and meta-learn
    from it. ``start_from``: meta-learn from this adapter instead of a fresh init (a file, an
    adapter directory or ``NAME@V``; e.g. a pretraining kept from an earlier run), with none of
    ``init``'s continual-learning machinery. The published version records either as ``start``;
    ``on_pretrain_step(t, loss)`` is called after each pretraining step.

    ``inner_lr_mode="per-layer"``: meta-learn a multiplier of the inner lr per parameter leaf
    (MAML++'s LSLR; ``meta.learner``), ``inner_lr_meta_lr`` its outer Adam lr. The multipliers
    are published as ``inner_lr.*`` tensors (metadata ``inner_lr_mode`` and a per-module
    summary, ``inner_lr_scales``); the lr calibration and ``adapt --init`` apply them.

    Under ``mlx.launch`` (``mx.distributed``, see ``meta.distributed``) the meta-steps, the
    validation and the calibration are split over the processes; rank 0 alone writes the
    checkpoints, the published version and the experience record, and every rank returns the
    same report.
    """
    from metapeft import registry as reg
    from metapeft.adapters import get_adapter_class
    from metapeft.meta import distributed as dist
    from metapeft.meta.learner import MetaConfig
    from metapeft.meta.run import meta_train as run, require_checkpoint, version_metadata
    from metapeft.models import load_base_model

    from metapeft.artifacts import writable_dir

    reg.validate_name(name)
    writable_dir(reg.name_dir(name, registry), field="registry")
    cls = get_adapter_class(method)
    if cls.training_free:
        raise UserError(f"{method} is training-free: it has no parameters to meta-learn",
                        field="method")
    from metapeft.meta import continual as cont

    if init is None and forgetting not in (None, "none"):
        raise UserError(f"--forgetting {forgetting} needs --init NAME@V (a version to keep)",
                        field="forgetting")
    forgetting = forgetting or ("both" if init is not None else "none")
    if forgetting not in cont.FORGETTING:
        raise UserError(f"unknown --forgetting '{forgetting}'; choose one of "
                        f"{', '.join(cont.FORGETTING)}", field="forgetting")
    ewc_lambda = cont.DEFAULT_EWC_LAMBDA if ewc_lambda is None else float(ewc_lambda)
    replay_fraction = (cont.DEFAULT_REPLAY_FRACTION if replay_fraction is None
                       else float(replay_fraction))
    if ewc_lambda < 0 or not 0 <= replay_fraction <= 1:
        raise UserError("--ewc-lambda must be >= 0 and --replay-fraction in [0, 1]",
                        field="ewc_lambda" if ewc_lambda < 0 else "replay_fraction")
    if calibrate_factors is not None and any(not f > 0 for f in calibrate_factors):
        raise UserError(f"--lr-factors must be > 0, got {list(calibrate_factors)}",
                        field="lr_factors")
    if calibrate_tasks is not None and calibrate_tasks < 1:
        raise UserError(f"--calibrate-tasks must be >= 1, got {calibrate_tasks}",
                        field="calibrate_tasks")
    if any(int(h) != h or h < 1 for h in calibrate_horizons or ()):
        raise UserError("--calibrate-horizons must be whole numbers of steps >= 1, got "
                        f"{list(calibrate_horizons)}", field="calibrate_horizons")
    if pretrain_steps < 0:
        raise UserError(f"--pretrain-steps must be >= 0, got {pretrain_steps}",
                        field="pretrain_steps")
    starts = [flag for flag, on in (("--init", init is not None),
                                    ("--pretrain-steps", pretrain_steps > 0),
                                    ("--start-from", start_from is not None)) if on]
    if len(starts) > 1:
        raise UserError(f"{' and '.join(starts)} each set where meta-training starts; give one",
                        field=starts[1].lstrip("-").replace("-", "_"))
    start_path = _start_path(start_from, registry) if start_from is not None else None
    ckpt = reg.checkpoint_path(name, registry)
    if resume:
        require_checkpoint(ckpt)  # before the model loads
    if init is not None and config is None:  # the parent's adapter options, so shapes match
        from metapeft.artifacts import json_field

        _, _, parent_meta = cont.parent_header(init, registry)
        if parent_meta.get("method") not in (None, method):
            raise UserError(f"cannot continue from {init}: it is {parent_meta.get('method')} "
                            f"meta-weights, not {method}", field="init")
        config = json_field(parent_meta, "config") or {}
    cfg = MetaConfig(algorithm=algorithm, inner_steps=inner_steps,
                     inner_lr=inner_lr if inner_lr is not None else cls.default_lr * (
                         3 if inner_optimizer == "sgd" or (inner_optimizer is None
                                                           and algorithm == "maml") else 1),
                     inner_optimizer=inner_optimizer or ("sgd" if algorithm == "maml" else "adam"),
                     outer_lr=outer_lr if outer_lr is not None else (1.0 if algorithm == "reptile" else 1e-3),
                     inner_lr_mode=inner_lr_mode,
                     **({} if inner_lr_meta_lr is None else {"inner_lr_meta_lr": inner_lr_meta_lr}))
    cfg.validate()
    if sources is None:
        sources = build_meta_sources(data, ways=ways, shots=shots, query=query, domains=domains,
                                     exclude_domains=exclude_domains, labels_from=labels_from,
                                     exclude_labels=exclude_labels, val_fraction=val_fraction,
                                     val_domains=val_domains, task_strategy=task_strategy,
                                     min_samples=min_samples, replay=replay, seed=seed,
                                     since=since)
    spec = sources.spec
    base = load_base_model(model, dequantize=dequantize)
    adapter = cls.attach(base, config or {})
    if None in (meta_steps, calibrate_factors, calibrate_decays, calibrate_tasks):
        from metapeft.config import recipe_for

        recipe = recipe_for(base.num_parameters)
        meta_steps = recipe["meta_steps"] if meta_steps is None else meta_steps
        calibrate_factors = calibrate_factors or recipe["lr_factors"]
        calibrate_decays = calibrate_decays or recipe["lr_decays"]
        calibrate_tasks = calibrate_tasks or recipe["calibrate_tasks"]
    _check_meta_memory(adapter, sources.train, meta_batch=meta_batch, seed=seed)
    group = dist.world()  # this process alone unless started by mlx.launch
    plan = (_plan_continual(init, adapter, cfg, registry, forgetting=forgetting,
                            ewc_lambda=ewc_lambda, replay_fraction=replay_fraction, ways=ways,
                            shots=shots, query=query, eval_episodes=eval_episodes, group=group)
            if init is not None else None)
    gate_plan = None
    if gate:  # probe tasks and the latest version, now: a bad --gate fails before training
        gate_plan = _plan_gate(name, registry, gate_data, data, adapter=adapter,
                               task_strategy=task_strategy, tasks=gate_tasks, steps=gate_steps,
                               tolerance=gate_tolerance, max_drift=gate_max_drift, ways=ways,
                               shots=shots, query=query, seed=seed, domains=domains,
                               exclude_domains=exclude_domains, labels_from=labels_from,
                               exclude_labels=exclude_labels)
    if on_sources is not None:
        on_sources(sources)
    start_theta, start = _meta_start(adapter, sources.train, pretrain_steps=pretrain_steps,
                                     start_from=start_from, start_path=start_path, seed=seed,
                                     skip=resume,  # θ comes from the checkpoint
                                     on_step=on_pretrain_step, group=group)
    if on_start is not None:
        on_start(meta_steps)
    run_args = plan.run_args() if plan is not None else {}
    if start_theta is not None:  # and early stopping may keep it (validated as meta-step 0)
        run_args.update(init=start_theta, validate_start=True)
    result = run(adapter, cfg, sources.train, val_source=sources.validation,
                 meta_steps=meta_steps, meta_batch=meta_batch, seed=seed, eval_every=eval_every,
                 eval_episodes=eval_episodes, checkpoint=ckpt, checkpoint_every=checkpoint_every,
                 resume=resume, vectorise=vectorise, compile=compile, spec=spec, on_step=on_step,
                 group=group, **run_args)
    meta = version_metadata(adapter, cfg, result, spec=spec, meta_steps=meta_steps,
                            meta_batch=meta_batch, hyper={"ways": ways, "shots": shots,
                                                          "query": query, "seed": seed})
    if start is not None:
        import json

        meta["start"] = json.dumps(start)
        result.extra["start"] = start
    lr_scales = scale_arrays = None
    if result.best_log_lr is not None:  # per-layer inner lrs: stored with the weights
        import json

        from metapeft.adapter_io import inner_lr_arrays, inner_lr_summary, split_inner_lr

        scale_arrays = inner_lr_arrays(result.best_log_lr)
        lr_scales = split_inner_lr(scale_arrays)
        meta.update(inner_lr_mode=cfg.inner_lr_mode,
                    inner_lr_scales=json.dumps(inner_lr_summary(lr_scales)))
    n_calibrate = eval_episodes if calibrate_tasks is None else calibrate_tasks
    if calibrate_lr and sources.validation is not None and n_calibrate > 0:
        import json

        from metapeft.meta.run import validation_tasks
        from metapeft.meta.stepsize import calibrate_adapt_lr

        cal = calibrate_adapt_lr(adapter, result.best_theta,
                                 validation_tasks(sources.validation, seed, n_calibrate),
                                 cls.default_lr, on_trial=on_calibrate, group=group,
                                 lr_scales=lr_scales, decays=calibrate_decays,
                                 factors=calibrate_factors, horizons=calibrate_horizons or ())
        meta.update(adapt_lr=str(cal["adapt_lr"]), adapt_lr_calibration=json.dumps(cal))
        if cal["adapt_lr_decay"]:
            meta["adapt_lr_decay"] = str(cal["adapt_lr_decay"])
        result.extra["adapt_lr"] = cal
    fisher = None
    if sources.validation is not None and eval_episodes > 0:  # stored for a later EWC
        from metapeft.meta.run import validation_tasks

        fisher = cont.diagonal_fisher(adapter, cfg, result.best_theta, _encode_tasks(
            adapter, validation_tasks(sources.validation, seed, eval_episodes)), group)
    if plan is not None:
        cal = result.extra.get("adapt_lr")
        summary = plan.measure(adapter, result.best_theta,
                               cal["adapt_lr"] if cal else cls.default_lr, cls.default_lr,
                               validation_tasks_of(sources.validation, seed, eval_episodes))
        result.extra["continual"] = summary
        meta.update(parent=plan.parent.spec, forgetting=summary["forgetting"],
                    gain=summary["gain"], continual=summary["settings"])
    arrays = adapter.flat(result.best_theta)
    if fisher is not None:  # the version's diagonal Fisher, for a later continuation's EWC
        arrays.update(cont.fisher_arrays(fisher))
    if scale_arrays is not None:  # the per-layer inner-lr multipliers, inner_lr.*
        arrays.update(scale_arrays)
    if gate_plan is not None:
        kept = _gate_candidate(gate_plan, adapter, result, meta, cls.default_lr, arrays=arrays,
                               report_args=dict(
            name=name, method=method, algorithm=algorithm, vectorise=vectorise, sources=sources,
            config=cfg), registry=registry, is_root=dist.is_root(group), checkpoint=ckpt)
        if kept is not None:  # failed the check: kept unpublished under candidates/
            return kept
    version = path = None
    if dist.is_root(group):  # rank 0 publishes for every rank
        version, path = reg.save_version(name, arrays, meta, registry)
        Path(ckpt).unlink(missing_ok=True)  # the run is complete and published
    result.version, result.path = version, str(path)
    report = MetaTrainReport(name=name, version=version, path=str(path), method=method,
                             algorithm=algorithm,
                             vectorised=vectorise and result.fallback_reason is None,
                             result=result, sources=sources, adapter=adapter, config=cfg)
    if record_experience and dist.is_root(group):
        _record_meta_init(report, base, meta_steps=meta_steps, meta_batch=meta_batch,
                          eval_episodes=eval_episodes, seed=seed)
    if dist.size_of(group) > 1:  # the other ranks wait for rank 0's writes; it tells the version
        version = int(dist.barrier(group, version or 0))
        path = reg.version_path(name, version, registry)
        report.version, report.path = result.version, result.path = version, str(path)
    return report


def _start_path(start_from, registry) -> Path:
    """The file ``--start-from`` names (a one-line error if none), checked before the model
    loads."""
    from metapeft.adapter_io import init_path

    if str(start_from).startswith("library:"):  # built per task by adapt, not one θ
        raise UserError(f"--start-from takes an adapter file, directory or NAME@V, not "
                        f"{start_from!r}", field="start_from")
    try:
        return init_path(start_from, registry)
    except UserError as e:  # resolve() names the field adapt's --init
        raise UserError(e.message, path=e.path, line=e.line, field="start_from") from None


def _meta_start(adapter, train_source, *, pretrain_steps: int, start_from, start_path, seed: int,
                skip: bool, on_step=None, group=None) -> tuple[dict | None, dict | None]:
    """(θ to meta-learn from, what the published version records of it as ``start``), or
    (None, None) for the adapter's fresh init. ``skip``: a resumed run, whose θ comes from the
    checkpoint (the record is still returned). Under ``mlx.launch`` rank 0 alone pretrains and
    hands its θ to the others (one all-reduce), rather than every rank repeating the same work."""
    if start_from is not None:
        from metapeft.adapter_io import resolve_init

        theta = None if skip else resolve_init(start_path, adapter)  # resolved before loading
        return theta, {"from": str(start_from), "file": start_path.name}
    if pretrain_steps > 0:
        import time

        from metapeft.meta import distributed as dist
        from metapeft.meta.pretrain import multitask_pretrain

        t0 = time.perf_counter()
        lr = type(adapter).default_lr
        theta = None
        if not skip:
            theta = (multitask_pretrain(adapter, train_source, pretrain_steps, lr, seed=seed,
                                        on_step=on_step)
                     if dist.is_root(group) else adapter.init_params(seed))  # shapes only
            theta = dist.broadcast_tree(theta, group)
        return theta, {"pretrain_steps": pretrain_steps, "lr": lr,  # seconds: None on resume
                       "seconds": None if skip else round(time.perf_counter() - t0, 3)}
    return None, None


def _encode_tasks(adapter, tasks: list) -> list:
    from metapeft.meta.batch import encode_episode

    return [encode_episode(t, adapter.base.tokenizer, prepare=adapter.prepare) for t in tasks]


def validation_tasks_of(source, seed: int, count: int) -> list:
    from metapeft.meta.run import validation_tasks

    return validation_tasks(source, seed, count) if source is not None and count > 0 else []


class _ContinualPlan:
    """``meta_train(init=...)``: the parent, its EWC anchor and replay source, settled before
    training (``meta.continual``)."""

    def __init__(self, parent, *, forgetting, ewc_lambda, replay_fraction, anchor,
                 replay_source, parent_val_tasks, notes, fisher_from):
        self.parent, self.forgetting, self.ewc_lambda = parent, forgetting, ewc_lambda
        self.replay_fraction, self.anchor, self.replay_source = (replay_fraction, anchor,
                                                                 replay_source)
        self.parent_val_tasks, self.notes, self.fisher_from = parent_val_tasks, notes, fisher_from

    def run_args(self) -> dict:
        return {"init": self.parent.theta, "anchor": self.anchor,
                "replay_source": self.replay_source,
                "replay_fraction": self.replay_fraction if self.replay_source is not None else 0.0}

    def measure(self, adapter, theta, lr, default_lr, new_val_tasks) -> dict:
        from metapeft.meta import continual as cont

        steps = cont.DEFAULT_STEPS
        old = cont.measure(adapter, theta, lr, self.parent, default_lr, self.parent_val_tasks,
                           steps)
        new = cont.measure(adapter, theta, lr, self.parent, default_lr, new_val_tasks, steps)
        forgetting = gain = None
        if old is not None and old["accuracy_new"] is not None:
            drop = old["accuracy_parent"] - old["accuracy_new"]
            forgetting = {"on": f"{self.parent.spec}'s validation tasks", "tasks": old["tasks"],
                          "steps": steps, "accuracy_parent": old["accuracy_parent"],
                          "accuracy_new": old["accuracy_new"], "drop": drop,
                          "relative": drop / old["accuracy_parent"]
                          if old["accuracy_parent"] else None}
        if new is not None and new["accuracy_new"] is not None:
            gain = {"on": "the new data's validation tasks", "tasks": new["tasks"],
                    "steps": steps, "accuracy_parent": new["accuracy_parent"],
                    "accuracy_new": new["accuracy_new"],
                    "gain": new["accuracy_new"] - new["accuracy_parent"]}
        distance = float(sum(float(mx_sq_sum(a, b)) for a, b in
                             zip(_leaves(theta), _leaves(self.parent.theta)))) ** 0.5
        settings = {"parent": self.parent.spec, "forgetting": self.forgetting,
                    "ewc_lambda": self.ewc_lambda if self.anchor is not None else None,
                    "fisher": self.fisher_from,
                    "replay_fraction": self.replay_fraction
                    if self.replay_source is not None else None, "notes": self.notes}
        return {"parent": self.parent.spec, "forgetting": forgetting, "gain": gain,
                "distance_to_parent": distance, "settings": settings}


def _leaves(tree) -> list:
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]


def mx_sq_sum(a, b) -> float:
    import mlx.core as mx

    return ((a.astype(mx.float32) - b.astype(mx.float32)) ** 2).sum().item()


def _plan_continual(init: str, adapter, cfg, registry, *, forgetting: str, ewc_lambda: float,
                    replay_fraction: float, ways: int, shots: int, query: int,
                    eval_episodes: int, group) -> _ContinualPlan:
    """Load the parent, re-create its data (replay, its validation tasks for the Fisher and the
    forgetting measure), and settle EWC and replay; what cannot be had is said in ``notes``."""
    from metapeft.meta import continual as cont

    parent = cont.load_parent(init, adapter, registry)
    notes: list[str] = []
    psrc, why = cont.parent_sources(parent, ways=ways, shots=shots, query=query)
    if why:
        notes.append(why)
    use_replay = forgetting in ("replay", "both")
    use_ewc = forgetting in ("ewc", "both")
    replay_source = None
    if use_replay:
        if psrc is None:
            notes.append("replay is not possible without the parent's data: EWC is used instead")
            use_ewc = True
        else:
            replay_source = psrc.train
    pseed = int(parent.hyper.get("seed", 0))
    count = eval_episodes if eval_episodes > 0 else int(parent.hyper.get("eval_episodes", 8) or 8)
    parent_val = (validation_tasks_of(psrc.validation, pseed, count)
                  if psrc is not None else [])
    if psrc is not None and psrc.validation is None:
        notes.append(f"{parent.spec}'s data has no validation split: forgetting is not measured")
    anchor, fisher_from = None, None
    if use_ewc:
        if parent.fisher is not None:
            fisher, fisher_from = parent.fisher, "stored with the parent"
        elif parent_val:
            fisher = cont.diagonal_fisher(adapter, cfg, parent.theta,
                                          _encode_tasks(adapter, parent_val), group)
            fisher_from = f"computed now on {len(parent_val)} of the parent's validation tasks"
        else:
            from mlx.utils import tree_map
            import mlx.core as mx

            fisher = tree_map(mx.ones_like, parent.theta)
            fisher_from = "none available: a uniform L2 pull (F = 1)"
            notes.append("the parent has no stored Fisher and no reachable validation tasks: "
                         "EWC falls back to a plain L2 pull toward it")
        anchor = cont.Anchor.make(parent.theta, fisher, ewc_lambda)
    return _ContinualPlan(parent, forgetting=forgetting, ewc_lambda=ewc_lambda,
                          replay_fraction=replay_fraction, anchor=anchor,
                          replay_source=replay_source, parent_val_tasks=parent_val, notes=notes,
                          fisher_from=fisher_from)


def _plan_gate(name: str, registry, gate_data, data, *, task_strategy, domains,
               exclude_domains, labels_from, exclude_labels, **options):
    """``meta_train(gate=True)``'s ``drift.GatePlan``: probe tasks from ``gate_data``, else
    from the training ``data`` with its domain and label filters."""
    from metapeft.drift import plan_gate

    if gate_data is None:
        if task_strategy is not None:
            raise UserError("--gate on a feedback log needs --gate-data: a pool or task "
                            "directory to draw the probe tasks from", field="gate_data")
        return plan_gate(name, data, registry=registry, domains=domains,
                         exclude_domains=exclude_domains, labels_from=labels_from,
                         exclude_labels=exclude_labels, **options)
    return plan_gate(name, gate_data, registry=registry, **options)


def _gate_candidate(plan, adapter, result, meta: dict, default_lr: float, *, arrays: dict,
                    report_args: dict,
                    registry, is_root: bool, checkpoint) -> MetaTrainReport | None:
    """Check the trained init against the latest version (``plan``). Passed (or nothing to check
    against): the summary joins ``meta`` and ``result.extra["gate"]``, and None is returned so
    the run publishes as usual. Failed: the candidate and its report are kept under
    ``candidates/NAME/`` (by rank 0), the checkpoint is removed (the run is complete), and the
    unpublished report is returned."""
    import json

    cal = result.extra.get("adapt_lr")
    lr, lr_from = (cal["adapt_lr"], "adapt_lr") if cal else (default_lr, "method default")
    from metapeft.adapter_io import split_inner_lr

    check = plan.run(adapter, result.best_theta, lr=lr, lr_from=lr_from,
                     lr_scales=split_inner_lr(arrays),  # per-layer inner lrs, as adapt applies
                     lr_decay=(cal or {}).get("adapt_lr_decay", 0.0))
    summary = plan.summary(check)
    result.extra["gate"] = summary
    meta["gate"] = json.dumps(summary)
    if check is None or check.passed:
        return None
    path = None
    if is_root:
        from metapeft.drift import keep_candidate

        path = keep_candidate(plan.name, arrays, meta, check, registry)
        Path(checkpoint).unlink(missing_ok=True)
    result.version, result.path = None, None if path is None else str(path)
    vectorise = report_args.pop("vectorise")
    return MetaTrainReport(**report_args, version=None, path=result.path, result=result,
                           vectorised=vectorise and result.fallback_reason is None,
                           adapter=adapter)


def _check_meta_memory(adapter, source, *, meta_batch: int, seed: int) -> None:
    """Refuse a meta-step that cannot fit in memory (``scoring.check_memory``), sized on the
    first episode: every task of the meta-batch scores its support and query examples against
    all of its labels at once."""
    from metapeft.meta.batch import encode_episode
    from metapeft.scoring import check_memory

    if meta_batch < 1:
        return  # meta.run refuses it with its own message
    ep = encode_episode(source.sample(seed * 1_000_003), adapter.base.tokenizer)
    examples = ep.support.size + ep.query.size
    labels = ep.support.label_tokens.shape[0]
    virtual = int(getattr(adapter.config, "num_virtual_tokens", 0) or 0)
    check_memory(adapter.base.model, meta_batch * examples * labels,
                 max(ep.support.prompt.shape[1], ep.query.prompt.shape[1]) + virtual,
                 ep.support.label_tokens.shape[1],
                 what=f"a meta-step of {meta_batch} tasks x {examples} examples x {labels} labels",
                 hint="lower --ways, --shots/--query or --meta-batch", field="ways")


def _source_domains(source) -> set[str]:
    """The domains a meta-train source draws from (its examples' ``domain`` field, or each
    fixed task's domain); empty when the data names none."""
    from metapeft.select.features import task_domain

    if source is None:
        return set()
    if hasattr(source, "sources"):  # MixtureSource
        return set().union(*(_source_domains(s) for s in source.sources))
    if hasattr(source, "tasks"):  # FixedTasks
        return {d for d in (task_domain(t) for t in source.tasks) if d != "unknown"}
    classes = set(getattr(source, "classes", []))
    return {str(e.extra["domain"]) for e in getattr(source, "pool", [])
            if e.label in classes and e.extra.get("domain")}


def _record_meta_init(report: MetaTrainReport, base, *, meta_steps: int, meta_batch: int,
                      eval_episodes: int, seed: int) -> None:
    """One experience record for every meta-train run: the published init's accuracy after
    ``inner_steps`` on held-out validation episodes (its best validation accuracy, the one that
    chose it; with ``eval_every=0`` it is validated once now), or, without validation classes,
    its last meta-batch's query accuracy on meta-train tasks (``accuracy_on`` says which). A run
    over several domains is recorded as domain ``mixed``, with the list in ``domains``."""
    import copy
    import math

    from metapeft.meta.batch import encode_episode
    from metapeft.meta.run import validate_theta
    from metapeft.train import AdaptResult

    res, adapter, sources = report.result, report.adapter, report.sources
    if res.val_accuracies:
        accuracy, on, source = max(res.val_accuracies), "validation episodes", sources.validation
    elif sources.validation is not None:
        episodes = [encode_episode(sources.validation.sample(10_000_019 * (seed + 1) + i),
                                   base.tokenizer, prepare=adapter.prepare)
                    for i in range(max(eval_episodes, 1))]
        accuracy = validate_theta(adapter, report.config, res.best_theta, episodes)
        on, source = "validation episodes", sources.validation
    elif res.meta_accuracies:
        accuracy, on, source = res.meta_accuracies[-1], "meta-train tasks", sources.train
    else:
        return
    task = copy.copy(source.sample(0))
    task.meta = {k: v for k, v in (task.meta or {}).items() if k != "family"}
    domains = sorted(_source_domains(sources.train) | _source_domains(sources.validation))
    if len(domains) > 1:
        task.meta["domain"] = "mixed"
    elif domains:
        task.meta["domain"] = domains[0]
    summary = AdaptReport.from_result(
        AdaptResult(params=res.best_theta, losses=res.meta_losses,
                    accuracies=[accuracy], steps_to_target=None,
                    target_reached=False, seconds=res.seconds, train_seconds=res.seconds,
                    peak_memory_mb=math.nan, tokens_per_second=0.0),
        method=report.method, adapter=adapter, num_support=len(task.support),
        num_query=len(task.query), model=base.model_id,
        meta_weights=f"{report.name}@{report.version}")
    record_run(summary, task, base, "meta-train",
               {**report.config.to_dict(), "meta_steps": meta_steps, "meta_batch": meta_batch,
                **adapter.config.to_dict(), "accuracy_on": on,
                **({"domains": domains} if len(domains) > 1 else {})})


# --------------------------------------------------------------------------------------------
# Task profiles and method selection
# --------------------------------------------------------------------------------------------

def _task_features(task, model: str, dequantize: str, task_options: dict):
    """(Task, its feature dict) on ``model``."""
    from metapeft.models import load_base_model
    from metapeft.select.features import task_features

    t = load_task_arg(task, **task_options)
    return t, task_features(t, load_base_model(model, dequantize=dequantize))


def profile(task, *, model: str = DEFAULT_MODEL, dequantize: str = "auto",
            shots: int | None = None, query: int | None = None, ways: int | None = None,
            seed: int = 0, text_field: str = "text", label_field: str = "label") -> ProfileReport:
    """A task's features: size, shots, classes, lengths, vocabulary, zero-shot difficulty, a
    Fisher statistic of a fresh probe adapter, and its domain."""
    from metapeft.select.features import task_domain

    t, feats = _task_features(task, model, dequantize, dict(
        shots=shots, query=query, ways=ways, seed=seed, text_field=text_field,
        label_field=label_field))
    return ProfileReport(task=t.name, domain=task_domain(t), features=feats, model=model)


def select(task, *, model: str = DEFAULT_MODEL, dequantize: str = "auto", top: int | None = None,
           k: int = 5, selector: str | Path | None = None, experience: str | Path | None = None,
           shots: int | None = None, query: int | None = None, ways: int | None = None,
           seed: int = 0, text_field: str = "text", label_field: str = "label") -> SelectReport:
    """Rank the PEFT methods for a task: a trained selector (``selector``, default
    ``<registry root>/selector``), else one trained now from the experience store, else priors;
    and the init sources available for the top method, ranked (``init_sources.recommend``)."""
    from metapeft.experience import ExperienceStore
    from metapeft.init_sources import recommend
    from metapeft.models import load_base_model
    from metapeft.select.features import task_domain
    from metapeft.select.selector import select as answer

    if top is not None and top < 1:
        raise UserError("--top must be at least 1", field="top")
    t, feats = _task_features(task, model, dequantize, dict(
        shots=shots, query=query, ways=ways, seed=seed, text_field=text_field,
        label_field=label_field))
    store = ExperienceStore(experience)
    res = answer(feats, selector_dir=selector, store=store, top=top, k=k)
    best = res["ranking"][0]
    inits = recommend(feats, best["method"], load_base_model(model, dequantize=dequantize),
                      config=best["hyperparameters"], experience=store, domain=task_domain(t),
                      steps=best["hyperparameters"].get("steps"))  # the length it recommends
    return SelectReport(task=t.name, **res, init_sources=inits)


def train_selector(*, experience: str | Path | None = None, out: str | Path | None = None,
                   epochs: int = 400, seed: int = 0) -> SelectorReport:
    """Train the task embedder and the method selector from the experience store and save them
    (default ``<registry root>/selector``, where ``select`` looks)."""
    from metapeft.experience import ExperienceStore
    from metapeft.select.selector import default_selector_dir, train_selector as fit

    from metapeft.artifacts import writable_dir

    writable_dir(out or default_selector_dir(), field="out")
    store = ExperienceStore(experience)
    recs = store.load()
    sel = fit(recs, epochs=epochs, seed=seed, info={"trained_on": str(store.path)})
    paths = sel.save(out or default_selector_dir())
    return SelectorReport(tasks=len(sel.ref_info), records=len(recs), methods=sel.methods,
                          temperature=sel.temperature,
                          embedder_loss=sel.embedder.info.get("final_loss"), paths=paths,
                          selector=sel)


def sweep(data: str = "synthetic", *, methods="all", tasks: int = 10,
          model: str = DEFAULT_MODEL, dequantize: str = "auto", steps: int = 10, seed: int = 0,
          max_shots: int = 50, max_ways: int = 20, query: int = 5, eval_every: int | None = None,
          inits: dict[str, str] | None = None, experience: str | Path | None = None,
          init_sources: str | list[str] | None = None,
          on_start: Callable[[int, int], None] | None = None,
          on_run: Callable | None = None) -> SweepReport:
    """Build experience: run every method (``"all"``, a comma list or a list) on ``tasks``
    sampled tasks (1 to ``max_shots`` shots, 2 to ``max_ways`` ways), and also from meta-weights
    ``inits[method]``; append one record per run to the experience store. ``init_sources``
    (``"all"`` or a comma list of fresh, meta, compose, merge, generate, route): run each
    method from each of those init sources available for it instead (``sweep.plan_runs``),
    which teaches ``select`` which source wins for which kind of task.

    ``on_start(num_tasks, num_runs)`` is called once the tasks are drawn, ``on_run(task_index,
    method, accuracy or None)`` after each run."""
    from metapeft.adapters import parse_methods
    from metapeft.data.episodes import sample_sweep_tasks
    from metapeft.experience import ExperienceStore
    from metapeft.sweep import run_sweep

    for flag, value, least in (("tasks", tasks, 1), ("steps", steps, 1),
                               ("max-shots", max_shots, 1), ("max-ways", max_ways, 2),
                               ("query", query, 1)):
        if value < least:
            raise UserError(f"--{flag} must be at least {least}, got {value}",
                            field=flag.replace("-", "_"))
    from metapeft.init_sources import parse_sources

    ms = parse_methods(methods)
    sources = parse_sources(init_sources)
    ts = sample_sweep_tasks(data, tasks, seed=seed, max_shots=max_shots, max_ways=max_ways,
                            query=query)
    store = ExperienceStore(experience)
    summary = run_sweep(ts, ms, model=model, dequantize=dequantize, steps=steps, seed=seed,
                        store=store, inits=inits, eval_every=eval_every, on_run=on_run,
                        init_sources=sources, on_start=on_start)
    return SweepReport(**summary, experience=str(store.path))


# --------------------------------------------------------------------------------------------
# Hyperparameter search
# --------------------------------------------------------------------------------------------

def tune(task=None, *, model: str = DEFAULT_MODEL, dequantize: str = "auto", methods="all",
         trials: int | None = None, time_budget: float | None = None, steps: int | None = None,
         objectives: str | list[str] | None = "accuracy,seconds,memory", init: str | None = None,
         name: str | None = None, resume: str | None = None, registry: str | Path | None = None,
         space: str | Path | None = None, seed: int = 0, n_initial: int | None = None,
         acq_func: str = "EI", warm_start: bool = True, k: int = 3, record: bool = True,
         compile: bool = False, shots: int | None = None, query: int | None = None,
         ways: int | None = None, text_field: str = "text", label_field: str = "label",
         plot: str | Path | None = None, on_start=None, on_trial=None) -> TuneReport:
    """Bayesian search (skopt GP; ParEGO for several objectives) over PEFT configurations: a
    new study ``name`` on ``task``, or continue study ``resume``. ``plot``: also write a PNG of
    the front (``TuneReport.plot`` stays None without matplotlib).

    Under ``mlx.launch`` (``metapeft tune --workers N`` starts it) the N processes evaluate N
    trials at a time, from skopt's batched constant-liar suggestions; rank 0 alone writes the
    study, the experience records and the plot, and every rank returns the same report
    (``tune.search.tune``)."""
    from metapeft.meta.distributed import is_root, world
    from metapeft.tune import plot as tune_plot, search

    if resume is None and task is None:
        raise UserError("give a TASK (or --resume STUDY)", field="task")
    if resume is None and not name:
        raise UserError("a new study needs --name (or continue one with --resume)", field="name")
    if plot is not None:
        from metapeft.artifacts import writable_file

        writable_file(plot, field="plot")
    res = search.tune(task, model=model, dequantize=dequantize, methods=methods, trials=trials,
                      time_budget=time_budget, steps=steps, objectives=objectives, init=init,
                      name=name, resume=resume, registry=registry, space_file=space, seed=seed,
                      n_initial=n_initial, acq_func=acq_func, warm_start=warm_start, k=k,
                      record=record, compile=compile, shots=shots, query=query, ways=ways,
                      text_field=text_field, label_field=label_field, on_trial=on_trial,
                      on_start=on_start)
    written = (tune_plot.plot_study(res.study, plot) if plot is not None and is_root(world())
               else None)
    return TuneReport(result=res, plot=written)


# --------------------------------------------------------------------------------------------
# Adapters, experience store, meta-weights registry
# --------------------------------------------------------------------------------------------

def export_adapter(adapter_dir: str | Path, out: str | Path, fmt: str = "peft") -> Path:
    """Convert an adapter directory to another ecosystem's layout (``peft``: HF peft)."""
    from metapeft.export import export_peft

    if fmt != "peft":
        raise UserError(f"unknown format {fmt!r}; supported: peft", field="format")
    return export_peft(adapter_dir, out)


def predict(adapter: str | Path, inputs, *, model: str | None = None,
            dequantize: str = "auto", out: str | Path | None = None, top_k: int | None = None,
            batch_size: int = 32, text_field: str = "text",
            on_start: Callable[[int], None] | None = None,
            on_batch: Callable[[int], None] | None = None) -> PredictReport:
    """Classify texts with an adapter directory written by ``adapt --out`` (any method), on the
    base model it was trained on (``model`` must be that model). ``inputs``: a JSONL or CSV file
    with a ``text_field``, ``"-"`` for standard input, or a list of texts. Every prediction holds
    the row's ``id`` (else its text), the label and the probabilities (softmax over the
    candidates' scores; the ``top_k`` most likely, all by default), in input order; ``out``:
    also write them as JSON lines. ``on_start(n)`` is called once the inputs are read and the
    adapter is loaded, ``on_batch(k)`` after each batch of k texts."""
    import json
    import time

    from metapeft.artifacts import atomic_write_text
    from metapeft.classify import (Classifier, check_out_file, predictions, read_inputs,
                                   text_examples)

    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}", field="top_k")
    out = None if out is None else check_out_file(out)
    t0 = time.perf_counter()
    if isinstance(inputs, (list, tuple)):
        rows = text_examples(inputs)
    else:
        rows = read_inputs(inputs, text_field=text_field)
    clf = Classifier.load(adapter, model, dequantize=dequantize)
    if on_start is not None:
        on_start(len(rows))
    preds = predictions(clf, rows, top_k=top_k, batch_size=batch_size, on_batch=on_batch)
    if out is not None:
        atomic_write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    return PredictReport(adapter=str(adapter), model=clf.model_id, labels=clf.labels,
                         predictions=preds, seconds=time.perf_counter() - t0, out=out)


def evaluate(adapter: str | Path, test: str | Path, *, model: str | None = None,
             dequantize: str = "auto", batch_size: int = 32, text_field: str = "text",
             label_field: str = "label", plot: str | Path | None = None,
             on_start: Callable[[int], None] | None = None,
             on_batch: Callable[[int], None] | None = None) -> EvaluateReport:
    """Measure an adapter directory on a labelled JSONL/CSV file: accuracy, macro and micro
    precision/recall/F1, per-class precision/recall/F1/support, the confusion matrix, and the
    expected calibration error over 15 equal-width confidence bins (``metapeft.metrics``).
    ``plot``: also write ``confusion_matrix.png`` and ``reliability.png`` there (needs the
    ``plot`` extra, matplotlib; a one-line error without it). Every gold label must be one of
    the adapter's."""
    import time

    from metapeft.adapter_io import read_adapter_info
    from metapeft.classify import Classifier, gold_indices, read_inputs
    from metapeft.metrics import classification_metrics

    if plot is not None:
        from metapeft.metrics_plot import require_matplotlib

        require_matplotlib()
    t0 = time.perf_counter()
    rows = read_inputs(test, text_field=text_field, label_field=label_field, require_label=True)
    info = read_adapter_info(adapter)
    if info.labels:  # a label outside the set fails before the model loads
        gold_indices(rows, info.labels, str(test), label_field)
    clf = Classifier.load(adapter, model, dequantize=dequantize)
    gold = gold_indices(rows, clf.labels, str(test), label_field)
    if on_start is not None:
        on_start(len(rows))
    probs = clf.probabilities(rows, batch_size=batch_size, on_batch=on_batch)
    metrics = classification_metrics(gold, probs, clf.labels)
    plots = {}
    if plot is not None:
        from metapeft.metrics_plot import plot_evaluation

        plots = plot_evaluation(metrics, plot, f"{info.method} on {Path(str(test)).name}")
    return EvaluateReport(adapter=str(adapter), test=str(test), model=clf.model_id,
                          metrics=metrics, seconds=time.perf_counter() - t0, plots=plots)


def _store(experience: str | Path | None):
    from metapeft.experience import ExperienceStore

    return ExperienceStore(experience)


def list_experience(experience: str | Path | None = None, *, limit: int = 50
                    ) -> ExperienceListing:
    """The last ``limit`` records of the experience store (0: all), oldest first."""
    store = _store(experience)
    recs = store.load()
    return ExperienceListing(path=store.path, total=len(recs),
                             records=recs[-limit:] if limit else recs)


def experience_stats(experience: str | Path | None = None, *, by: str = "method",
                     since: str | None = None) -> ExperienceStatsReport:
    """Per method, domain, project or init (``by``), over the records created within ``since``
    (``30d``, ``12h``, ``2w`` or an ISO date; all when None): run count, success rate (target
    reached), mean and median steps to target, mean final accuracy."""
    from metapeft.experience import STATS_BY, experience_stats as stats

    if by not in STATS_BY:  # before the store is read
        raise UserError(f"--by must be one of {', '.join(STATS_BY)}, got {by!r}", field="by")
    if since is not None:
        from metapeft.experience import parse_since

        parse_since(since)
    store = _store(experience)
    return ExperienceStatsReport(path=store.path, stats=stats(store.load(), by=by, since=since))


def experience_record(record_id: str, experience: str | Path | None = None) -> dict:
    """One record (by id or a unique id prefix) as JSON, features by name."""
    from metapeft.select.features import FEATURE_NAMES

    return _store(experience).get(record_id).to_json(FEATURE_NAMES)


def import_experience(file: str | Path, experience: str | Path | None = None
                      ) -> tuple[list[str], Path]:
    """Append the records of a JSONL file (ids already present are skipped): (new ids, store)."""
    store = _store(experience)
    return store.import_jsonl(file), store.path


def export_experience(out: str | Path, experience: str | Path | None = None,
                      fmt: str = "jsonl") -> int:
    """Write every record as one JSON object per line; returns the number written."""
    from metapeft.artifacts import writable_file

    if fmt != "jsonl":
        raise UserError(f"unknown format {fmt!r}; supported: jsonl", field="format")
    writable_file(out, field="out")
    return _store(experience).export_jsonl(out)


def rollback_weights(name: str, version: int | str, registry: str | Path | None = None) -> int:
    """Make an earlier version (3 or v3) the latest (nothing is deleted); returns its number."""
    from metapeft.registry import parse_spec, rollback

    path = rollback(name, version if isinstance(version, int) else str(version), registry)
    return parse_spec(f"{name}@{path.stem}")[1]


def check_weights(new: str, against: str, data: str | Path, **options):
    """The drift gate: registry version ``new`` against ``against`` on the same fixed probe
    tasks from ``data``, each adapted at its own stored lr; a ``drift.DriftReport`` (mean
    accuracies, the paired delta with its 95% CI, the mean KL between their predictive
    distributions, ``passed``, ``reasons``, the ``rollback`` command). ``options`` are
    ``drift.check``'s (model, dequantize, registry, tasks, steps, ways, shots, query, seed,
    tolerance, max_drift, domains, ...)."""
    from metapeft.drift import check

    return check(new, against, data, **options)


# --------------------------------------------------------------------------------------------
# The adapter library (metapeft.library; add, list and remove are library.add/entries/remove)
# --------------------------------------------------------------------------------------------

def library_build(data, *, model: str = DEFAULT_MODEL, dequantize: str = "auto",
                  tasks: int = 16, steps: int = 10, ways: int = 5, shots: int = 5,
                  query: int = 10, seed: int = 0, domains=None, exclude_domains=None,
                  method: str = DEFAULT_METHOD, config: dict | None = None,
                  lr: float | None = None,
                  registry=None, max_size: int | None = None, on_task=None):
    """Fill the library from a labelled pool (benchmark preparation): ``tasks`` episodes of
    the pool's examples that pass the domain filters (``exclude_domains``: keep the meta-test
    domains out), each adapted ``steps`` steps from a fresh adapter and kept with its profile.
    Episodes are seeded ``seed + i``; ``on_task(i, row)`` after each. A
    ``library.BuildResult``."""
    import tempfile
    import time

    from metapeft.data.episodes import EpisodeSource
    from metapeft.data.pools import filter_pool
    from metapeft.data.tasks import read_rows
    from metapeft.library import BuildResult, add, disk_bytes, entries
    from metapeft.models import load_base_model

    if tasks < 1:
        raise UserError(f"--tasks must be >= 1, got {tasks}", field="tasks")
    pool = filter_pool(read_rows(Path(data)), domains=domains, exclude_domains=exclude_domains)
    source = EpisodeSource(pool, ways=ways, shots=shots, query=query, name=str(data))
    base = load_base_model(model, dequantize=dequantize)
    t0 = time.perf_counter()
    rows, evicted, added = [], [], 0
    with tempfile.TemporaryDirectory(prefix="metapeft-build-") as tmp:
        for i in range(tasks):
            task = source.sample(seed + i)
            out = Path(tmp) / f"t{i}"
            report = adapt(task, model=model, dequantize=dequantize, method=method, steps=steps,
                           config=config, lr=lr, seed=seed + i, out=out, target=None,
                           eval_at={steps})  # the score: the final query accuracy
            res = add(out, task=task, base=base, registry=registry, max_size=max_size,
                      source=f"library build {Path(data).name} seed {seed + i}")
            added += res.added
            evicted += res.evicted
            row = {"task": task.name, "labels": list(task.labels),
                   "domains": sorted({str(e.extra.get("domain")) for e in task.support
                                      if e.extra.get("domain")}),
                   "final_accuracy": report.final_accuracy, "id": res.entry.id}
            rows.append(row)
            if on_task is not None:
                on_task(i, row)
    return BuildResult(added=added, entries=len(entries(registry)),
                       seconds=round(time.perf_counter() - t0, 3),
                       disk_bytes=disk_bytes(registry), tasks=rows, evicted=evicted)


def library_calibrate(data, *, init: str = "library:compose", model: str = DEFAULT_MODEL,
                      dequantize: str = "auto", tasks: int = 8, ways: int = 5, shots: int = 5,
                      query: int = 10, seed: int = 0, domains=None, exclude_domains=None,
                      config: dict | None = None, factors=None, decays=None, marks=None,
                      horizons=(), bounds=None, registry=None, on_task=None, on_trial=None,
                      group=None) -> dict:
    """Choose the step size ``adapt --init INIT`` (a ``library:compose...`` spec) trains at, or
    the weight bound a ``library:merge...`` spec searches within and the factor on INIT's lr
    its start trains at (``bounds``, ``factors``: the candidates, default
    ``compose.MERGE_BOUNDS`` and ``MERGE_LR_FACTORS``), on ``tasks`` past episodes of a labelled pool (seeded
    ``seed + i``; never the test split), and keep it in the library
    (``compose.calibrate_step_size``, ``compose.calibrate_merge_bound``; ``group``: split over
    the ranks of ``meta.distributed``). Returns the kept record."""
    from metapeft.adapters import get_adapter_class
    from metapeft.compose import (CAL_DECAYS, CAL_FACTORS, MERGE_BOUNDS, MERGE_LR_FACTORS,
                                  MERGE_MARKS, calibrate_merge_bound, calibrate_step_size,
                                  spec_kind)
    from metapeft.data.episodes import EpisodeSource
    from metapeft.data.pools import filter_pool
    from metapeft.data.tasks import read_rows
    from metapeft.models import load_base_model

    if tasks < 1:
        raise UserError(f"--tasks must be >= 1, got {tasks}", field="tasks")
    merge = str(init).startswith("library:") and spec_kind(init) == "merge"
    if merge and (decays or horizons):
        raise UserError("a merge trains INIT at INIT's step size: library calibrate chooses its "
                        "weight bound (--bounds) and a factor on INIT's lr (--lr-factors), not "
                        "--lr-decays or --horizons", field="init")
    if not merge and bounds:
        raise UserError("--bounds calibrates a library:merge spec, not " + str(init),
                        field="bounds")
    pool = filter_pool(read_rows(Path(data)), domains=domains, exclude_domains=exclude_domains)
    source = EpisodeSource(pool, ways=ways, shots=shots, query=query, name=str(data))
    episodes = [source.sample(seed + i) for i in range(tasks)]
    # the library composes plain LoRA only (the adapter protocol's compose_refusal)
    adapter = get_adapter_class(DEFAULT_METHOD).attach(
        load_base_model(model, dequantize=dequantize), config or {})
    if merge:
        return calibrate_merge_bound(init, adapter, episodes, registry=registry, seed=seed,
                                     bounds=bounds or MERGE_BOUNDS,
                                     factors=factors or MERGE_LR_FACTORS,
                                     marks=MERGE_MARKS if marks is None else marks,
                                     on_task=on_task, on_trial=on_trial, group=group)
    return calibrate_step_size(init, adapter, episodes, registry=registry, seed=seed,
                               factors=CAL_FACTORS if factors is None else factors,
                               decays=CAL_DECAYS if decays is None else decays, marks=marks,
                               horizons=horizons, on_task=on_task, on_trial=on_trial,
                               group=group)

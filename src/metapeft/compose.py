"""A new task's starting LoRA built from the adapter library (``metapeft.library``).

``adapt --init library:compose[:K][+INIT]``: LoraHub (Huang et al., 2023). The K (default 5)
library LoRAs nearest to the task (``library.similarity``; same base model and the same LoRA
structure only: rank, alpha, target modules, depth, parameter shapes) are mixed as
A = Σ wᵢ·Aᵢ and B = Σ wᵢ·Bᵢ, summed separately as LoraHub does (so one member at weight 1 is that
adapter exactly). ``+INIT`` adds a registry or file init (the meta-init) as one more member:
the search also starts from INIT alone, and ``adapt`` trains the composed init at the step size
calibrated for INIT (``adapter_io.init_adapt_lr``), since the mixture is anchored there.
The weights w ∈ [-1.5, 1.5]^K minimise the support loss + ``L1`` (0.05, LoraHub's) · Σ|wᵢ| over
``trials`` (default max(20, 4K)) evaluations of metapeft's one Bayesian optimiser
(``tune.gp.minimize``: skopt GP + EI after a Latin-hypercube start). The search starts from
the nearest member alone at weight 1, the uniform mixture (1/K each) and the weights found for
the three nearest past tasks (``library.compositions``, mapped onto this task's members by
entry id, absent members at 0); the weights found are recorded there for the next task. Then
``adapt`` trains from the composed init as from any other.

Step size: a composed init is a different point from INIT, and INIT's calibrated first step
overshoots from it (on SmolLM2 with a library of the test domains' past tasks, compose+INIT
started 6.4 points above INIT and fell 17.7 points below it after one step). ``calibrate_step_size``
(``metapeft library calibrate``) therefore chooses the step size for a composition spec as
``meta.stepsize`` chooses one for a meta-init: each calibration task (past tasks, never the test
split) is composed as ``adapt`` would compose it, trained from there at every candidate
(factor × the base lr, decay), and the candidate with the best mean query accuracy over the
marks wins. The record is kept in the library (``library.record_step_size``), and ``adapt``
uses it for that spec, base model and LoRA config when no ``lr`` is given
(``calibrated_step_size``), ahead of INIT's own. Measured (README, "With a step size
calibrated for composed starts"): on 8 past CLINC150 tasks ×0.3 won, and on the test tasks it
turned the step-1 loss into a gain (+14.7 points against INIT's step), though the mixture still
trails INIT itself after any step.

``adapt --init library:merge[:K][+INIT]`` (``merge_init``) keeps INIT trainable instead of
mixing it: the K members' updates are merged exactly, ΔW = Σ wᵢ·sBᵢAᵢ (no cross terms BᵢAⱼ),
into a frozen copy of the model, and INIT's own factors (fresh LoRA without ``+INIT``) train on
top, at INIT's step size, since INIT is what trains. Why: INIT's calibrated step is good from
INIT's factors; a LoraHub mixture replaces those factors, and no step size chosen for the
mixtures made it train as well as INIT (above). The weights are searched as compose's are, from
w = 0 (INIT alone), on one LoRA of (K+1)× the rank that holds INIT and the members side by
side (``LoRA.widened``, ``LoRA.side_by_side``); the result is a stack (``adapters.stacked``),
saved as one file. Measured (README, "Merging the library under the meta-init"; SmolLM2,
in-domain libraries, paired with INIT): CLINC150 +6.2 points at step 0, −2.4 at step 1, level
from step 5; WordNet level at every step. The step-1 loss sits on the tasks whose search chose
large weights (Σ|wᵢ| > 2). Hence the weights' box: |wᵢ| ≤ bound, chosen per spec, base model
and LoRA config on past tasks by ``calibrate_merge_bound`` (``metapeft library calibrate --init
library:merge...``: each candidate in ``MERGE_BOUNDS``, 0 being INIT alone, by the mean query
accuracy at steps 0, 1, 2 and 5 from the merge at INIT's step, and optionally at factors of
INIT's lr, ``MERGE_LR_FACTORS``), kept in the library (``library.record_merge_bound``) and used
by ``adapt`` unless ``--merge-bound`` gives one (at INIT's own lr).

``adapt --route arrow`` lives in ``metapeft.route``; both take their members from
``library.candidates`` (which entries qualify, with one-line refusals when none does).
"""

from __future__ import annotations

import math
import time

import mlx.core as mx
import numpy as np

from metapeft.errors import UserError

PREFIX = "library:"
KINDS = ("compose", "merge")
DEFAULT_K = 5
L1 = 0.05
BOUND = 1.5
# step-size candidates for composed starts: × the base lr (INIT's calibrated lr, else LoRA's
# default); smaller than a meta-init's, since INIT's own first step is what overshoots
CAL_FACTORS = (1.0, 0.3, 0.1, 0.03)
CAL_DECAYS = (0.0, 3.0)


def is_library_init(init) -> bool:
    return init is not None and str(init).startswith(PREFIX)


def spec_kind(init: str) -> str:
    """``compose`` or ``merge``: how ``library:KIND[:K][+INIT]`` puts its members together."""
    kind = str(init)[len(PREFIX):].partition("+")[0].partition(":")[0]
    if kind not in KINDS:
        raise UserError(f"unknown library init {init!r}; use library:compose[:K][+INIT], "
                        "library:merge[:K][+INIT], library:generate[@V] (or --route arrow)",
                        field="init")
    return kind


def parse_spec(init: str) -> tuple[int, str | None]:
    """(K, extra init or None) from ``library:compose[:K][+INIT]`` or ``library:merge...``."""
    kind = spec_kind(init)
    body, _, extra = str(init)[len(PREFIX):].partition("+")
    k = body.partition(":")[2]
    try:
        k_val = DEFAULT_K if not k else int(k)
    except ValueError:
        raise UserError(f"library:{kind}:K needs an integer K, got {k!r}", field="init") from None
    if k_val < 1:
        raise UserError(f"library:{kind}:K needs K >= 1, got {k_val}", field="init")
    return k_val, extra or None


def compose_params(adapter, members: list[dict], weights) -> dict:
    """The adapter's parameter tree Σ wᵢ·memberᵢ, leaf by leaf (A and B summed separately)."""
    w = mx.array(np.asarray(weights, dtype=np.float32))
    out = {}
    for key in members[0]:
        stacked = mx.stack([m[key].astype(mx.float32) for m in members])
        out[key] = mx.tensordot(w, stacked, axes=1).astype(members[0][key].dtype)
    return adapter.unflat(out)


def support_loss(adapter, params: dict, support) -> float:
    """The support set's loss (the training loss, no dropout) at ``params``."""
    from metapeft.train import batch_loss

    with adapter.scoring_mode():
        loss = batch_loss(adapter, adapter.scoring_params(params), support)
    mx.eval(loss)
    return float(loss.item())


def _members(init: str, adapter, task, registry=None):
    """(K, the task's profile, the K nearest usable library members' flat trees, their report
    rows, INIT's flat tree and report row or None, the skipped entries) for ``init``."""
    from metapeft import library

    k, extra = parse_spec(init)
    usable, skipped = library.candidates(adapter, registry)
    query = library.profile(adapter.base, task)
    ranked = sorted(usable, key=lambda ea: -library.similarity(query, ea[0]))[:k]
    members = [arrays for _, arrays in ranked]
    info = [{"id": e.id, "task": e.task, "score": e.to_json()["score"],
             "similarity": round(library.similarity(query, e), 4)} for e, _ in ranked]
    anchor = anchor_info = None
    if extra is not None:
        from metapeft.adapter_io import describe_init, resolve_init

        anchor = adapter.flat(resolve_init(extra, adapter, registry))
        anchor_info = {"id": describe_init(extra, registry), "task": None, "score": None,
                       "similarity": None, "init": True}
    return k, query, members, info, anchor, anchor_info, skipped


def _search(objective, n: int, x0: list, query: dict, ids: list, kind: str, *, registry=None,
            seed: int = 0, trials: int | None = None, bound: float = BOUND):
    """(skopt's result, the warm points used): ``objective`` over w ∈ [-bound, bound]^n from
    ``x0`` and the weights of the nearest past tasks of this ``kind`` (clipped to the box)."""
    from metapeft.tune.gp import minimize

    def in_box(points: list) -> list:
        return [[min(max(v, -bound), bound) for v in w] for w in points]

    warm = in_box(_warm_points(query, ids, registry, kind=kind))
    x0 = in_box(x0)
    x0 = x0 + [w for w in warm if w not in x0]
    trials = max(20, 4 * n) if trials is None else trials
    if trials < 1:
        raise UserError(f"composition trials must be >= 1, got {trials}", field="trials")
    res = minimize(objective, [(-bound, bound)] * n, trials=trials, x0=x0, seed=seed,
                   n_initial=max(len(x0), min(n + 2, trials)))
    return res, warm


def _record(kind: str, task, query: dict, ids: list, weights: list, report: dict, adapter,
            registry=None) -> None:
    """Keep the weights found for the next task's warm start (never at the result's cost)."""
    from metapeft import library

    try:
        library.record_composition({
            "task": task.name, "kind": kind, "embedding": query.get("embedding"),
            "label_embedding": query.get("label_embedding"),
            "weights": {i: w for i, w in zip(ids, weights) if not str(i).count("@")},
            "objective": report["objective"], "base_model_hash": adapter.base.fingerprint},
            registry)
    except OSError as e:
        report["record_error"] = str(e)


def compose_init(init: str, adapter, data, task, *, registry=None, seed: int = 0,
                 trials: int | None = None, record: bool = True) -> tuple[dict, dict]:
    """(init params, report) for ``library:compose[:K][+INIT]`` (see the module doc)."""
    t0 = time.perf_counter()
    if spec_kind(init) != "compose":
        raise UserError(f"compose_init takes library:compose..., got {init!r}", field="init")
    k, query, members, info_members, anchor, anchor_info, skipped = _members(
        init, adapter, task, registry)
    if anchor is not None:
        members, info_members = members + [anchor], info_members + [anchor_info]
    n = len(members)
    support = data.prepared(adapter, "support")

    def objective(w) -> float:
        loss = support_loss(adapter, compose_params(adapter, members, w), support)
        return loss + L1 * float(np.abs(w).sum()) if math.isfinite(loss) else math.inf

    ids = [m["id"] for m in info_members]
    x0 = [[1.0] + [0.0] * (n - 1), [1.0 / n] * n]
    if anchor is not None:  # the init alone: the search can keep it when no mixture helps
        x0.append([0.0] * (n - 1) + [1.0])
    res, warm = _search(objective, n, x0, query, ids, "compose", registry=registry, seed=seed,
                        trials=trials)
    weights = [round(float(v), 6) for v in res["x"]]
    params = compose_params(adapter, members, weights)
    uniform = res["ys"][1] if len(res["ys"]) > 1 else None
    for m, w in zip(info_members, weights):
        m["weight"] = w
    report = {"kind": "compose", "members": info_members, "weights": weights, "k": k,
              "trials": len(res["ys"]),
              "objective": round(res["y"], 6), "objective_uniform": uniform,
              "objective_nearest": res["ys"][0], "l1": L1,
              **({"objective_init": res["ys"][2]} if anchor is not None and len(res["ys"]) > 2
                 else {}),
              "support_loss": round(support_loss(adapter, params, support), 6),
              "warm_points": len(warm), "skipped": skipped,
              "search_seconds": round(res["seconds"], 3),
              "seconds": round(time.perf_counter() - t0, 3)}
    if record:
        _record("compose", task, query, ids, weights, report, adapter, registry)
    return params, report


def merge_init(init: str, adapter, data, task, *, registry=None, seed: int = 0,
               trials: int | None = None, record: bool = True, bound: float | None = None,
               lr_factor: float | None = None, picked: tuple | None = None
               ) -> tuple[object, dict, dict]:
    """(the adapter to train, its init params, report) for ``library:merge[:K][+INIT]``: the K
    nearest library LoRAs, weighted, merged exactly (Σ wᵢ·ΔWᵢ, no cross terms) into a frozen
    copy of the model, and under the trained stage INIT's own factors (fresh LoRA without
    ``+INIT``), which therefore train as INIT trains: at INIT's step size × ``lr_factor`` (the
    report's; None: the factor calibrated with the bound, 1 for a given bound). The weights
    minimise
    the support loss of the whole (INIT + the merged members) + L1·Σ|wᵢ|, evaluated on one
    LoRA of (K+1)× the rank holding every member side by side (``LoRA.widened``); w = 0 is
    INIT alone. The result is a stack (``adapters.stacked``): the merged members its frozen
    stage, the trained LoRA its new one, saved as one file. ``bound``: each |wᵢ| ≤ bound; None:
    the bound calibrated for this spec (``calibrate_merge_bound``), else ``BOUND``. At bound 0
    nothing is merged: the start is INIT alone (the adapter itself, no stack; no search).
    ``picked``: ``_members``' result for this task, when a caller merges it several times (the
    library read and the task's profile then happen once)."""
    from metapeft.adapters.stacked import Stacked

    t0 = time.perf_counter()
    bound_source, kept_factor = "given", 1.0
    if bound is None:
        kept = calibrated_merge_bound(init, adapter, registry)
        bound, bound_source = ((BOUND, "default") if kept is None else
                               (kept["merge_bound"], f"calibrated on {kept['num_tasks']} tasks"))
        kept_factor = 1.0 if kept is None else kept["lr_factor"]  # chosen with that bound only
    bound = float(bound)
    if not (math.isfinite(bound) and bound >= 0):
        raise UserError(f"the merge bound must be a number >= 0, got {bound!r}", field="bound")
    if lr_factor is not None and not (math.isfinite(lr_factor) and lr_factor > 0):
        raise UserError(f"--merge-lr-factor must be a number > 0, got {lr_factor!r}",
                        field="merge_lr_factor")
    if lr_factor is not None and bound == 0 and lr_factor != 1:
        raise UserError("--merge-lr-factor scales a merged start's lr; at bound 0 nothing is "
                        "merged and INIT trains at its own lr", field="merge_lr_factor")
    lr_factor = kept_factor if lr_factor is None else float(lr_factor)
    k, query, members, info_members, anchor, anchor_info, skipped = (
        picked or _members(init, adapter, task, registry))
    info_members = [dict(m) for m in info_members]  # this merge's weights go into its own rows
    n = len(members)
    if bound == 0:  # nothing merged: INIT alone (fresh without +INIT), trained as adapt would
        params = adapter.init_params(seed) if anchor is None else adapter.unflat(anchor)
        for m in info_members:
            m["weight"] = 0.0
        if anchor_info is not None:
            info_members.append({**anchor_info, "weight": 1.0, "trained": True})
        loss = round(support_loss(adapter, params, data.prepared(adapter, "support")), 6)
        return adapter, params, {
            "kind": "merge", "members": info_members, "weights": [0.0] * n, "k": k,
            "bound": 0.0, "bound_source": bound_source, "lr_factor": 1.0, "trials": 0,
            "objective": loss,
            "support_loss": loss, "warm_points": 0, "skipped": skipped, "search_seconds": 0.0,
            "seconds": round(time.perf_counter() - t0, 3)}
    lead = [] if anchor is None else [anchor]  # at weight 1, never searched
    wide = adapter.widened(n + len(lead))
    support = data.prepared(wide, "support")  # the same frozen trunk as the adapter's

    def whole(w) -> dict:
        return wide.unflat(type(adapter).side_by_side(lead + members, [1.0] * len(lead)
                                                       + list(w)))

    def objective(w) -> float:
        loss = support_loss(wide, whole(w), support)
        return loss + L1 * float(np.abs(w).sum()) if math.isfinite(loss) else math.inf

    ids = [m["id"] for m in info_members]
    x0 = [[1.0] + [0.0] * (n - 1), [1.0 / n] * n]
    if anchor is not None:  # INIT alone: the search can keep it when no member helps
        x0.insert(0, [0.0] * n)
    res, warm = _search(objective, n, x0, query, ids, "merge", registry=registry, seed=seed,
                        trials=trials, bound=bound)
    weights = [round(float(v), 6) for v in res["x"]]
    frozen = adapter.widened(n)
    frozen_params = frozen.unflat(type(adapter).side_by_side(members, weights))
    stack = Stacked(frozen, frozen_params, type(adapter), adapter.config)
    params = (stack.new.init_params(seed) if anchor is None else stack.new.unflat(anchor))
    for m, w in zip(info_members, weights):
        m["weight"] = w
    if anchor_info is not None:
        info_members.append({**anchor_info, "weight": 1.0, "trained": True})
    report = {"kind": "merge", "members": info_members, "weights": weights, "k": k,
              "bound": bound, "bound_source": bound_source, "lr_factor": lr_factor,
              "trials": len(res["ys"]), "objective": round(res["y"], 6),
              "objective_nearest": res["ys"][1 if anchor is not None else 0], "l1": L1,
              **({"objective_init": res["ys"][0]} if anchor is not None else {}),
              "support_loss": round(support_loss(wide, whole(weights), support), 6),
              "warm_points": len(warm), "skipped": skipped,
              "search_seconds": round(res["seconds"], 3),
              "seconds": round(time.perf_counter() - t0, 3)}
    if record:
        _record("merge", task, query, ids, weights, report, adapter, registry)
    return stack, params, report


def _warm_points(query: dict, ids: list[str], registry=None, nearest: int = 3,
                 kind: str = "compose") -> list:
    """Weights that worked for the ``nearest`` most similar past tasks of this ``kind`` (records
    from before kinds are compositions), on this task's members (by entry id; members they did
    not use at 0), skipping those that share no member."""
    from metapeft import library

    scored = []
    for c in library.compositions(registry):
        w = c.get("weights") or {}
        if c.get("kind", "compose") != kind:
            continue
        if not isinstance(w, dict) or not any(i in w for i in ids):
            continue
        probe = library.Entry(id="", path=library.library_dir(registry), method="", config={},
                              base_model=None, base_model_hash=None, task=None,
                              score=float("nan"), composable=False, reason=None,
                              embedding=c.get("embedding"),
                              label_embedding=c.get("label_embedding"))
        s = library.similarity(query, probe)
        if math.isfinite(s):
            scored.append((s, [float(w.get(i, 0.0)) for i in ids]))
    scored.sort(key=lambda t: -t[0])
    return [x for _, x in scored[:nearest]]


def library_init(init, route, adapter, data, task, *, seed: int = 0, registry=None,
                 record: bool = True, merge_bound: float | None = None,
                 merge_lr_factor: float | None = None
                 ) -> tuple[object, dict, tuple[str, dict]]:
    """(the adapter to train, its init params, (report key, report)) for ``adapt``:
    ``route="arrow"`` (``metapeft.route``), ``init="library:generate[@V]"``
    (``metapeft.generate``; V: a generator version, default the newest),
    ``init="library:compose..."`` or ``init="library:merge..."`` (``record``: keep its weights
    for the next search; ``merge_bound``, ``merge_lr_factor``: a merge's weight bound and the
    factor on INIT's lr its start trains at, None for the calibrated ones).
    Only a merge trains another adapter than ``adapter`` (a stack)."""
    if route is not None:
        from metapeft.route import arrow_init

        params, report = arrow_init(adapter, data, task, registry=registry)
        return adapter, params, ("route", report)
    kind, at, version = str(init).partition("@")
    if kind == f"{PREFIX}generate":
        from metapeft.generate import generate_init

        if at and not version.isdigit():
            raise UserError(f"library:generate@V needs a version number, got {version!r}",
                            field="init")
        params, report = generate_init(adapter, task, registry, int(version) if at else None)
        return adapter, params, ("generation", report)
    if spec_kind(init) == "merge":
        trained, params, report = merge_init(init, adapter, data, task, registry=registry,
                                             seed=seed, record=record, bound=merge_bound,
                                             lr_factor=merge_lr_factor)
        return trained, params, ("composition", report)
    params, report = compose_init(init, adapter, data, task, registry=registry, seed=seed,
                                  record=record)
    return adapter, params, ("composition", report)


def step_size_key(init: str, registry=None) -> str:
    """The composition spec a step-size record belongs to: ``KIND:K`` or ``KIND:K+INIT`` (KIND
    compose or merge) with INIT as resolved now (``NAME@V``, or a file's absolute path)."""
    from pathlib import Path

    from metapeft.adapter_io import describe_init

    kind = spec_kind(init)
    k, extra = parse_spec(init)
    if extra is None:
        return f"{kind}:{k}"
    name = str(Path(extra).resolve()) if Path(extra).exists() else describe_init(extra, registry)
    return f"{kind}:{k}+{name}"


def calibrate_step_size(init: str, adapter, tasks, *, registry=None, seed: int = 0,
                        factors=CAL_FACTORS, decays=CAL_DECAYS, marks=None, horizons=(),
                        on_task=None, on_trial=None, group=None) -> dict:
    """Choose and keep the step size ``adapt`` uses from ``init`` (``library:compose...``) on
    ``tasks`` (past tasks: never the test split); see the module doc. Each task is composed as
    ``adapt`` composes it, without recording its composition (the warm-start store is left as
    it was). ``on_task(i, composition report)`` after each search; ``on_trial(key, row)`` after
    each candidate. Returns the kept record: ``meta.stepsize.calibrate_adapt_lr``'s result
    plus ``key``, ``init``, the base model, ``config``, the tasks and the seconds spent.
    ``group`` (``meta.distributed``, ``library calibrate --processes N``): each rank composes
    and trains its share of the tasks, the curves are gathered exactly, and rank 0 keeps the
    record (every rank returns it)."""
    from metapeft import library
    from metapeft.adapter_io import init_step_size
    from metapeft.meta import distributed as dist
    from metapeft.meta.stepsize import DEFAULT_MARKS, calibrate_adapt_lr
    from metapeft.train import encode_task

    tasks = list(tasks)
    if not tasks:
        raise UserError("library calibrate needs at least one task", field="tasks")
    if not is_library_init(init) or not str(init)[len(PREFIX):].startswith("compose"):
        raise UserError(f"library calibrate takes a library:compose[:K][+INIT] init, got "
                        f"{init!r}" + (" (a merge trains INIT itself, at INIT's step size)"
                                       if str(init).startswith(f"{PREFIX}merge") else ""),
                        field="init")
    _, extra = parse_spec(init)
    key = step_size_key(init, registry)
    inherited = init_step_size(extra, registry) if extra is not None else None
    base_lr = (inherited or {}).get("adapt_lr") or type(adapter).default_lr
    t0 = time.perf_counter()
    starts, search_s = [None] * len(tasks), 0.0  # a rank composes only the tasks it trains
    for n, i in enumerate(dist.mine(len(tasks), group)):
        data = encode_task(tasks[i], adapter.base.tokenizer)
        starts[i], rep = compose_init(init, adapter, data, tasks[i], registry=registry,
                                      seed=seed, record=False)
        search_s += rep["search_seconds"]
        if on_task is not None:
            on_task(n, rep)
    search_s = sum(dist.gather_json(search_s, group))
    cal = calibrate_adapt_lr(adapter, starts, tasks, base_lr, factors=factors, decays=decays,
                             marks=DEFAULT_MARKS if marks is None else marks,
                             horizons=horizons, on_trial=on_trial, group=group)
    record = {**cal, "key": key, "init": str(init),
              "base_lr_source": "INIT's calibration" if inherited else "the method's default",
              **_calibration_fields(adapter, tasks, search_s, t0)}
    if dist.is_root(group):
        library.record_step_size(record, registry)
    return record


def _calibration_fields(adapter, tasks, search_s: float, t0: float) -> dict:
    """What every kept calibration record says about its setting (the base model and LoRA
    config it is found by), its tasks and its cost."""
    import datetime

    return {"base_model": adapter.base.model_id, "base_model_hash": adapter.base.fingerprint,
            "config": adapter.config.to_dict(), "tasks": [t.name for t in tasks],
            "search_seconds": round(search_s, 3), "seconds": round(time.perf_counter() - t0, 3),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


def calibrated_step_size(init: str, adapter, steps: int, registry=None) -> dict | None:
    """``{"adapt_lr", "adapt_lr_decay", "horizon", "num_tasks", "created"}`` kept for ``init``'s
    spec, this base model and LoRA config (``calibrate_step_size``), for a run of ``steps``
    (``meta.stepsize.schedule_for_steps``); None when none was kept."""
    from metapeft import library
    from metapeft.meta.stepsize import schedule_for_steps

    try:
        key = step_size_key(init, registry)
    except (UserError, OSError):
        return None
    rec = library.find_step_size(key, adapter.base.fingerprint, adapter.config.to_dict(),
                                 registry)
    if rec is None:
        return None
    try:
        chosen = schedule_for_steps(rec, steps)
    except (KeyError, TypeError, ValueError):  # a malformed record: as if none was kept
        return None
    return {**chosen, "num_tasks": rec.get("num_tasks"), "created": rec.get("created")}


# candidate bounds on a merge's weights (``calibrate_merge_bound``): the search's box down to 0
# (INIT alone), since the step-1 loss measured on SmolLM2 sat on the tasks whose search chose
# large weights (Σ|wᵢ| > 2 at the box ±1.5)
MERGE_BOUNDS = (1.5, 0.6, 0.3, 0.0)
MERGE_MARKS = (0, 1, 2, 5)
# candidate factors on INIT's lr for a merged start (bound > 0): with Adam the first step's size
# does not shrink with the gradient, and a merged start is already nearer the task's optimum.
# Only INIT's own lr by default: on SmolLM2 the half step chosen on validation tasks levelled
# step 1 but fell behind INIT at step 5 on the test split (README, "A smaller first step")
MERGE_LR_FACTORS = (1.0,)


def merge_candidates(bounds, factors) -> list[tuple[float, float]]:
    """The (bound, lr factor) pairs a merge calibration tries, larger first: every bound > 0 at
    every factor, and bound 0 (INIT alone) at INIT's own lr only."""
    return [(b, f) for b in sorted({float(b) for b in bounds}, reverse=True)
            for f in (sorted({float(f) for f in factors}, reverse=True) if b > 0 else (1.0,))]


def merge_candidate_key(bound: float, factor: float) -> str:
    """A merge calibration table's row key: ``"0.6"`` at INIT's lr, ``"0.6 x0.5"`` at half."""
    return f"{bound:g}" if factor == 1 else f"{bound:g} x{factor:g}"


def calibrate_merge_bound(init: str, adapter, tasks, *, registry=None, seed: int = 0,
                          bounds=MERGE_BOUNDS, factors=MERGE_LR_FACTORS, marks=MERGE_MARKS,
                          on_task=None, on_trial=None, group=None) -> dict:
    """Choose and keep the bound on a merge's weights (|wᵢ| ≤ bound) that ``adapt --init
    library:merge...`` searches within, and the factor on INIT's lr it trains the merged start
    at, on ``tasks`` (past tasks: never the test split). Each task is merged at every candidate
    bound as ``adapt`` merges it (not recorded), trained at every factor × the step size
    ``adapt`` uses (INIT's calibrated one, with its decay and per-layer lrs) to the last mark,
    and the (bound, factor) with the best mean query accuracy over ``marks`` wins (ties: the
    smaller bound, then the factor nearer INIT's own lr). Bound 0 is INIT alone, at factor 1
    only: INIT's step size was chosen for it. ``on_task(i, {bound: report})`` after each task's
    merges; ``on_trial(key, row)`` after the curves are in. ``group``: each rank merges and
    trains its share of the tasks and rank 0 keeps the record (every rank returns it)."""
    from metapeft import library
    from metapeft.adapter_io import init_lr_scales, init_step_size
    from metapeft.meta import distributed as dist
    from metapeft.meta.stepsize import paired_margin
    from metapeft.train import encode_task, train

    tasks = list(tasks)
    if not tasks:
        raise UserError("library calibrate needs at least one task", field="tasks")
    if not is_library_init(init) or spec_kind(init) != "merge":
        raise UserError(f"calibrate_merge_bound takes a library:merge[:K][+INIT] init, got "
                        f"{init!r}", field="init")
    bounds = sorted({float(b) for b in bounds}, reverse=True)
    if not bounds or any(not (math.isfinite(b) and b >= 0) for b in bounds):
        raise UserError(f"merge bounds must be numbers >= 0, got {bounds}", field="bounds")
    factors = sorted({float(f) for f in factors}, reverse=True)
    if not factors or any(not (math.isfinite(f) and f > 0) for f in factors):
        raise UserError(f"lr factors must be numbers > 0, got {factors}", field="lr_factors")
    marks = sorted({int(m) for m in marks})
    if not marks or marks[0] < 0:
        raise UserError(f"calibration marks must be steps >= 0, got {marks}", field="marks")
    key = step_size_key(init, registry)
    steps = marks[-1]
    chosen = init_step_size(init, steps=steps)  # as adapt takes it (INIT's; LoRA's default)
    lr = (chosen or {}).get("adapt_lr") or type(adapter).default_lr
    lr_decay = (chosen or {}).get("adapt_lr_decay") or 0.0
    lr_scales = init_lr_scales(init)
    candidates = merge_candidates(bounds, factors)
    t0 = time.perf_counter()
    n, k, nc = len(tasks), len(marks), len(candidates)
    slots, search_s = {}, 0.0  # slot (c·n + i)·k + j: candidate c, task i, mark j; then c's failure
    for count, i in enumerate(dist.mine(n, group)):
        data = encode_task(tasks[i], adapter.base.tokenizer)
        picked, reports = _members(init, adapter, tasks[i], registry), {}
        for bound in bounds:
            trained, params, rep = merge_init(init, adapter, data, tasks[i], registry=registry,
                                              seed=seed, record=False, bound=bound,
                                              picked=picked)
            search_s += rep["search_seconds"]
            reports[bound] = rep
            for c, (b, factor) in enumerate(candidates):
                if b != bound:
                    continue
                try:
                    r = train(trained, params, data, steps=steps, lr=lr * factor,
                              eval_at=set(marks), lr_scales=lr_scales, lr_decay=lr_decay)
                    slots.update({(c * n + i) * k + j: a for j, a in enumerate(r.accuracies)})
                except FloatingPointError:  # diverged from this merge: never the one to use
                    slots[nc * n * k + c] = 1.0
        if on_task is not None:
            on_task(count, reports)
    gathered = dist.gather_slots(slots, nc * n * k + nc, group)
    search_s = sum(dist.gather_json(search_s, group))
    curves = np.asarray(gathered[:nc * n * k], dtype=float).reshape(nc, n, k)
    table = {}
    for c, (bound, factor) in enumerate(candidates):
        row = {"bound": bound, "lr_factor": factor}
        if gathered[nc * n * k + c] > 0:
            row.update(mean=None, diverged=True)
        else:
            row.update(mean=round(float(curves[c].mean()), 6),
                       **{str(m): round(float(a), 6) for m, a in zip(marks, curves[c].mean(axis=0))},
                       tasks=[round(float(a), 6) for a in curves[c].mean(axis=1)])
        row_key = merge_candidate_key(bound, factor)
        table[row_key] = row
        if on_trial is not None:
            on_trial(row_key, row)
    ranked = sorted((key_ for key_, row in table.items() if not row.get("diverged")),
                    key=lambda key_: (table[key_]["mean"], -table[key_]["bound"],
                                      -abs(math.log(table[key_]["lr_factor"]))), reverse=True)
    if not ranked:
        raise FloatingPointError("INIT's step diverged from every candidate merge")
    margin = None if len(ranked) < 2 else paired_margin(
        table[ranked[0]]["tasks"], table[ranked[1]]["tasks"], ranked[1])
    best = table[ranked[0]]
    record = {"key": key, "init": str(init), "merge_bound": best["bound"],
              "merge_lr_factor": best["lr_factor"], "margin": margin, "marks": marks,
              "num_tasks": n, "adapt_lr": lr, "adapt_lr_decay": lr_decay, "table": table,
              **_calibration_fields(adapter, tasks, search_s, t0)}
    if dist.is_root(group):
        library.record_merge_bound(record, registry)
    return record


def calibrated_merge_bound(init: str, adapter, registry=None) -> dict | None:
    """``{"merge_bound", "lr_factor", "num_tasks", "created"}`` kept for ``init``'s merge spec
    (``lr_factor``: on INIT's lr for the merged start; 1 at bound 0), this base
    model and LoRA config (``calibrate_merge_bound``); None when none was kept."""
    from metapeft import library

    try:
        key = step_size_key(init, registry)
    except (UserError, OSError):
        return None
    rec = library.find_merge_bound(key, adapter.base.fingerprint, adapter.config.to_dict(),
                                   registry)
    try:
        bound = float(rec["merge_bound"])
    except (KeyError, TypeError, ValueError):  # none kept, or a malformed record
        return None
    factor = rec.get("merge_lr_factor", 1.0)  # records before the factor trained at INIT's lr
    if not (math.isfinite(bound) and bound >= 0 and isinstance(factor, (int, float))
            and math.isfinite(factor) and factor > 0):
        return None
    return {"merge_bound": bound, "lr_factor": float(factor) if bound > 0 else 1.0,
            "num_tasks": rec.get("num_tasks"), "created": rec.get("created")}

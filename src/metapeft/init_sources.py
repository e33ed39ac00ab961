"""Init sources: where a task's starting adapter comes from, which of them a task can use, and
which one wins for which kind of task (issue 19 item 5). ``select`` shows the ranking,
``adapt --method auto`` and ``adapt --init auto`` start from its top source, and
``sweep --init-sources`` produces the experience it learns from.

The sources (``experience.INIT_SOURCES``; every experience record says which one its run used,
``run.init_source``):

``fresh``     the adapter's own seeded init
``meta``      a learned init: the newest valid meta-weights of the method for this base model in
              the registry (``find_init``); a record whose init was another registry version or
              file counts here too
``compose``   ``--init library:compose`` (``metapeft.compose``)
``merge``     ``--init library:merge+META``: the library merged under the meta-init, which trains
              (``compose.merge_init``; META as for ``meta``)
``generate``  ``--init library:generate`` (``metapeft.generate``)
``route``     ``--route arrow`` (``metapeft.route``)

**Availability** (``available``): fresh always; meta when ``find_init`` finds weights for the
method and this base model; compose and route when the adapter library holds an entry that fits
this LoRA (``library.candidates``: composable, same base model and structure); merge when both
meta and an entry that fits the meta-init's LoRA are there; generate when a
generator for this base model and structure exists (``generate.latest_generator``). A
training-free method has fresh only. Each source not offered comes with its one-line reason.

**Ranking** (``rank``), for a run of a given length (``steps``: ``adapt --steps``, or the
recommended steps for ``select`` and ``adapt --method auto``), because which source wins depends
on it: the learned starts lead by 9-25 points at step 0 and are level with fresh LoRA by step
10 on SmolLM2. A run's accuracy *after that many steps* is modelled as task effect + source
gain + noise. A past run's accuracy there is read from its recorded curve (``accuracy_at``: the
last step measured at or before it; a run that ended earlier keeps its last figure; with no
length given, its final accuracy). The evidence is the ``k`` (10) past tasks nearest to this
one (the "kind of task": the same domain when any past task has it, as the embedder learned
that domains matter most, then the Euclidean distance of the selector's normalised features,
``select.embedder.normalise``) among those that ran the method from two or more init sources.
The gains get a Gaussian prior, mean ``prior_gain(steps)``, sd ``PRIOR_SD``; the task effects a
flat one; the noise sd is estimated from the residuals (``NOISE_SD`` while there are fewer
than 5 residual degrees of freedom). The posterior mean of each gain minus fresh's is the
``expected_gain``, its sd the ``uncertainty``, and the ``confidence`` is P(best) among the
available sources over ``DRAWS`` posterior draws. With no evidence the posterior is the prior:
the ranking is the prior's order and the confidence stays moderate. At the default noise sd
the prior weighs as much as ``(NOISE_SD/PRIOR_SD)**2`` = 4 runs: one past task that compared
two sources moves their gap a fifth of the way to what it saw, ten tasks about 70% (further
when their residuals show less noise).

``PRIOR_GAIN_AT`` (accuracy over fresh LoRA after 0, 1, 5 and 10 steps) is the one run that
measured all five sources side by side: 87 held-out CLINC150 banking/travel tasks on
SmolLM2-135M (README "The adapter library", "On SmolLM2-135M"; the meta-init is the Reptile
init at a constant lr). ``prior_gain`` interpolates linearly between those steps and keeps the
step-10 gains past it. (Before that run the prior was stories260K's library table at step 10
for compose/generate/route and a separate Reptile run for meta, a single set of gains for every
run length.) ``merge`` was not in that run: its gain is meta's plus ``MERGE_OVER_META_AT``, the
paired merge − meta-init that README "A calibrated bound for the merge's weights" measured on
46 held-out CLINC150 tasks of the same split (a library of the test domains' past tasks, another
Reptile init, the bound calibrated on validation tasks), so it says how a merge moves a
meta-init's curve, not a second meta-init's gain.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from metapeft.errors import UserError
from metapeft.experience import INIT_SOURCES, init_source_of

PRIOR_GAIN_AT: dict[int, dict[str, float]] = {  # step -> accuracy over fresh (see above)
    0: {"fresh": 0.0, "meta": 0.248, "compose": 0.154, "generate": 0.092, "route": 0.141},
    1: {"fresh": 0.0, "meta": 0.192, "compose": 0.050, "generate": 0.123, "route": 0.154},
    5: {"fresh": 0.0, "meta": 0.018, "compose": 0.007, "generate": 0.010, "route": 0.006},
    10: {"fresh": 0.0, "meta": 0.005, "compose": -0.009, "generate": -0.004, "route": -0.001},
}
# merge: meta's gain plus the paired merge − meta-init measured in another run (see above)
MERGE_OVER_META_AT = {0: 0.073, 1: -0.009, 5: -0.001, 10: -0.003}
for _step, _gain in MERGE_OVER_META_AT.items():
    PRIOR_GAIN_AT[_step]["merge"] = round(PRIOR_GAIN_AT[_step]["meta"] + _gain, 6)
PRIOR_SD = 0.05
NOISE_SD = 0.10
K = 10
DRAWS = 4000
LIBRARY_INITS = {"compose": "library:compose", "generate": "library:generate"}
AUTO = "auto"


def prior_gain(steps: int | None = None) -> dict[str, float]:
    """The prior's gain of each source over fresh for a run of ``steps`` steps: linear between
    the measured steps of ``PRIOR_GAIN_AT``, its last ones past them (and for None, a run of
    unknown length)."""
    marks = sorted(PRIOR_GAIN_AT)
    if steps is None or steps >= marks[-1]:
        return dict(PRIOR_GAIN_AT[marks[-1]])
    steps = max(int(steps), marks[0])
    hi = next(m for m in marks if m >= steps)
    lo = max(m for m in marks if m <= steps)
    t = 0.0 if hi == lo else (steps - lo) / (hi - lo)
    return {s: round((1 - t) * PRIOR_GAIN_AT[lo][s] + t * PRIOR_GAIN_AT[hi][s], 6)
            for s in INIT_SOURCES}


def accuracy_at(record, steps: int | None) -> float:
    """A past run's query accuracy after ``steps`` steps: its recorded curve at the last step
    measured at or before ``steps`` (a run that ended earlier keeps its last figure); its final
    accuracy when ``steps`` is None or it kept no curve; NaN when its curve starts later."""
    run = record.run or {}
    curve, at = run.get("curve"), run.get("eval_steps")
    if steps is None or not curve or not at or len(curve) != len(at):
        return float(record.final_accuracy)
    before = [a for s, a in sorted(zip(at, curve)) if s <= steps]
    return float(before[-1]) if before else math.nan


def parse_sources(text: str | list[str] | None) -> list[str]:
    """``--init-sources``: ``all`` or a comma list of ``INIT_SOURCES``, in their order."""
    if text is None:
        return []
    items = text if isinstance(text, list) else str(text).split(",")
    items = [s.strip() for s in items if s.strip()]
    if items == ["all"]:
        return list(INIT_SOURCES)
    bad = [s for s in items if s not in INIT_SOURCES]
    if bad or not items:
        raise UserError(f"unknown init source {bad[0] if bad else text!r}; choose from "
                        f"{', '.join(INIT_SOURCES)} or all", field="init_sources")
    return [s for s in INIT_SOURCES if s in items]


# ------------------------------------------------------------------------------- availability
def find_init(method: str, base, registry: str | Path | None = None
              ) -> tuple[str | None, dict | None, str]:
    """(``NAME@VERSION``, its adapter options, why) for the newest valid meta-weights of
    ``method`` trained on ``base``'s model (same fingerprint) in the registry, else
    (None, None, why). Valid: the file loads and fits an adapter built with its own options.
    Versions newer than their name's ``latest`` (withdrawn by ``weights rollback``) are passed
    over."""
    from metapeft.adapters import get_adapter_class
    from metapeft.artifacts import json_field, load_safetensors
    from metapeft.registry import list_weights, registry_root

    cls = get_adapter_class(method)
    if cls.training_free:
        return None, None, f"{method} is training-free: it starts from no init"
    rows = [r for r in list_weights(registry) if r.get("method") == method]
    latest = {r["name"]: r["version"] for r in rows if r.get("latest")}
    rows = [r for r in rows if r["version"] <= latest.get(r["name"], r["version"])]
    rows.sort(key=lambda r: (str(r.get("created") or ""), r["version"]), reverse=True)
    other_models, invalid = 0, []
    for r in rows:
        spec = f"{r['name']}@{r['version']}"
        try:
            arrays, meta = load_safetensors(r["path"])
            if meta.get("base_model_hash") != base.fingerprint:
                other_models += 1
                continue
            options = json_field(meta, "config") or {}
            adapter = cls.attach(base, options)
            adapter.check_compatible(adapter.unflat(arrays), meta, r["path"])
        except (UserError, OSError, ValueError) as e:
            invalid.append(f"{spec} ({e.one_line() if isinstance(e, UserError) else e})")
            continue
        skipped = f"; passed over {', '.join(invalid)}" if invalid else ""
        return spec, options, (f"the newest valid {method} meta-weights for {base.model_id}: "
                               f"{spec}, created {r.get('created')}{skipped}")
    why = f"no {method} meta-weights for {base.model_id} in {registry_root(registry)}"
    notes = ([f"{other_models} for other models"] if other_models else []) + \
        ([f"invalid: {', '.join(invalid)}"] if invalid else [])
    return None, None, why + (f" ({'; '.join(notes)})" if notes else "") + ": a fresh init"


def available(method: str, base, *, config: dict | None = None, registry=None
              ) -> tuple[list[dict], list[dict]]:
    """(offered, unavailable) init sources for ``method`` (with the adapter options among
    ``config``) on ``base``: offered rows {source, init, route, init_options, why}, in
    ``INIT_SOURCES`` order; unavailable rows {source, reason}."""
    from metapeft.adapters import get_adapter_class

    cls = get_adapter_class(method)
    fresh = {"source": "fresh", "init": None, "route": None, "init_options": None,
             "why": f"{method}'s own seeded init"}
    if cls.training_free:
        why = f"{method} is training-free: it starts from no init"
        return [{**fresh, "why": why}], [{"source": s, "reason": why}
                                         for s in INIT_SOURCES if s != "fresh"]
    offered, missing = [fresh], []
    spec, options, why = find_init(method, base, registry)
    if spec is None:
        missing.append({"source": "meta", "reason": why})
    else:
        offered.append({"source": "meta", "init": spec, "route": None, "init_options": options,
                        "why": why})
    known = cls.Config.defaults()  # run options (lr, steps, ...) are not the adapter's
    adapter = cls.attach(base, {k: v for k, v in (config or {}).items() if k in known})
    lib_why, fits = _library_fit(adapter, registry)
    for source in ("compose", "route"):
        if fits:
            offered.append({"source": source, "init": LIBRARY_INITS.get(source),
                            "route": "arrow" if source == "route" else None,
                            "init_options": None, "why": lib_why})
        else:
            missing.append({"source": source, "reason": lib_why})
    # a merge trains the meta-init's own factors under the merged members: both must exist, and
    # the library must fit the adapter the meta-init brings (its options under config's)
    if spec is None:
        missing.append({"source": "merge", "reason": f"a merge trains a meta-init: {why}"})
    else:
        meta_adapter = cls.attach(base, {**(options or {}), **{
            k: v for k, v in (config or {}).items() if k in known}})
        merge_why, merge_fits = _library_fit(meta_adapter, registry)
        if merge_fits:
            offered.append({"source": "merge", "init": f"library:merge+{spec}", "route": None,
                            "init_options": options, "why": f"{merge_why}, under {spec}"})
        else:
            missing.append({"source": "merge", "reason": merge_why})
    gen_why, has_generator = _generator(adapter, registry)
    if not has_generator:
        missing.append({"source": "generate", "reason": gen_why})
    else:
        offered.append({"source": "generate", "init": LIBRARY_INITS["generate"], "route": None,
                        "init_options": None, "why": gen_why})
    order = {s: i for i, s in enumerate(INIT_SOURCES)}
    return (sorted(offered, key=lambda r: order[r["source"]]),
            sorted(missing, key=lambda r: order[r["source"]]))


def _library_fit(adapter, registry) -> tuple[str, bool]:
    """(why, True) when the library has entries that fit ``adapter``, else (the refusal, False)."""
    from metapeft.library import candidates

    try:
        usable, skipped = candidates(adapter, registry)
    except UserError as e:
        return e.message, False
    return (f"{len(usable)} library LoRA(s) fit" + (f", {len(skipped)} skipped"
                                                    if skipped else "")), True


def _generator(adapter, registry) -> tuple[str, bool]:
    """(which generator, True) when one fits ``adapter``, else (why not, False)."""
    from metapeft.generate import latest_generator

    try:
        path, meta = latest_generator(adapter, registry)
    except UserError as e:
        return e.message, False
    return f"generator v{meta.get('version')} ({path.name})", True


# ------------------------------------------------------------------------------- the evidence
def _task_runs(records, method: str, steps: int | None = None) -> dict[str, dict]:
    """Past tasks of ``method`` with an init source recorded: key -> {name, domain, features,
    runs: [(source, accuracy after ``steps`` steps)]}; only tasks with two or more sources carry
    evidence."""
    tasks: dict[str, dict] = {}
    for r in records:
        src = init_source_of(r)
        if r.method != method or src is None:
            continue
        acc = accuracy_at(r, steps)
        if not math.isfinite(acc):
            continue
        key = f"{r.task}|{r.domain}|" + ",".join(f"{v:.4g}" for v in r.features)
        t = tasks.setdefault(key, {"name": r.task, "domain": r.domain,
                                   "features": np.asarray(r.features, np.float64), "runs": []})
        t["runs"].append((src, acc))
    return {k: t for k, t in tasks.items() if len({s for s, _ in t["runs"]}) >= 2}


def _neighbours(tasks: list[dict], features, domain: str | None, k: int
                ) -> list[tuple[dict, float]]:
    from metapeft.select.embedder import fit_normaliser, normalise
    from metapeft.select.features import feature_vector

    if not tasks:
        return []
    same = [t for t in tasks if domain not in (None, "unknown") and t["domain"] == domain]
    tasks = same or tasks  # the same domain first: the embedder's lesson (DOMAIN_WEIGHT)
    x = np.stack([t["features"] for t in tasks])
    mean, std = fit_normaliser(x)
    z = normalise(x, mean, std)
    q = normalise(np.asarray([feature_vector(features) if isinstance(features, dict)
                              else list(features)], np.float64), mean, std)[0]
    d = np.sqrt(((z - q) ** 2).sum(1))
    order = np.argsort(d, kind="stable")[:k]
    return [(tasks[i], float(d[i])) for i in order]


def posterior(tasks: list[dict], steps: int | None = None
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean (S,), covariance (S, S), noise sd) of the source gains for a run of ``steps``
    steps, in ``INIT_SOURCES`` order, under the module docstring's model."""
    S, T = len(INIT_SOURCES), len(tasks)
    idx = {s: j for j, s in enumerate(INIT_SOURCES)}
    rows, y = [], []
    for i, t in enumerate(tasks):
        for s, acc in t["runs"]:
            x = np.zeros(T + S)
            x[i], x[T + idx[s]] = 1.0, 1.0
            rows.append(x)
            y.append(acc)
    X = np.asarray(rows).reshape(len(rows), T + S)
    y = np.asarray(y, np.float64)
    prior = prior_gain(steps)
    mu = np.array([0.0] * T + [prior[s] for s in INIT_SOURCES])
    prior_prec = np.array([1e-4] * T + [1.0 / PRIOR_SD ** 2] * S)
    sigma = NOISE_SD
    for _ in range(2):  # fit, then refit with the noise the residuals show
        A = X.T @ X / sigma ** 2 + np.diag(prior_prec)
        cov = np.linalg.inv(A)
        mean = cov @ (X.T @ y / sigma ** 2 + prior_prec * mu)
        dof = len(y) - np.linalg.matrix_rank(X) if len(y) else 0
        if dof < 5:
            break
        resid = y - X @ mean
        sigma = float(np.clip(math.sqrt(float(resid @ resid) / dof), 0.02, 0.3))
    return mean[T:], cov[T:, T:], sigma


def rank(features, offered: list[dict], records, method: str, *, domain: str | None = None,
         steps: int | None = None, k: int = K, seed: int = 0) -> dict:
    """The offered sources ranked for a task (``features``: its feature dict or vector) and a
    run of ``steps`` steps (None: of unknown length) from the experience ``records`` of
    ``method``: rows {source, init, expected_gain, uncertainty, confidence, runs}, best first,
    plus where the answer came from and why."""
    if not offered:
        raise UserError("no init source is available", field="init")
    evidence = list(_task_runs(records, method, steps).values())
    near = _neighbours(evidence, features, domain, k)
    tasks = [t for t, _ in near]
    mean, cov, sigma = posterior(tasks, steps)
    j = [INIT_SOURCES.index(o["source"]) for o in offered]
    f = INIT_SOURCES.index("fresh")
    rng = np.random.default_rng(seed)
    draws = rng.multivariate_normal(mean, cov, size=DRAWS, method="cholesky")
    gain = draws - draws[:, [f]]
    wins = np.bincount(np.argmax(draws[:, j], 1), minlength=len(j)) / DRAWS
    runs = {s: sum(1 for t in tasks for r, _ in t["runs"] if r == s) for s in INIT_SOURCES}
    ranking = [{"source": o["source"], "init": o["init"], "route": o["route"],
                "init_options": o["init_options"],
                "expected_gain": round(float(mean[jj] - mean[f]), 4),
                "uncertainty": round(float(gain[:, jj].std()), 4),
                "confidence": round(float(wins[i]), 4), "runs": runs[o["source"]],
                "why": o["why"]}
               for i, (o, jj) in enumerate(zip(offered, j))]
    ranking.sort(key=lambda r: (-r["expected_gain"], -r["confidence"]))
    best = ranking[0]
    src = "experience" if tasks else "priors"
    run = f"a {steps}-step run" if steps is not None else "a run"
    if len(ranking) == 1:
        reason = f"{best['source']} is the only init source available"
    elif tasks:
        reason = (f"{best['source']} is expected to gain {best['expected_gain']:+.1%} over fresh "
                  f"in {run} (P(best) {best['confidence']:.0%}) from {len(tasks)} similar past "
                  f"{method} task(s) that tried several init sources "
                  f"({sum(runs.values())} runs), shrunk toward the prior")
    else:
        prior = prior_gain(steps)
        reason = (f"no past {method} task tried several init sources: ranked by the prior for "
                  f"{run} ({' > '.join(sorted(prior, key=lambda s: -prior[s]))}), "
                  "learned once `metapeft sweep --init-sources all` has run")
    return {"method": method, "chosen": best["source"], "steps": steps, "ranking": ranking,
            "source": src,
            "evidence_tasks": len(tasks), "noise_sd": round(sigma, 4),
            "similar_tasks": [{"task": t["name"], "domain": t["domain"],
                               "distance": round(d, 4)} for t, d in near],
            "reason": reason}


def recommend(features, method: str, base, *, config: dict | None = None, registry=None,
              experience=None, domain: str | None = None, steps: int | None = None) -> dict:
    """``rank`` over what ``available`` offers for a run of ``steps`` steps, with the
    unavailable sources and their reasons (``unavailable``)."""
    from metapeft.experience import ExperienceStore

    offered, missing = available(method, base, config=config, registry=registry)
    store = experience if isinstance(experience, ExperienceStore) else ExperienceStore(experience)
    out = rank(features, offered, store.load(), method, domain=domain, steps=steps)
    out["unavailable"] = missing
    if missing:
        out["reason"] += "; not available: " + ", ".join(m["source"] for m in missing)
    return out


def missing_groups(missing: list[dict]) -> list[str]:
    """The unavailable sources with their reasons, sources that share a reason together, one
    ``"a/b: reason"`` string per reason."""
    groups: dict[str, list[str]] = {}
    for m in missing:
        groups.setdefault(m["reason"], []).append(m["source"])
    return [f"{'/'.join(ss)}: {why}" for why, ss in groups.items()]


def describe_missing(missing: list[dict]) -> str:
    """``missing_groups`` on one line."""
    return "; ".join(missing_groups(missing))


def public_json(choice: dict | None) -> dict | None:
    """The documented keys of an init-source answer (``select --json``'s ``init_sources``,
    ``adapt --json``'s ``init_choice``)."""
    if choice is None:
        return None
    return {"method": choice["method"], "chosen": choice["chosen"],
            "steps": choice.get("steps"), "source": choice["source"],
            "reason": choice["reason"], "evidence_tasks": choice["evidence_tasks"],
            "ranking": [{k: r[k] for k in ("source", "init", "expected_gain", "uncertainty",
                                           "confidence", "runs")} for r in choice["ranking"]],
            "unavailable": choice.get("unavailable", [])}

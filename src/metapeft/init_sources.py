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
``generate``  ``--init library:generate`` (``metapeft.generate``)
``route``     ``--route arrow`` (``metapeft.route``)

**Availability** (``available``): fresh always; meta when ``find_init`` finds weights for the
method and this base model; compose and route when the adapter library holds an entry that fits
this LoRA (``library.candidates``: composable, same base model and structure); generate when a
generator for this base model and structure exists (``generate.latest_generator``). A
training-free method has fresh only. Each source not offered comes with its one-line reason.

**Ranking** (``rank``). A run's final accuracy is modelled as task effect + source gain + noise.
The evidence is the ``k`` (10) past tasks nearest to this one (the "kind of task": the
same domain when any past task has it, as the embedder learned that domains matter most, then
the Euclidean distance of the selector's normalised features, ``select.embedder.normalise``)
among those that ran the method from two or more init sources. The gains get a Gaussian prior,
mean ``PRIOR_GAIN``, sd ``PRIOR_SD``; the task effects a flat one; the noise sd is estimated
from the residuals (``NOISE_SD`` while there are fewer than 5 residual degrees of freedom). The
posterior mean of each gain minus fresh's is the ``expected_gain``, its sd the
``uncertainty``, and the ``confidence`` is P(best) among the available sources over ``DRAWS``
posterior draws. With no evidence the posterior is the prior: the ranking is the prior's order
and the confidence stays moderate. At the default noise sd the prior weighs as much as
``(NOISE_SD/PRIOR_SD)**2`` = 4 runs: one past task that compared two sources moves their gap a
fifth of the way to what it saw, ten tasks about 70% (further when their residuals show less
noise).

``PRIOR_GAIN`` (accuracy over fresh, after 10 steps on stories260K): compose +0.054, generate
+0.090, route +0.100 (README "The adapter library": 42 held-out CLINC150 tasks, paired);
meta +0.133 (../shared/DESIGN.md: a Reptile init against a fresh LoRA on 100 held-out
CLINC150 tasks, a separate run). The meta-init and the library sources were never measured
side by side, hence the wide ``PRIOR_SD``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from metapeft.errors import UserError
from metapeft.experience import INIT_SOURCES, init_source_of

PRIOR_GAIN: dict[str, float] = {"fresh": 0.0, "meta": 0.133, "compose": 0.054,
                                "generate": 0.090, "route": 0.100}
PRIOR_SD = 0.05
NOISE_SD = 0.10
K = 10
DRAWS = 4000
LIBRARY_INITS = {"compose": "library:compose", "generate": "library:generate"}
AUTO = "auto"


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
def _task_runs(records, method: str) -> dict[str, dict]:
    """Past tasks of ``method`` with an init source recorded: key -> {name, domain, features,
    runs: [(source, accuracy)]}; only tasks with two or more sources carry evidence."""
    tasks: dict[str, dict] = {}
    for r in records:
        src = init_source_of(r)
        if r.method != method or src is None or not math.isfinite(r.final_accuracy):
            continue
        key = f"{r.task}|{r.domain}|" + ",".join(f"{v:.4g}" for v in r.features)
        t = tasks.setdefault(key, {"name": r.task, "domain": r.domain,
                                   "features": np.asarray(r.features, np.float64), "runs": []})
        t["runs"].append((src, float(r.final_accuracy)))
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


def posterior(tasks: list[dict]) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean (S,), covariance (S, S), noise sd) of the source gains, in ``INIT_SOURCES`` order,
    under the module docstring's model."""
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
    mu = np.array([0.0] * T + [PRIOR_GAIN[s] for s in INIT_SOURCES])
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
         k: int = K, seed: int = 0) -> dict:
    """The offered sources ranked for a task (``features``: its feature dict or vector) from
    the experience ``records`` of ``method``: rows {source, init, expected_gain, uncertainty,
    confidence, runs}, best first, plus where the answer came from and why."""
    if not offered:
        raise UserError("no init source is available", field="init")
    evidence = list(_task_runs(records, method).values())
    near = _neighbours(evidence, features, domain, k)
    tasks = [t for t, _ in near]
    mean, cov, sigma = posterior(tasks)
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
    if len(ranking) == 1:
        reason = f"{best['source']} is the only init source available"
    elif tasks:
        reason = (f"{best['source']} is expected to gain {best['expected_gain']:+.1%} over fresh "
                  f"(P(best) {best['confidence']:.0%}) from {len(tasks)} similar past "
                  f"{method} task(s) that tried several init sources "
                  f"({sum(runs.values())} runs), shrunk toward the prior")
    else:
        reason = (f"no past {method} task tried several init sources: ranked by the prior "
                  f"({' > '.join(sorted(PRIOR_GAIN, key=lambda s: -PRIOR_GAIN[s]))}), "
                  "learned once `metapeft sweep --init-sources all` has run")
    return {"method": method, "chosen": best["source"], "ranking": ranking, "source": src,
            "evidence_tasks": len(tasks), "noise_sd": round(sigma, 4),
            "similar_tasks": [{"task": t["name"], "domain": t["domain"],
                               "distance": round(d, 4)} for t, d in near],
            "reason": reason}


def recommend(features, method: str, base, *, config: dict | None = None, registry=None,
              experience=None, domain: str | None = None) -> dict:
    """``rank`` over what ``available`` offers, with the unavailable sources and their
    reasons (``unavailable``)."""
    from metapeft.experience import ExperienceStore

    offered, missing = available(method, base, config=config, registry=registry)
    store = experience if isinstance(experience, ExperienceStore) else ExperienceStore(experience)
    out = rank(features, offered, store.load(), method, domain=domain)
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
    return {"method": choice["method"], "chosen": choice["chosen"], "source": choice["source"],
            "reason": choice["reason"], "evidence_tasks": choice["evidence_tasks"],
            "ranking": [{k: r[k] for k in ("source", "init", "expected_gain", "uncertainty",
                                           "confidence", "runs")} for r in choice["ranking"]],
            "unavailable": choice.get("unavailable", [])}

"""``adapt --method auto``: the method, its hyperparameters and its init, chosen for a task from
what metapeft has seen.

``decide`` profiles the task (``select.features``), ranks the methods (``select.selector.select``:
a trained selector, else one trained now from the experience store, else the documented priors),
takes the top method with its recommended hyperparameters, and looks in the meta-weights registry
for an init of that method trained on this base model (``find_init``). ``adapt`` then runs the
decision; the decision and the outcome go into the experience store together (the record's
``run.decision``), where the selector learns from them like from any run.
"""

from __future__ import annotations

from pathlib import Path

from metapeft.errors import UserError


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


def decide(task, base, *, selector: str | Path | None = None,
           experience: str | Path | None = None, registry: str | Path | None = None,
           init: str | None = None) -> tuple[dict, dict]:
    """(the decision, the task's features) for ``task`` on ``base``: the top-ranked method with
    its confidence, the alternatives, its recommended hyperparameters and where they come from,
    the init (``init`` when given, else ``find_init``) and why."""
    from metapeft.experience import ExperienceStore
    from metapeft.select.features import task_features
    from metapeft.select.selector import select

    features = task_features(task, base)
    res = select(features, selector_dir=selector, store=ExperienceStore(experience))
    top, rest = res["ranking"][0], res["ranking"][1:]
    method = top["method"]
    if init is not None:
        init_spec, init_options, init_why = init, None, "given by --init"
    else:
        init_spec, init_options, init_why = find_init(method, base, registry)
    decision = {
        "method": method, "confidence": top["confidence"],
        "predicted_accuracy": top["predicted_accuracy"], "source": res["source"],
        "alternatives": [{"method": r["method"], "confidence": r["confidence"],
                          "predicted_accuracy": r["predicted_accuracy"]} for r in rest],
        "hyperparameters": dict(top["hyperparameters"]),
        "hyperparameters_from": top["hyperparameters_from"],
        "init": init_spec, "init_options": init_options, "init_reason": init_why,
        "reason": res["reason"]}
    return decision, features

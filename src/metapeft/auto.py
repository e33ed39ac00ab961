"""``adapt --method auto``: the method, its hyperparameters and its init, chosen for a task from
what metapeft has seen.

``decide`` profiles the task (``select.features``), ranks the methods (``select.selector.select``:
a trained selector, else one trained now from the experience store, else the documented priors),
takes the top method with its recommended hyperparameters, and picks where its adapter starts
(``init_sources``: fresh, the newest registry meta-weights of that method for this base model,
library:compose, library:generate or Arrow routing, ranked among the available ones from the
experience of similar tasks, else from a prior). ``adapt`` then runs the decision; the decision
and the outcome go into the experience store together (the record's ``run.decision`` and
``run.init_source``), where the selectors learn from them like from any run.
"""

from __future__ import annotations

from pathlib import Path

from metapeft.init_sources import find_init  # noqa: F401  (its home before init sources)


def decide(task, base, *, selector: str | Path | None = None,
           experience: str | Path | None = None, registry: str | Path | None = None,
           init: str | None = None, route: str | None = None, config: dict | None = None,
           steps: int | None = None) -> tuple[dict, dict]:
    """(the decision, the task's features) for ``task`` on ``base``: the top-ranked method with
    its confidence, the alternatives, its recommended hyperparameters and where they come from,
    the init and why: ``init``/``route`` when given, else the top init source available for
    that method (``init_sources.recommend``, with the adapter options ``config`` and the
    recommended ones) and a run of ``steps`` steps (None: the recommended steps);
    ``init_choice`` is that ranking (None when the init was given)."""
    from metapeft.adapters import get_adapter_class
    from metapeft.experience import ExperienceStore
    from metapeft.init_sources import describe_missing, recommend
    from metapeft.select.features import task_domain, task_features
    from metapeft.select.selector import select

    features = task_features(task, base)
    store = ExperienceStore(experience)
    res = select(features, selector_dir=selector, store=store)
    top, rest = res["ranking"][0], res["ranking"][1:]
    method = top["method"]
    choice, init_options, init_source = None, None, None
    if init is not None or route is not None:
        from metapeft.experience import init_source as kind

        init_why = "given by --init" if init is not None else "given by --route"
        init_source = kind(init, route is not None)
    else:
        known = get_adapter_class(method).Config.defaults()
        options = {**{k: v for k, v in top["hyperparameters"].items() if k in known},
                   **(config if isinstance(config, dict) else {})}
        planned = steps if steps is not None else top["hyperparameters"].get("steps")
        choice = recommend(features, method, base, config=options, registry=registry,
                           experience=store, domain=task_domain(task), steps=planned)
        best = choice["ranking"][0]
        init, route, init_options = best["init"], best["route"], best["init_options"]
        init_source = best["source"]
        init_why = f"{init_source}: {best['why']}; {choice['reason']}" + (
            f" ({describe_missing(choice['unavailable'])})" if choice["unavailable"] else "")
    decision = {
        "method": method, "confidence": top["confidence"],
        "predicted_accuracy": top["predicted_accuracy"], "source": res["source"],
        "alternatives": [{"method": r["method"], "confidence": r["confidence"],
                          "predicted_accuracy": r["predicted_accuracy"]} for r in rest],
        "hyperparameters": dict(top["hyperparameters"]),
        "hyperparameters_from": top["hyperparameters_from"],
        "init": init, "init_options": init_options, "init_source": init_source,
        "init_reason": init_why, "route": route, "init_choice": choice, "reason": res["reason"]}
    return decision, features

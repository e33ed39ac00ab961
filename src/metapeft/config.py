"""The project's YAML configs, read in one place.

``configs/`` ships inside the wheel as package data (``metapeft/configs``, see pyproject's
force-include) and is found through ``importlib.resources``; in a source checkout (an editable
install) the package directory has no copy, so the repository's ``configs/`` is used. Nothing else
opens these files.

``default.yaml`` holds the run-level defaults (steps, target, optimizer, objective). A method's
own defaults (learning rate and options) live in its adapter class (``Adapter.default_lr``,
``Config``), never here.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from metapeft.errors import UserError

RUN_DEFAULTS = {"objective": "ce", "optimizer": "adam", "steps": 20, "target": 0.8}

# `meta-train`'s defaults: the recipe the README's meta-learning results were measured with
# (benchmarks/meta_clinc.py: Reptile, 30 meta-steps x 4 tasks x 10 inner Adam steps at the
# method's own lr, 5 query examples per class, 15% of the classes held out for validation every
# 10 meta-steps on 6 episodes, the best validation step published). The earlier defaults (100
# meta-steps, 5 inner steps, 15 query, 3x the lr) gave +8.6 +- 6.6 points over fresh on 20
# held-out tasks where this recipe gives +14.0 +- 2.4 on 200.
META_RECIPE = {"meta_steps": 30, "meta_batch": 4, "inner_steps": 10, "query": 5,
               "val_fraction": 0.15, "eval_every": 10, "eval_episodes": 6,
               # the test-time step-size calibration (meta/stepsize.py): these lr factors, each
               # constant and with an inverse-time decay of 1, on the early-stopping episodes
               # (calibrate_tasks None). On stories260K it keeps the constant 1e-3.
               "lr_factors": (2.0, 1.0, 0.5, 0.2), "lr_decays": (0.0, 1.0),
               "calibrate_tasks": None}

# What the recipe measured on large models changes, from LARGE_MODEL_PARAMETERS parameters on
# (SmolLM2-135M; README "Results"). 10 meta-steps: a meta-step costs about 3 min on 2 CPU
# cores. The calibration on 24 validation tasks over x1 and x0.5 the lr with decays 1 and 3:
# 6 tasks could not separate the top candidates (x0.5 decay 1 and x1 decay 3 tied at 96.5%);
# 24 chose x1 with decay 3, which keeps the full first step.
LARGE_MODEL_PARAMETERS = 10_000_000
LARGE_MODEL_RECIPE = {"meta_steps": 10, "lr_factors": (1.0, 0.5), "lr_decays": (1.0, 3.0),
                      "calibrate_tasks": 24}


def recipe_for(num_parameters: int) -> dict:
    """`meta-train`'s defaults for a base model of ``num_parameters`` parameters."""
    large = num_parameters >= LARGE_MODEL_PARAMETERS
    return {**META_RECIPE, **(LARGE_MODEL_RECIPE if large else {})}


def tier_default(key: str, small: str | None = None) -> str:
    """``[default: SMALL; LARGE for models of 10M+ parameters]`` for a --help text."""
    def show(v):
        return ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else str(v)

    return (f"[default: {small or show(META_RECIPE[key])}; {show(LARGE_MODEL_RECIPE[key])} for "
            f"models of {LARGE_MODEL_PARAMETERS // 10**6}M+ parameters]")


# The drift gate's defaults (``drift.py``; ``weights check`` and ``meta-train --gate``), here so
# the CLI can show them without importing numpy: probe tasks, adaptation steps per version and
# task, the largest accepted drop in mean accuracy (absolute: 2 points) and the largest accepted
# mean KL(p_old || p_new) over the probe queries, in nats.
GATE = {"tasks": 20, "steps": 5, "tolerance": 0.02, "max_drift": 0.3}


def config_file(name: str):
    """The packaged ``configs/NAME`` (a Traversable), else the source checkout's."""
    packaged = resources.files("metapeft").joinpath("configs", name)
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs" / name


def read_yaml(path, what: str = "config") -> dict:
    """A YAML mapping; a one-line UserError (with the line) when the file is missing or invalid."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} file does not exist", path=str(path)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"invalid YAML: {getattr(e, 'problem', e)}", path=str(path),
                        line=None if mark is None else mark.line + 1) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{what} must be a mapping", path=str(path))
    return raw


@functools.lru_cache(maxsize=1)
def run_defaults() -> dict:
    """``configs/default.yaml`` over the built-in run defaults (read once per process)."""
    out = dict(RUN_DEFAULTS)
    raw = read_yaml(config_file("default.yaml"), "defaults")
    out.update({k: v for k, v in raw.items() if k in RUN_DEFAULTS})
    return out

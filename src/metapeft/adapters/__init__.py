"""PEFT adapters, one module per method, all behind the protocol in ``base.py``.

The registry maps a method name to ``module:Class``; modules import lazily so that importing
metapeft (and ``metapeft --help``) never pulls in mlx_lm.
"""

from __future__ import annotations

import importlib

from metapeft.errors import UserError

_REGISTRY = {
    "lora": "metapeft.adapters.lora:LoRA",
    "dora": "metapeft.adapters.lora:DoRA",
    "adalora": "metapeft.adapters.adalora:AdaLoRA",
    "prompt": "metapeft.adapters.prompt:PromptTuning",
    "prefix": "metapeft.adapters.prefix:PrefixTuning",
    "ptuning": "metapeft.adapters.ptuning:PTuning",
    "prototype": "metapeft.adapters.prototype:Prototype",
}
METHODS: tuple[str, ...] = tuple(_REGISTRY)
# The method a command or call uses when none is named (`metapeft adapt`, `meta-train`).
DEFAULT_METHOD = "lora"
# `adapt --method auto`: not a method; the selector picks one for the task (metapeft.auto).
AUTO_METHOD = "auto"
# The documented prior ranking `metapeft select` falls back to without experience (measured on the
# synthetic sweep of benchmarks/select_eval.py; see metapeft.select.selector). The training-free
# prototype is second: level with LoRA at 8 steps on that sweep and far ahead of it on CLINC150
# with stories260K, but behind LoRA's default 20 steps on both real models.
PRIOR_ORDER: tuple[str, ...] = ("lora", "prototype", "adalora", "dora", "prefix", "ptuning",
                                "prompt")
# The small fresh adapter whose loss, accuracy and gradient norm are task features (`profile`).
PROBE_METHOD, PROBE_OPTIONS = "lora", {"rank": 4}


def get_adapter_class(method: str):
    """The Adapter subclass for ``method``; a one-line UserError for an unknown name."""
    try:
        target = _REGISTRY[method]
    except KeyError:
        raise UserError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}",
                        field="method") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def parse_methods(value) -> list[str]:
    """``"all"``, a comma list or a list of method names -> the names, checked, in order."""
    if isinstance(value, str):
        if value.strip() == "all":
            return list(METHODS)
        value = value.split(",")
    out = [m.strip() for m in value if m.strip()]
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise UserError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)} or 'all'",
                        field="methods")
    return out

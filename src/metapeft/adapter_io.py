"""Adapter directories on disk: ``adapters.safetensors`` (weights, metadata in the header) and
``adapter_config.json``, and the ``--init`` argument that names one.

``save_adapter`` writes what ``adapt --out`` produces; for methods with an mlx-lm equivalent
(``Adapter.mlx_lm_config``) the config is mlx-lm's own, so ``mlx_lm.load(model, adapter_path=out)``
works. ``load_adapter`` reads any method back, on the base model it was trained on (a different
model is refused by fingerprint); ``init_path`` / ``resolve_init`` turn ``--init`` (a file, an
adapter directory or registry ``NAME[@VERSION]``) into a file and into parameters.

A directory written by ``adapt --out`` describes itself (``read_adapter_info``): method and
config, base model id and fingerprint, the label set in order with the text scored for each
label (``verbalisations``), the prompt template, the training objective, and ``provenance``
(init ``NAME@VERSION`` or path, seed, steps, final query accuracy, ...). The safetensors header
holds it all; ``adapter_config.json`` repeats it next to mlx-lm's keys, which ignore the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from metapeft import __version__
from metapeft.artifacts import atomic_write_json, load_safetensors, save_safetensors
from metapeft.errors import UserError

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def init_path(init: str | Path, registry: str | Path | None = None) -> Path:
    """The safetensors file ``init`` names: itself, ``DIR/adapters.safetensors`` for an adapter
    directory, or a version in the meta-weights registry (``NAME[@VERSION]``)."""
    path = Path(init)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.exists():
        from metapeft.registry import resolve

        path = resolve(str(init), registry)
    return path


def resolve_init(init: str | Path | None, adapter, registry: str | Path | None = None
                 ) -> dict | None:
    """Initial adapter params from ``init`` (see ``init_path``), checked against ``adapter``;
    ``None`` for a fresh init (and for ``library:...``, which ``adapt`` builds from the task)."""
    if init is None or str(init).startswith("library:"):
        return None
    path = init_path(init, registry)
    arrays, meta = load_safetensors(path)
    return adapter.check_compatible(adapter.unflat(arrays), meta, str(path))


def step_size_source(init: str | Path | None) -> str | Path | None:
    """The init whose calibrated step size ``adapt`` uses from ``init``: ``init`` itself, INIT
    for ``library:compose[:K]+INIT`` (the mixture is anchored at INIT) and ``library:merge[:K]
    +INIT`` (INIT is what trains), else None (a fresh init, or a library init without an anchor
    init). ``compose.parse_spec`` splits the same "+"."""
    if init is None:
        return None
    text = str(init)
    if text.startswith(("library:compose", "library:merge")):
        return text.partition("+")[2] or None
    return None if text.startswith("library:") else init


def init_adapt_lr(init: str | Path | None, registry: str | Path | None = None) -> float | None:
    """The Adam lr that ``adapt`` should use from ``init``: the one its meta-training run chose on
    validation tasks (``meta.stepsize``; the overall choice, see ``init_step_size`` for a run
    length's), or None (no ``step_size_source``, or weights published before it)."""
    chosen = init_step_size(init, registry)
    return None if chosen is None else chosen["adapt_lr"]


def init_adapt_lr_decay(init: str | Path | None, registry: str | Path | None = None) -> float:
    """The inverse-time lr decay that goes with ``init_adapt_lr`` (``train.lr_schedule``): the
    one its calibration chose, or 0 (a constant lr) when there is none."""
    chosen = init_step_size(init, registry)
    return 0.0 if chosen is None else chosen["adapt_lr_decay"]


def init_step_size(init: str | Path | None, registry: str | Path | None = None, *,
                   steps: int | None = None) -> dict | None:
    """``{"adapt_lr", "adapt_lr_decay", "horizon"}`` calibrated for ``init`` (``horizon``: the
    calibrated run length whose choice it is, None for the overall choice), or None when the init
    brings no step size."""
    source = step_size_source(init)
    if source is None:
        return None
    from metapeft.artifacts import read_metadata

    return stored_step_size(read_metadata(init_path(source, registry)), steps)


def stored_step_size(meta: dict, steps: int | None = None) -> dict | None:
    """A version header's calibrated step size (see ``init_step_size``): the overall choice in
    ``adapt_lr``/``adapt_lr_decay``, or with ``steps`` and a calibration that has horizons, the
    choice for a run of that length."""
    try:
        lr = float(meta["adapt_lr"])
    except (KeyError, TypeError, ValueError):
        return None
    chosen = {"adapt_lr": lr, "adapt_lr_decay": stored_lr_decay(meta), "horizon": None}
    from metapeft.artifacts import json_field

    cal = json_field(meta, "adapt_lr_calibration")  # a JSON string in the header
    if steps is None or not isinstance(cal, dict) or not cal.get("horizons"):
        return chosen
    from metapeft.meta.stepsize import schedule_for_steps

    try:
        return schedule_for_steps(cal, steps)
    except (KeyError, TypeError, ValueError):  # a malformed table: the overall choice stands
        return chosen


def stored_lr_decay(meta: dict) -> float:
    """The ``adapt_lr_decay`` in a version's header, or 0 (a constant lr)."""
    import math

    try:
        value = float(meta.get("adapt_lr_decay", 0.0))
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


INNER_LR_PREFIX = "inner_lr."  # per-layer inner-lr multipliers stored beside meta-weights


def inner_lr_arrays(log_lr: dict) -> dict:
    """Per-layer mode's log-multipliers (a tree, one scalar per parameter leaf) as the tensors
    published with the version: ``inner_lr.<param>`` = exp(s), the multiplier itself."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return {INNER_LR_PREFIX + k: mx.exp(v).astype(mx.float32) for k, v in tree_flatten(log_lr)}


def split_inner_lr(arrays: dict) -> dict[str, float] | None:
    """The stored multipliers by parameter name (``inner_lr.<param>``), or None when there are
    none (shared inner lr, or weights published before per-layer lrs)."""
    scales = {k[len(INNER_LR_PREFIX):]: float(v.item()) for k, v in arrays.items()
              if k.startswith(INNER_LR_PREFIX)}
    return scales or None


def inner_lr_summary(scales: dict[str, float]) -> dict:
    """Min / median / max multiplier per module type: the parameter name with its numeric parts
    (block indices) dropped, e.g. every block's ``self_attn.q_proj.<leaf>`` together."""
    import statistics

    groups: dict[str, list[float]] = {}
    for name, v in scales.items():
        kind = ".".join(p for p in name.split(".") if not p.isdigit())
        groups.setdefault(kind, []).append(v)
    return {k: {"leaves": len(v), "min": round(min(v), 4),
                "median": round(statistics.median(v), 4), "max": round(max(v), 4)}
            for k, v in sorted(groups.items())}


def init_lr_scales(init: str | Path | None, registry: str | Path | None = None
                   ) -> dict[str, float] | None:
    """The per-leaf inner-lr multipliers stored with ``init`` (meta-train --inner-lr-mode
    per-layer), which ``adapt`` applies to the optimizer's update; None when it has none.
    ``library:merge...+INIT`` trains INIT's own factors: INIT's multipliers."""
    if init is not None and str(init).startswith("library:merge"):
        init = step_size_source(init)  # its INIT, or None
    if init is None or str(init).startswith("library:"):
        return None
    from metapeft.artifacts import read_metadata

    path = init_path(init, registry)
    # the header says whether there are any (meta-train writes inner_lr_mode only with them):
    # the usual init has none, and resolve_init has already loaded its tensors once
    if read_metadata(path).get("inner_lr_mode") in (None, "shared"):
        return None
    arrays, _ = load_safetensors(path)
    return split_inner_lr(arrays)


def describe_init(init: str | Path | None, registry: str | Path | None = None) -> str | None:
    """How an adapter's provenance names its init: None (fresh), ``NAME@VERSION`` for a registry
    version (the version ``NAME`` or ``NAME@latest`` resolved to), ``library:...`` as given,
    else the path given."""
    if init is None or str(init).startswith("library:"):
        return None if init is None else str(init)
    if Path(init).exists():
        return str(init)
    from metapeft.registry import parse_spec

    name, _ = parse_spec(str(init))
    return f"{name}@{parse_spec(f'{name}@{init_path(init, registry).stem}')[1]}"


def save_adapter(out: str | Path, adapter, params: dict, extra: dict | None = None) -> Path:
    """Write ``out/adapters.safetensors`` (metadata in the header) and ``out/adapter_config.json``;
    ``extra`` (what the directory says about itself, see ``AdapterInfo``) goes into both."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError("output path exists and is not a directory", path=str(out), field="out")
    params = adapter.scoring_params(params)
    save_safetensors(out / WEIGHTS_FILE, adapter.flat(params),
                     adapter.metadata(params, **(extra or {})))
    config = {"metapeft_version": __version__, "method": adapter.method,
              "config": adapter.config.to_dict(), "model": adapter.base.path,
              "base_model": adapter.base.model_id, "base_model_hash": adapter.base.fingerprint}
    config.update({k: v for k, v in (extra or {}).items() if k not in config})
    config.update(adapter.mlx_lm_config() or {})
    atomic_write_json(out / CONFIG_FILE, config)
    return out


def read_adapter(path: str | Path) -> tuple[Path, dict, dict, str]:
    """(weights file, arrays, header metadata, method) of an adapter directory or weights file."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    arrays, meta = load_safetensors(weights)
    method = meta.get("method")
    if method is None:
        raise UserError("no 'method' in the safetensors header; not a metapeft adapter",
                        path=str(weights), field="method")
    return weights, arrays, meta, method


def check_base_model(meta: dict, base, source: str) -> None:
    """Refuse, in one line, a base model other than the one an adapter was trained on (their
    fingerprints differ)."""
    fp = meta.get("base_model_hash")
    if fp is not None and fp != base.fingerprint:
        raise UserError(f"adapter was trained on base model '{meta.get('base_model')}' "
                        f"(fingerprint {fp}), not '{base.model_id}' (fingerprint "
                        f"{base.fingerprint}); pass that model to --model, or leave --model out",
                        path=source, field="model")


def load_adapter(path: str | Path, model: str | None = None, *, dequantize: str = "auto"):
    """(adapter, params) from a directory (or weights file) written by ``save_adapter``, any
    method, attached to ``model`` (default: the base model named in the file's header); a model
    with another fingerprint than the one it was trained on is refused."""
    from metapeft.adapters import get_adapter_class
    from metapeft.models import DEFAULT_MODEL, load_base_model

    from metapeft.adapters.stacked import STACK_METHOD, load_stack

    weights, arrays, meta, method = read_adapter(path)
    if method != STACK_METHOD:
        cls = get_adapter_class(method)
    config = json_header(meta, "config", dict, str(weights)) or {}
    base = load_base_model(model or meta.get("base_model") or DEFAULT_MODEL, dequantize=dequantize)
    check_base_model(meta, base, str(weights))
    if method == STACK_METHOD:  # two stages written by `adapt --switch auto`
        return load_stack(arrays, meta, base, str(weights))
    adapter = cls.attach(base, cls.Config.from_dict(config, source=str(weights)))
    return adapter, adapter.check_compatible(adapter.unflat(arrays), meta, str(weights))


def json_header(meta: dict, key: str, kind: type, source: str):
    """Header field ``key`` decoded from JSON and checked to be a ``kind``; None when absent."""
    if key not in meta:
        return None
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError:
        raise UserError("header value is not valid JSON", path=source, field=key) from None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise UserError(f"header value should be a {kind.__name__}, got {value!r}", path=source,
                        field=key)
    return value


@dataclass
class AdapterInfo:
    """What an adapter directory says about itself (``read_adapter_info``). Fields after
    ``base_model_hash`` are None in directories written before metapeft recorded them."""

    path: str  # the weights file
    method: str
    config: dict
    base_model: str | None
    base_model_hash: str | None
    labels: list[str] | None = None  # the candidates, in score order
    verbalisations: list[str] | None = None  # the text scored for each label
    template: str | None = None  # the prompt, with {text}
    max_prompt_tokens: int | None = None
    objective: str | None = None
    task: str | None = None
    provenance: dict = field(default_factory=dict)  # init, seed, steps, final_accuracy, ...
    metapeft_version: str | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def read_adapter_info(path: str | Path) -> AdapterInfo:
    """The self-description of an adapter directory (or weights file), from its header alone:
    no model is loaded."""
    weights, _, meta, method = read_adapter(path)
    src = str(weights)
    labels = json_header(meta, "labels", list, src)
    verbal = json_header(meta, "verbalisations", list, src)
    for key, values in (("labels", labels), ("verbalisations", verbal)):
        if values is not None and not all(isinstance(v, str) and v for v in values):
            raise UserError("expected a list of non-empty strings", path=src, field=key)
    if labels is not None and verbal is not None and len(verbal) != len(labels):
        raise UserError(f"{len(verbal)} verbalisations for {len(labels)} labels", path=src,
                        field="verbalisations")
    template = meta.get("template")
    if template is not None and "{text}" not in template:
        raise UserError("the prompt template has no {text}", path=src, field="template")
    return AdapterInfo(
        path=src, method=method, config=json_header(meta, "config", dict, src) or {},
        base_model=meta.get("base_model"), base_model_hash=meta.get("base_model_hash"),
        labels=labels, verbalisations=verbal, template=template,
        max_prompt_tokens=json_header(meta, "max_prompt_tokens", int, src),
        objective=meta.get("objective"), task=meta.get("task"),
        provenance=json_header(meta, "provenance", dict, src) or {},
        metapeft_version=meta.get("metapeft_version"))

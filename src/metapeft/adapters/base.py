"""The adapter protocol: the only place where a PEFT method is named.

An adapter attaches to a frozen base model and exposes a *trainable parameter tree*. Its forward
pass is a pure function of that tree, ``scores(params, batch)``, so the same code runs under
``mx.grad`` (training, second-order MAML), ``mx.vmap`` (meta-batches) and ``mx.compile``. The train
loop, the meta-learner, the selector and the tuner only ever see this surface:

    adapter = get_adapter_class(method).attach(base, config)
    params = adapter.init_params(seed)          # fresh trainable tree
    scores = adapter.scores(params, batch)      # (B, C) candidate log-probabilities
    loss = adapter.regularizer(params)          # method-specific extra loss (None for most)
    params = adapter.fit(params, support)       # training-free methods: params from the support set
    state = adapter.init_state(params)          # optax-style hook state (AdaLoRA's allocator)
    params, state = adapter.on_step(params, grads, state, step, total)

The class also describes the method to everything else, so nothing outside ``adapters/`` names
one: ``default_lr``, ``structural`` (options that fix the tree's shapes), ``swaps_layers``
(trains inside the layers rather than adding inputs), ``training_free``
(parameters computed by ``fit`` from the support set, no optimizer steps, nothing to
meta-learn), ``Config`` (defaults, ``validate``, ``repair``), ``default_hyperparameters()``, and
the export formats ``mlx_lm_config()`` / ``to_peft()``, which return None where the format does
not apply.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from metapeft import __version__
from metapeft.artifacts import is_extra_tensor
from metapeft.errors import UserError
from metapeft.models import BaseModel
from metapeft.scoring import Batch


def structural_copy(module: Any) -> Any:
    """Copy the module tree (dicts, lists, Modules) while sharing the weight arrays.

    Adapters that swap layers (LoRA, AdaLoRA) do it on a copy, so a cached base model can host any
    number of adapters side by side without reloading weights.
    """
    if isinstance(module, nn.Module):
        new = copy.copy(module)
        for k, v in module.items():
            new[k] = structural_copy(v)
        return new
    if isinstance(module, list):
        return [structural_copy(v) for v in module]
    if isinstance(module, dict):
        return {k: structural_copy(v) for k, v in module.items()}
    return module


def copy_and_check_targets(base_model: nn.Module, target_modules: list[str],
                           num_layers: int) -> tuple[nn.Module, int]:
    """A structural copy of the model to swap layers in, and how many trailing blocks to adapt;
    refuses target modules the blocks do not have (LoRA, DoRA and AdaLoRA share this)."""
    model = structural_copy(base_model)
    n = len(model.layers)
    present = {k for k, _ in model.layers[0].named_modules()}
    missing = [k for k in target_modules if k not in present]
    if missing:
        raise UserError(f"target modules {missing} not found in the model's blocks",
                        field="target_modules")
    return model, n if num_layers < 0 else min(num_layers, n)


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          list: "a list", dict: "a mapping", type(None): "null"}


def typed_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` of option ``name`` says, or a one-line UserError.

    ints take integral numbers (2, 2.0; not 2.5 or true), floats take finite numbers, bools only
    true/false, strings any scalar but a boolean, and ``list[str]`` a list of strings or one
    comma-separated string (``target_modules=self_attn.q_proj,self_attn.v_proj``); ``X | None``
    also takes null."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return typed_value(name, value, inner[0]) if len(inner) == 1 else value
    want = _KINDS.get(hint, "a list of strings")
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    bad = UserError(f"expected {want}, got {shown} "
                    f"({_KINDS.get(type(value), type(value).__name__)})", field=name)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise bad
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise bad
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad
        return str(value)
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad
        return list(value)
    return value


@dataclass
class AdapterConfig:
    """Base for per-method config dataclasses."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> "AdapterConfig":
        """A validated config from ``d`` (``--set``/``--config`` values, or a file's header):
        every value is checked against its field's type (``typed_value``) before ``validate``."""
        if not isinstance(d, dict):
            raise UserError(f"options must be a mapping of option: value, got {d!r}",
                            path=source)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - names)
        if unknown:
            raise UserError(f"unknown option(s) {unknown}; valid: {sorted(names)}", path=source)
        hints = typing.get_type_hints(cls)
        out = cls(**{k: typed_value(k, v, hints[k]) for k, v in d.items()})
        out.validate()
        return out

    @classmethod
    def defaults(cls) -> dict:
        """Every option's default value."""
        return cls().to_dict()

    def validate(self) -> None:
        pass

    @classmethod
    def repair(cls, options: dict) -> dict:
        """Make a set of options valid where they constrain each other (used by searches that
        draw options independently); the default has no such constraints."""
        return options


def check_num_layers(num_layers: int) -> None:
    """``num_layers`` counts trailing blocks: -1 (all) or at least 1. 0 is refused, since mlx-lm
    reads ``layers[-0:]`` as every block while a literal reading adapts none."""
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or (
            num_layers != -1 and num_layers < 1):
        raise UserError(f"num_layers must be -1 (every block) or >= 1, got {num_layers!r}",
                        field="num_layers")


class Adapter:
    """Base class implementing the shared parts of the protocol. Subclasses define:

    ``method``, ``Config``, ``default_lr``, ``structural``, ``_attach()``, ``init_params(seed)``
    and ``scores(params, batch)``; optionally ``regularizer``, ``init_state``/``on_step``,
    ``mlx_lm_config`` and ``to_peft``.
    """

    method: ClassVar[str]
    Config: ClassVar[type[AdapterConfig]]
    default_lr: ClassVar[float] = 1e-3  # the learning rate `adapt` uses when none is given
    structural: ClassVar[tuple[str, ...]] = ()  # options that fix the trainable tree's shapes
    # True: ``fit`` computes the parameters from the support set; `adapt` runs no optimizer step
    # (and takes no lr or init), `meta-train` refuses the method.
    training_free: ClassVar[bool] = False
    # True: the method trains inside the model's layers, on a copy of the model of its own
    # (``self.model``, updated with the params in ``scores``); False: it adds inputs (virtual
    # tokens, prefix keys/values) to the shared frozen model. Decides how two stages stack
    # (``adapters.stacked``).
    swaps_layers: ClassVar[bool] = False
    frozen_blocks: int = 0  # bottom blocks the adapter leaves untouched (set by _attach)

    def __init__(self, base: BaseModel, config: AdapterConfig):
        self.base = base
        self.config = config
        self._attach()

    @classmethod
    def attach(cls, base: BaseModel, config: AdapterConfig | dict | None = None) -> "Adapter":
        if config is None:
            config = cls.Config()
        elif isinstance(config, dict):
            config = cls.Config.from_dict(config)
        else:
            config.validate()
        return cls(base, config)

    @classmethod
    def default_hyperparameters(cls) -> dict:
        """What `adapt` runs with when nothing is given: the learning rate (none for a
        training-free method) and every option."""
        if cls.training_free:
            return cls.Config.defaults()
        return {"lr": cls.default_lr, **cls.Config.defaults()}

    # --- to implement -----------------------------------------------------------------------
    def _attach(self) -> None:
        raise NotImplementedError

    def init_params(self, seed: int = 0) -> dict:
        raise NotImplementedError

    def scores(self, params: dict, batch: Batch) -> mx.array:
        raise NotImplementedError

    # --- shared forward helpers --------------------------------------------------------------
    def prepare(self, batch: Batch) -> Batch:
        """The batch as this adapter's forward wants it: when the adapter trains only the top
        blocks, with the frozen trunk's hidden states computed once (``scoring.trunk_states``), so
        every later step and evaluation starts at the first trained block."""
        from metapeft.scoring import runs_blocks, trunk_states

        if self.frozen_blocks <= 0 or batch.hidden.ndim == 3 or not runs_blocks(self.base.model):
            return batch
        return trunk_states(self.base.model, batch, self.frozen_blocks)

    # --- optional hooks ---------------------------------------------------------------------
    def fit(self, params: dict, support: list[Batch]) -> dict:
        """The parameters computed from the support set's (prepared) length buckets, before any
        optimizer step: what a ``training_free`` method learns; the others return ``params``."""
        return params

    def regularizer(self, params: dict) -> mx.array | None:
        return None

    def init_state(self, params: dict) -> Any:
        """State of the per-step hook (optax-style); None where the method has no hook."""
        return None

    def on_step(self, params: dict, grads: dict | None, state: Any, step: int,
                total_steps: int) -> tuple[dict, Any]:
        """Called after every optimizer step (1-based ``step``) by the train loop and by the
        meta-learner's inner loops, traced or not: it must be written in mx ops on the trees it is
        given, with only ``step``/``total_steps`` as Python numbers."""
        return params, state

    def set_training(self, training: bool) -> None:
        """Dropout on (training) or off (scoring); a no-op for methods without dropout."""
        model = getattr(self, "model", None)
        if model is not None:
            model.train(training and getattr(self.config, "dropout", 0.0) > 0)

    @contextlib.contextmanager
    def scoring_mode(self):
        """Eval mode (no dropout) for the block, train mode after it."""
        self.set_training(False)
        try:
            yield
        finally:
            self.set_training(True)

    def scoring_params(self, params: dict) -> dict:
        """Params as used for evaluation (e.g. with AdaLoRA's rank mask applied)."""
        return params

    # --- the adapter library (metapeft.library) ------------------------------------------------
    @classmethod
    def compose_refusal(cls, config: dict) -> str | None:
        """Why an adapter of this method with ``config`` cannot be mixed with others (LoraHub
        composition, Arrow routing); None when it can: only plain LoRA, whose A/B pairs sum."""
        return f"{cls.method} has no LoRA A/B pair to mix"

    # --- export formats ---------------------------------------------------------------------
    def mlx_lm_config(self) -> dict | None:
        """mlx-lm's ``adapter_config.json`` keys, where ``mlx_lm.load(adapter_path=)`` can load
        this method; None otherwise."""
        return None

    @classmethod
    def to_peft(cls, arrays: dict, metadata: dict, source: str) -> tuple[dict, dict] | None:
        """(tensors, adapter_config) in HF peft's layout, or None where peft has no equivalent."""
        return None

    # --- shared -----------------------------------------------------------------------------
    def num_trainable(self, params: dict) -> int:
        return sum(v.size for _, v in tree_flatten(params))

    def metadata(self, params: dict | None = None, **extra) -> dict[str, str]:
        """The safetensors header of an artifact of this adapter (``params``: the saved tree, for
        methods whose header describes it)."""
        meta = {
            "format": "mlx",
            "kind": "adapter",
            "method": self.method,
            "config": json.dumps(self.config.to_dict()),
            "base_model": self.base.model_id,
            "base_model_hash": self.base.fingerprint,
            "metapeft_version": __version__,
        }
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
        return meta

    def flat(self, params: dict) -> dict[str, mx.array]:
        return dict(tree_flatten(params))

    def unflat(self, flat: dict[str, mx.array]) -> dict:
        # ``fisher.*`` / ``inner_lr.*``: the EWC Fisher and the per-layer inner-lr multipliers
        # stored with a version (artifacts.EXTRA_TENSOR_PREFIXES), not parameters
        return tree_unflatten([(k, v) for k, v in flat.items() if not is_extra_tensor(k)])

    def check_origin(self, metadata: dict, source: str, what: str) -> None:
        """Refuse a file whose header names another method or base model (``what``: how the
        message describes the file, e.g. "init was trained")."""
        method = metadata.get("method")
        if method is not None and method != self.method:
            raise UserError(f"{what} for method '{method}', not '{self.method}'",
                            path=source, field="method")
        fp = metadata.get("base_model_hash")
        if fp is not None and fp != self.base.fingerprint:
            raise UserError(f"{what} on base model '{metadata.get('base_model')}' "
                            f"({fp}), not '{self.base.model_id}' ({self.base.fingerprint})",
                            path=source, field="base_model")

    def check_compatible(self, params: dict, metadata: dict, source: str) -> dict:
        """Refuse an init whose method, base model or shapes differ from this adapter's."""
        self.check_origin(metadata, source, "init was trained")
        want = self.flat(self.init_params(0))
        got = self.flat(params)
        if set(want) != set(got):
            missing = sorted(set(want) - set(got))[:3]
            extra = sorted(set(got) - set(want))[:3]
            raise UserError(f"init parameters do not match this adapter (missing {missing}, "
                            f"unexpected {extra})", path=source, field="parameters")
        for k, v in want.items():
            if tuple(v.shape) != tuple(got[k].shape):
                raise UserError(f"init parameter '{k}' has shape {tuple(got[k].shape)}, adapter "
                                f"expects {tuple(v.shape)}", path=source, field="shape")
        return params

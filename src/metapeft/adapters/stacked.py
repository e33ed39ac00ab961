"""A new adapter trained on top of a frozen, already trained one: what ``adapt --switch auto``
moves to when the first method's query curve plateaus (``metapeft.switching``).

The frozen stage keeps exactly what it learned: a fresh LoRA-family stage starts as a no-op
(B = 0), so the stack scores what the frozen stage scored. Two layouts, chosen by which of the
two methods swaps the model's layers (LoRA, DoRA, AdaLoRA: ``swaps_layers``) and which adds
inputs (prompt tuning, P-tuning, prefix tuning):

* the frozen stage swaps layers: the new stage attaches to a copy of the model with the frozen
  stage built in. A new virtual-token stage runs through the frozen adapter's layers as they
  are; a new LoRA-family stage needs plain linear layers under it, so each adapted layer is
  fused into one (``fuse_linear``: mlx-lm's ``fuse`` where the layer has one, else the linear map
  read off the layer itself).
* the frozen stage adds inputs and the new one swaps layers: the new layers go under the frozen
  virtual tokens. The frozen method is attached again, to the new stage's model, and scores with
  its trained parameters over whatever the new stage's layers currently hold.

Two virtual-token methods do not stack (each owns the model's inputs): ``can_stack`` says why.

Only the new stage's tree is trainable (``init_params``/``scores`` take it alone); the frozen
stage's tree is a constant of the stack. Saved, a stack is one safetensors file: method
``stack``, the stages' methods and configs in the header, tensors under ``0.`` (frozen) and
``1.`` (new); ``load_stack`` rebuilds it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from metapeft.adapters.base import Adapter, AdapterConfig, structural_copy
from metapeft.errors import UserError
from metapeft.scoring import Batch

STACK_METHOD = "stack"


def can_stack(frozen: Adapter, new_cls) -> str | None:
    """None if a ``new_cls`` stage can train on top of ``frozen``, else why not (one phrase)."""
    if new_cls.training_free or frozen.training_free:
        return "a training-free method carries nothing over and learns nothing on top"
    if not frozen.swaps_layers and not new_cls.swaps_layers:
        return (f"{frozen.method} and {new_cls.method} both add virtual inputs; one of them "
                "must train inside the layers")
    return None


def fuse_linear(layer: nn.Module, base_layer: nn.Module) -> nn.Module:
    """One plain ``nn.Linear`` computing what the (adapted, eval-mode) ``layer`` computes:
    mlx-lm's own ``fuse()`` when the layer has one (LoRA, DoRA), else the linear map read off the
    layer (its outputs on the identity minus its output on zero, which is the bias)."""
    if hasattr(layer, "fuse"):
        return layer.fuse()
    weight = getattr(base_layer, "weight", None)
    if weight is None or isinstance(base_layer, nn.QuantizedLinear):
        raise UserError(f"cannot fuse a {type(layer).__name__} layer over a "
                        f"{type(base_layer).__name__}", field="method")
    out_dims, in_dims = weight.shape
    zero = layer(mx.zeros((1, in_dims), mx.float32))
    w = (layer(mx.eye(in_dims, dtype=mx.float32)) - zero).T  # (out, in)
    has_bias = "bias" in base_layer
    fused = nn.Linear(in_dims, out_dims, bias=has_bias)
    fused.weight = w.astype(weight.dtype)
    if has_bias:
        fused.bias = zero[0].astype(weight.dtype)
    return fused


def _fused_model(frozen: Adapter, frozen_params: dict) -> nn.Module:
    """A copy of the frozen stage's model with each adapted layer fused into a plain Linear."""
    model = structural_copy(frozen.model)
    model.update(frozen.scoring_params(frozen_params))
    adapted = sorted({k.rsplit(".", 1)[0] for k, _ in tree_flatten(frozen_params)})
    base_modules = dict(frozen.base.model.named_modules())
    own = dict(model.named_modules())
    swaps = [(path, fuse_linear(own[path], base_modules[path])) for path in adapted]
    model.update_modules(tree_unflatten(swaps))
    model.freeze()
    mx.eval(model.parameters())
    return model


def _digest(params: dict) -> str:
    h = hashlib.sha256()
    for k, v in tree_flatten(params):
        h.update(k.encode())
        h.update(np.asarray(v.astype(mx.float32)).tobytes())
    return h.hexdigest()[:12]


@dataclass
class StackConfig(AdapterConfig):
    stages: list = field(default_factory=list)  # [{"method", "config"}, {"method", "config"}]


class Stacked(Adapter):
    """``new_cls`` trained on top of ``frozen`` (with its trained ``frozen_params``)."""

    method = STACK_METHOD
    Config = StackConfig

    def __init__(self, frozen: Adapter, frozen_params: dict, new_cls, new_config=None):
        why = can_stack(frozen, new_cls)
        if why is not None:
            raise UserError(f"cannot train {new_cls.method} on top of {frozen.method}: {why}",
                            field="method")
        self.base, self.frozen, self.frozen_params = frozen.base, frozen, frozen_params
        self.default_lr = new_cls.default_lr
        # a different model under the new stage: its own key for the frozen-trunk cache
        self.trunk_key = f"{frozen.base.fingerprint}+{frozen.method}:{_digest(frozen_params)}"
        if frozen.swaps_layers:
            if new_cls.swaps_layers:
                model = _fused_model(frozen, frozen_params)
            else:  # virtual inputs run through the frozen stage's own layers, in eval mode
                model = frozen.model
                model.update(frozen.scoring_params(frozen_params))
                frozen.set_training(False)
            under = copy.copy(frozen.base)
            under.model = model
            self.new = new_cls.attach(under, new_config)
            self.outer = None
            self.frozen_blocks = self.new.frozen_blocks
            if frozen.frozen_blocks >= self.frozen_blocks:
                # the frozen stage changed no block below the new stage's: the same trunk as
                # the base model's, so the cache of the base model's inputs applies as it is
                self.trunk_key = frozen.base.fingerprint
        else:  # the frozen stage's virtual inputs stay on top of the new layers
            self.new = new_cls.attach(frozen.base, new_config)
            over = copy.copy(frozen.base)
            over.model = self.new.model
            self.outer = type(frozen).attach(over, frozen.config)
            self.frozen_blocks = 0  # virtual inputs enter at the bottom: no frozen trunk
        self.config = StackConfig(stages=[
            {"method": frozen.method, "config": frozen.config.to_dict()},
            {"method": self.new.method, "config": self.new.config.to_dict()}])

    @property
    def stage_methods(self) -> list[str]:
        return [self.frozen.method, self.new.method]

    def _attach(self) -> None:  # built in __init__
        pass

    def init_params(self, seed: int = 0) -> dict:
        return self.new.init_params(seed)

    def prepare(self, batch: Batch) -> Batch:
        return self.new.prepare(batch) if self.outer is None else batch

    def scores(self, params: dict, batch: Batch) -> mx.array:
        if self.outer is None:
            return self.new.scores(params, batch)
        self.new.model.update(self.new.scoring_params(params))
        return self.outer.scores(self.frozen_params, batch)

    def regularizer(self, params: dict):
        return self.new.regularizer(params)

    def init_state(self, params: dict):
        return self.new.init_state(params)

    def on_step(self, params, grads, state, step, total_steps):
        return self.new.on_step(params, grads, state, step, total_steps)

    def set_training(self, training: bool) -> None:
        self.new.set_training(training)

    def scoring_params(self, params: dict) -> dict:
        return self.new.scoring_params(params)

    # --- one file for the whole stack --------------------------------------------------------
    def flat(self, params: dict) -> dict[str, mx.array]:
        frozen = self.frozen.flat(self.frozen.scoring_params(self.frozen_params))
        return {**{f"0.{k}": v for k, v in frozen.items()},
                **{f"1.{k}": v for k, v in self.new.flat(params).items()}}

    def unflat(self, flat: dict[str, mx.array]) -> dict:
        return self.new.unflat({k[2:]: v for k, v in flat.items() if k.startswith("1.")})

    def check_compatible(self, params: dict, metadata: dict, source: str) -> dict:
        return self.new.check_compatible(params, {}, source)

    def num_trainable(self, params: dict) -> int:
        return self.new.num_trainable(params)


def load_stack(arrays: dict, meta: dict, base, source: str) -> tuple[Stacked, dict]:
    """(the stack, its new stage's params) from a file that ``save_adapter`` wrote for one."""
    from metapeft.adapters import get_adapter_class

    try:
        stages = json.loads(meta.get("config", "{}"))["stages"]
        (m0, c0), (m1, c1) = [(s["method"], s["config"]) for s in stages]
    except (ValueError, KeyError, TypeError):
        raise UserError("a stack's header needs two stages, each with a method and a config",
                        path=source, field="config") from None
    if STACK_METHOD in (m0, m1):
        raise UserError("a stack of stacks is not supported", path=source, field="config")
    cls0, cls1 = get_adapter_class(m0), get_adapter_class(m1)
    frozen = cls0.attach(base, cls0.Config.from_dict(c0, source=source))
    frozen_flat = {k[2:]: v for k, v in arrays.items() if k.startswith("0.")}
    frozen_params = frozen.check_compatible(frozen.unflat(frozen_flat), {}, source)
    stack = Stacked(frozen, frozen_params, cls1, cls1.Config.from_dict(c1, source=source))
    return stack, stack.check_compatible(stack.unflat(arrays), meta, source)

"""The adapter protocol: the only place where a PEFT method is named.

An adapter attaches to a frozen base model and exposes a *trainable parameter tree*. Its forward
pass is a pure function of that tree, ``scores(params, batch)``, so the same code runs under
``mx.grad`` (training, second-order MAML), ``mx.vmap`` (meta-batches) and ``mx.compile``. The train
loop, the meta-learner, the selector and the tuner only ever see this surface:

    adapter = ADAPTERS[method].attach(base, config)
    params = adapter.init_params(seed)          # fresh trainable tree
    scores = adapter.scores(params, batch)      # (B, C) candidate log-probabilities
    loss = adapter.regularizer(params)          # method-specific extra loss (0 for most)
    params = adapter.on_step(params, grads, step, total)   # e.g. AdaLoRA's rank allocation
    adapter.save(path, params) / adapter.load(path)
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from metapeft import __version__
from metapeft.errors import UserError
from metapeft.models import BaseModel
from metapeft.scoring import Batch


class _ScoringCache:
    """A stand-in KV cache: supplies our attention mask and already-computed keys/values.

    mlx-lm models ask their cache for the attention mask (``make_mask``), rotate queries and keys
    by ``offset`` (an int, or one offset per sequence), and route every layer's keys/values through
    ``update_and_fetch``. Those are the documented extension points, so prefix tuning's keys and
    the prompt-then-labels scoring are injected without patching mlx-lm. The cache also records the
    full keys/values it returned, which the label pass then reuses.
    """

    def __init__(self, mask: mx.array, past: tuple[mx.array, mx.array] | None, offset):
        self.mask = mask
        self.past = past
        self.offset = offset
        self.kv: tuple[mx.array, mx.array] | None = None

    def make_mask(self, *args, **kwargs):
        return self.mask

    def update_and_fetch(self, keys, values):
        if self.past is not None:
            pk, pv = self.past
            keys = mx.concatenate([pk.astype(keys.dtype), keys], axis=2)
            values = mx.concatenate([pv.astype(values.dtype), values], axis=2)
        self.kv = (keys, values)
        return keys, values


def _log_softmax(x: mx.array) -> mx.array:
    x = x.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def score_candidates(model: nn.Module, batch: Batch, *, virtual: mx.array | None = None,
                     prefix: list[tuple[mx.array, mx.array]] | None = None) -> mx.array:
    """Summed label-token log-probabilities for every candidate, (B, C).

    Pass 1 runs the right-padded prompts (after ``virtual`` embeddings (B, V, D) for prompt tuning
    and P-tuning, and after per-layer ``prefix`` keys/values (B, kv_heads, P, head_dim) for prefix
    tuning). Pass 2 runs every candidate's label tokens for every example, B*C sequences, on top of
    pass 1's keys/values, each with its own RoPE offset so positions equal those of the single
    sequence ``prompt + label``.
    """
    prompt, plen = batch.prompt, batch.prompt_len
    B, Lp = prompt.shape
    C, Lm = batch.label_tokens.shape
    n_layers = len(model.layers)
    V = 0 if virtual is None else virtual.shape[1]
    P = 0 if prefix is None else prefix[0][0].shape[2]

    # ---- pass 1: the prompts ----------------------------------------------------------------
    pos = mx.arange(Lp)
    valid = pos[None, :] < plen[:, None]  # (B, Lp) real prompt tokens
    causal = pos[:, None] >= pos[None, :]
    # mx.logical_and/or, not & and |: under mx.vmap the bitwise operators mis-broadcast an
    # unbatched operand against a batched one (MLX 0.32; see tests/test_meta.py vmap check).
    m1 = mx.logical_or(mx.logical_and(causal[None], valid[:, None, :]),
                       mx.eye(Lp, dtype=mx.bool_)[None])  # pads attend to themselves
    inputs, embeddings = prompt, None
    if V:
        emb = model.model.embed_tokens(prompt)
        embeddings = mx.concatenate([virtual.astype(emb.dtype), emb], axis=1)
        inputs = mx.concatenate([mx.zeros((B, V), prompt.dtype), prompt], axis=1)
        top = mx.concatenate([mx.broadcast_to(mx.tril(mx.ones((V, V), mx.bool_)), (B, V, V)),
                              mx.zeros((B, V, Lp), mx.bool_)], axis=2)
        bottom = mx.concatenate([mx.ones((B, Lp, V), mx.bool_), m1], axis=2)
        m1 = mx.concatenate([top, bottom], axis=1)
    if P:
        m1 = mx.concatenate([mx.ones((B, V + Lp, P), mx.bool_), m1], axis=2)
    caches = [_ScoringCache(m1[:, None], None if prefix is None else prefix[i], P)
              for i in range(n_layers)]
    if embeddings is not None:
        logits1 = model(inputs, cache=caches, input_embeddings=embeddings)
    else:
        logits1 = model(inputs, cache=caches)
    last = mx.take_along_axis(logits1, (V + plen - 1)[:, None, None], axis=1)[:, 0]  # (B, vocab)
    first_tok = batch.label_tokens[:, 0]
    scores = _log_softmax(last)[:, first_tok]  # (B, C): log p(label_c[0] | prompt)
    if Lm == 1:
        return scores

    # ---- pass 2: label continuations, B*C sequences over pass 1's keys/values ----------------
    S1 = P + V + Lp
    inp = mx.broadcast_to(batch.label_tokens[None, :, :-1], (B, C, Lm - 1)).reshape(B * C, Lm - 1)
    key_valid = mx.concatenate([mx.ones((B, P + V), mx.bool_), valid], axis=1)  # (B, S1)
    key_valid = mx.repeat(key_valid, C, axis=0)[:, None, :]  # (B*C, 1, S1)
    causal2 = mx.tril(mx.ones((Lm - 1, Lm - 1), mx.bool_))
    m2 = mx.concatenate([mx.broadcast_to(key_valid, (B * C, Lm - 1, S1)),
                         mx.broadcast_to(causal2[None], (B * C, Lm - 1, Lm - 1))], axis=2)
    offset2 = mx.repeat(P + V + plen, C)  # (B*C,) per-sequence RoPE offsets
    caches2 = [_ScoringCache(m2[:, None], tuple(mx.repeat(t, C, axis=0) for t in c.kv), offset2)
               for c in caches]
    logits2 = model(inp, cache=caches2)  # (B*C, Lm-1, vocab)
    targets = mx.broadcast_to(batch.label_tokens[None, :, 1:], (B, C, Lm - 1)).reshape(B * C, Lm - 1)
    lp = mx.take_along_axis(_log_softmax(logits2), targets[..., None], axis=-1)[..., 0]
    tmask = mx.arange(1, Lm)[None, :] < batch.label_len[:, None]  # (C, Lm-1)
    rest = (lp.reshape(B, C, Lm - 1) * tmask[None]).sum(axis=-1)
    return scores + rest


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


@dataclass
class AdapterConfig:
    """Base for per-method config dataclasses."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> "AdapterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown option(s) {unknown}; valid: {sorted(names)}", path=source)
        out = cls(**d)
        out.validate()
        return out

    def validate(self) -> None:
        pass


class Adapter:
    """Base class implementing the shared parts of the protocol. Subclasses define:

    ``method``, ``Config``, ``_attach()``, ``init_params(seed)`` and ``logits(params, batch)``
    (or override ``scores``), optionally ``regularizer`` and ``on_step``.
    """

    method: ClassVar[str]
    Config: ClassVar[type[AdapterConfig]]

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

    # --- to implement -----------------------------------------------------------------------
    def _attach(self) -> None:
        raise NotImplementedError

    def init_params(self, seed: int = 0) -> dict:
        raise NotImplementedError

    def scores(self, params: dict, batch: Batch) -> mx.array:
        raise NotImplementedError

    # --- optional hooks ---------------------------------------------------------------------
    def regularizer(self, params: dict) -> mx.array | None:
        return None

    def on_step(self, params: dict, grads: dict, step: int, total_steps: int) -> dict:
        return params

    def loss(self, params: dict, batch: Batch, objective: str = "ce") -> mx.array:
        """Training loss on one batch: classification loss plus the method's regulariser."""
        from metapeft.scoring import classification_loss

        value = classification_loss(self.scores(params, batch), batch, objective=objective)
        reg = self.regularizer(params)
        return value if reg is None else value + reg

    def metric(self, params: dict, batch: Batch) -> mx.array:
        """Query accuracy (the meta-learner's progress metric)."""
        from metapeft.scoring import accuracy

        return accuracy(self.scores(params, batch), batch)

    def scoring_params(self, params: dict) -> dict:
        """Params as used for evaluation (e.g. with AdaLoRA's rank mask applied)."""
        return params

    # --- shared -----------------------------------------------------------------------------
    def num_trainable(self, params: dict) -> int:
        return sum(v.size for _, v in tree_flatten(params))

    def metadata(self, **extra) -> dict[str, str]:
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
        return tree_unflatten(list(flat.items()))

    def check_compatible(self, params: dict, metadata: dict, source: str) -> dict:
        """Refuse an init whose method, base model or shapes differ from this adapter's."""
        method = metadata.get("method")
        if method is not None and method != self.method:
            raise UserError(f"init was trained for method '{method}', not '{self.method}'",
                            path=source, field="method")
        fp = metadata.get("base_model_hash")
        if fp is not None and fp != self.base.fingerprint:
            raise UserError(f"init was trained on base model '{metadata.get('base_model')}' "
                            f"({fp}), not '{self.base.model_id}' ({self.base.fingerprint})",
                            path=source, field="base_model")
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

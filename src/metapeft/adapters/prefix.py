"""Prefix tuning (Li & Liang, 2021): P trainable key/value vectors prepended in every layer.

Every attention layer l attends over ``[K_l^prefix; K_l(x)]`` and ``[V_l^prefix; V_l(x)]``, with
K^prefix, V^prefix of shape (kv_heads, P, head_dim): grouped-query models get one prefix per KV
head (as peft does, using ``num_key_value_heads``). The prompt tokens sit at positions P.. (their
RoPE offset is P, as in peft where ``position_ids`` continue after ``past_key_values``), and the
prefix keys are used as given, never rotated: the same as a pre-filled KV cache. The keys/values
are built fresh from the parameter tree in every forward, tiled to the batch with
``mx.broadcast_to`` and handed to ``score_candidates(prefix=[(k, v) per layer])``; gradients flow to
the tree and the frozen base model is never touched.

Parameterisations (peft's ``PrefixEncoder``):

* ``prefix_projection=False``: the tree *is* the prefix,
  ``{"keys": (L, kv_heads, P, head_dim), "values": (L, kv_heads, P, head_dim)}``.
* ``prefix_projection=True``: ``{"embedding": (P, D), "transform": {"fc1": {weight (H, D), bias},
  "fc2": {weight (L*2*kv_heads*head_dim, H), bias}}}`` and
  ``kv = fc2(tanh(fc1(embedding)))`` reshaped (P, L, 2, kv_heads, head_dim), layer-major with the
  key before the value, the layout of peft's ``past_key_values.view(...).permute(...).split(2)``.
  Init as PyTorch/peft: embedding N(0, 1), Linear U(+-1/sqrt(fan_in)) for weight and bias.

Initialisation without projection (``init``):

* ``random`` (default): per layer, keys ~ N(0, s_k(l)^2) and values ~ N(0, s_v(l)^2), where s_k(l),
  s_v(l) are the std of the real (post-RoPE) keys/values of layer l on a short probe text. peft
  uses N(0, 1) (``nn.Embedding``), which is off-scale for most models; matching the statistics of
  real keys/values keeps the first steps' attention in-distribution.
* ``text``: the real keys/values that the frozen model computes for ``init_text`` (tokenised
  without special tokens, truncated or repeated to P, at positions 0..P-1): Li & Liang's
  "initialise with activations of real words", which they found markedly better with little data.

There is no exact no-op initialisation: any prefix adds P keys to every softmax and takes
probability mass from the real tokens. Zero keys and values (peft's ``init_weights="zero"``) still
dilute attention (each zero key gets logit 0); only keys -> -inf would be a no-op, which is not a
trainable point. A fresh prefix-tuned model therefore scores differently from the base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from metapeft.adapters.base import Adapter, AdapterConfig
from metapeft.adapters.prompt import DEFAULT_INIT_TEXT, text_token_ids
from metapeft.errors import UserError
from metapeft.scoring import Batch, score_candidates

PREFIX_INITS = ("random", "text")


def linear_init(key: mx.array, fan_out: int, fan_in: int) -> dict:
    """PyTorch's nn.Linear default (kept by peft): weight and bias U(-1/sqrt(fan_in), +)."""
    kw, kb = mx.random.split(key)
    bound = 1.0 / math.sqrt(fan_in)
    return {"weight": mx.random.uniform(-bound, bound, (fan_out, fan_in), key=kw),
            "bias": mx.random.uniform(-bound, bound, (fan_out,), key=kb)}


def linear(p: dict, x: mx.array) -> mx.array:
    return mx.addmm(p["bias"], x, p["weight"].T)


@dataclass
class PrefixTuningConfig(AdapterConfig):
    num_virtual_tokens: int = 8
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None  # projection MLP width; None = the model's hidden size
    init: str = "random"  # random | text (without projection only)
    init_text: str | None = None  # for init="text"; default DEFAULT_INIT_TEXT

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise UserError(f"num_virtual_tokens must be an integer >= 1, got "
                            f"{self.num_virtual_tokens!r}", field="num_virtual_tokens")
        if not isinstance(self.prefix_projection, bool):
            raise UserError("prefix_projection must be true or false", field="prefix_projection")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise UserError(f"encoder_hidden_size must be an integer >= 1, got "
                            f"{self.encoder_hidden_size!r}", field="encoder_hidden_size")
        if self.init not in PREFIX_INITS:
            raise UserError(f"init must be one of {', '.join(PREFIX_INITS)}, got {self.init!r}",
                            field="init")
        if self.init == "text" and self.prefix_projection:
            raise UserError("init='text' sets the prefix keys/values directly and needs "
                            "prefix_projection=false", field="init")
        if self.init_text is not None and (not isinstance(self.init_text, str)
                                           or not self.init_text.strip()):
            raise UserError("init_text must be a non-empty string", field="init_text")

    @classmethod
    def repair(cls, options: dict) -> dict:
        """A text init sets the keys/values directly, which a projection cannot: fall back to a
        random init when both are drawn."""
        if options.get("prefix_projection") and options.get("init") == "text":
            options["init"] = "random"
        return options


class PrefixTuning(Adapter):
    method = "prefix"
    Config = PrefixTuningConfig
    default_lr = 1e-2
    structural = ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size")

    def _attach(self) -> None:
        b, cfg = self.base, self.config
        self.num_virtual_tokens = cfg.num_virtual_tokens
        self.num_layers = b.num_layers
        self.kv_heads = b.num_kv_heads
        self.head_dim = b.head_dim
        self.dim = b.hidden_size
        self.encoder_hidden_size = cfg.encoder_hidden_size or self.dim
        attn = b.model.layers[0].self_attn
        if getattr(attn, "n_kv_heads", self.kv_heads) != self.kv_heads:
            raise UserError(f"model config says {self.kv_heads} KV heads, attention layers have "
                            f"{attn.n_kv_heads}", field="model")
        if cfg.init == "text":
            text_token_ids(b, cfg.init_text or DEFAULT_INIT_TEXT, 1)
        self._kv_std: list[tuple[float, float]] | None = None

    # --- real keys/values of the frozen model ---------------------------------------------------
    def real_kv(self, ids: list[int]) -> list[tuple[mx.array, mx.array]]:
        """Post-RoPE keys/values (kv_heads, len(ids), head_dim) of every layer for ``ids`` run as
        one sequence from position 0, read from mlx-lm's own KV cache."""
        from mlx_lm.models.cache import KVCache

        caches = [KVCache() for _ in range(self.num_layers)]
        self.base.model(mx.array(ids)[None], cache=caches)
        n = len(ids)
        out = [(c.keys[0, :, :n].astype(mx.float32), c.values[0, :, :n].astype(mx.float32))
               for c in caches]
        mx.eval(out)
        return out

    def kv_std(self) -> list[tuple[float, float]]:
        """Per-layer std of real keys and values on a probe text (BOS + the default init text)."""
        if self._kv_std is None:
            tok = self.base.tokenizer
            ids = list(tok.encode(self.config.init_text or DEFAULT_INIT_TEXT))
            ids = (ids * -(-16 // len(ids)))[:max(16, len(ids))]
            self._kv_std = [(float(mx.std(k).item()), float(mx.std(v).item()))
                            for k, v in self.real_kv(ids)]
        return self._kv_std

    # --- protocol -------------------------------------------------------------------------------
    def init_params(self, seed: int = 0) -> dict:
        cfg = self.config
        P, L, H, hd, D = (self.num_virtual_tokens, self.num_layers, self.kv_heads, self.head_dim,
                          self.dim)
        key = mx.random.key(seed)
        if cfg.prefix_projection:
            ke, k1, k2 = mx.random.split(key, 3)
            E = self.encoder_hidden_size
            params = {"embedding": mx.random.normal((P, D), key=ke),
                      "transform": {"fc1": linear_init(k1, E, D),
                                    "fc2": linear_init(k2, L * 2 * H * hd, E)}}
        elif cfg.init == "text":
            kv = self.real_kv(text_token_ids(self.base, cfg.init_text or DEFAULT_INIT_TEXT, P))
            params = {"keys": mx.stack([k for k, _ in kv]), "values": mx.stack([v for _, v in kv])}
        else:
            std = mx.array(self.kv_std(), mx.float32)  # (L, 2)
            kk, kv_ = mx.random.split(key)
            params = {"keys": mx.random.normal((L, H, P, hd), key=kk) * std[:, 0, None, None, None],
                      "values": mx.random.normal((L, H, P, hd), key=kv_) * std[:, 1, None, None, None]}
        mx.eval(params)
        return params

    def prefix_kv(self, params: dict) -> tuple[mx.array, mx.array]:
        """The (L, kv_heads, P, head_dim) keys and values that ``params`` stand for."""
        if "keys" in params:
            return params["keys"], params["values"]
        t = params["transform"]
        out = linear(t["fc2"], mx.tanh(linear(t["fc1"], params["embedding"])))  # (P, L*2*H*hd)
        out = out.reshape(self.num_virtual_tokens, self.num_layers, 2, self.kv_heads, self.head_dim)
        out = out.transpose(1, 2, 3, 0, 4)  # (L, 2, H, P, hd)
        return out[:, 0], out[:, 1]

    def scores(self, params: dict, batch: Batch) -> mx.array:
        keys, values = self.prefix_kv(params)
        shape = (batch.prompt.shape[0],) + tuple(keys.shape[1:])
        prefix = [(mx.broadcast_to(keys[l][None], shape), mx.broadcast_to(values[l][None], shape))
                  for l in range(self.num_layers)]
        return score_candidates(self.base.model, batch, prefix=prefix)

"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): virtual tokens produced by a prompt encoder.

A trainable table e (V, D) goes through a small reparameterisation network and the result
(V, D) is used like prompt tuning's soft prompt: ``score_candidates(model, batch,
virtual=broadcast(encoder(e), (B, V, D)))``. The encoders are peft's ``PromptEncoder``:

* ``mlp``:  Linear(D, H) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, D)  (always 3 layers, as peft)
* ``lstm``: a bidirectional ``encoder_num_layers``-layer LSTM (hidden H per direction; layer k>0
  reads the 2H concatenation of layer k-1's two directions), then Linear(2H, 2H) -> ReLU ->
  Linear(2H, D).

Everything is a pure function of the parameter tree (no module state), so ``mx.grad``, ``mx.vmap``
and ``mx.compile`` see through it. The LSTM cell is mlx.nn.LSTM's (gates i, f, g, o, a single bias;
PyTorch's two biases b_ih + b_hh are one bias in effect); mlx's LSTM is unidirectional, so the
backward direction runs a second LSTM on the reversed sequence and reverses its output back.
Dropout between LSTM layers (peft's ``encoder_dropout``, default 0) is not implemented.

Init as PyTorch/peft: table N(0, 1) (``nn.Embedding``), Linear weight and bias U(+-1/sqrt(fan_in)),
LSTM weights and bias U(+-1/sqrt(H)). H = ``encoder_hidden_size`` (default: the model's hidden size,
as peft). Like prompt tuning, a fresh adapter is not a no-op (virtual tokens change the context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from metapeft.adapters.base import Adapter, AdapterConfig
from metapeft.adapters.prefix import linear, linear_init
from metapeft.adapters.prompt import tile_virtual
from metapeft.errors import UserError
from metapeft.scoring import Batch, score_candidates

ENCODER_TYPES = ("mlp", "lstm")


def lstm_init(key: mx.array, input_size: int, hidden: int) -> dict:
    """mlx.nn.LSTM's layout and init: Wx (4H, in), Wh (4H, H), bias (4H,), all U(+-1/sqrt(H))."""
    k1, k2, k3 = mx.random.split(key, 3)
    s = 1.0 / math.sqrt(hidden)
    return {"Wx": mx.random.uniform(-s, s, (4 * hidden, input_size), key=k1),
            "Wh": mx.random.uniform(-s, s, (4 * hidden, hidden), key=k2),
            "bias": mx.random.uniform(-s, s, (4 * hidden,), key=k3)}


def lstm(p: dict, x: mx.array) -> mx.array:
    """Hidden states (L, H) of one LSTM direction over x (L, in), from zero state; the same
    recurrence as ``mlx.nn.LSTM.__call__``."""
    xw = mx.addmm(p["bias"], x, p["Wx"].T)
    h = c = None
    out = []
    for t in range(x.shape[-2]):
        ifgo = xw[..., t, :]
        if h is not None:
            ifgo = ifgo + h @ p["Wh"].T
        i, f, g, o = mx.split(ifgo, 4, axis=-1)
        i, f, g, o = mx.sigmoid(i), mx.sigmoid(f), mx.tanh(g), mx.sigmoid(o)
        c = i * g if c is None else f * c + i * g
        h = o * mx.tanh(c)
        out.append(h)
    return mx.stack(out, axis=-2)


def bilstm(layers: list[dict], x: mx.array) -> mx.array:
    """Stacked bidirectional LSTM, (L, in) -> (L, 2H) (forward then backward features)."""
    for layer in layers:
        fwd = lstm(layer["fwd"], x)
        bwd = lstm(layer["bwd"], x[::-1])[::-1]
        x = mx.concatenate([fwd, bwd], axis=-1)
    return x


@dataclass
class PTuningConfig(AdapterConfig):
    num_virtual_tokens: int = 8
    encoder_type: str = "mlp"  # mlp | lstm
    encoder_hidden_size: int | None = None  # None = the model's hidden size (peft's default)
    encoder_num_layers: int = 2  # LSTM layers (the MLP always has 3 Linear layers, as peft)

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise UserError(f"num_virtual_tokens must be an integer >= 1, got "
                            f"{self.num_virtual_tokens!r}", field="num_virtual_tokens")
        if self.encoder_type not in ENCODER_TYPES:
            raise UserError(f"encoder_type must be one of {', '.join(ENCODER_TYPES)}, got "
                            f"{self.encoder_type!r}", field="encoder_type")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise UserError(f"encoder_hidden_size must be an integer >= 1, got "
                            f"{self.encoder_hidden_size!r}", field="encoder_hidden_size")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise UserError(f"encoder_num_layers must be an integer >= 1, got "
                            f"{self.encoder_num_layers!r}", field="encoder_num_layers")


class PTuning(Adapter):
    method = "ptuning"
    Config = PTuningConfig
    default_lr = 3e-3
    structural = ("num_virtual_tokens", "encoder_type", "encoder_hidden_size",
                  "encoder_num_layers")

    def _attach(self) -> None:
        self.num_virtual_tokens = self.config.num_virtual_tokens
        self.dim = self.base.hidden_size
        self.hidden = self.config.encoder_hidden_size or self.dim

    def init_params(self, seed: int = 0) -> dict:
        cfg, V, D, H = self.config, self.num_virtual_tokens, self.dim, self.hidden
        keys = mx.random.split(mx.random.key(seed), 4 + 2 * cfg.encoder_num_layers)
        params = {"embedding": mx.random.normal((V, D), key=keys[0])}
        if cfg.encoder_type == "mlp":
            params["mlp_head"] = {"fc1": linear_init(keys[1], H, D),
                                  "fc2": linear_init(keys[2], H, H),
                                  "fc3": linear_init(keys[3], D, H)}
        else:
            params["lstm_head"] = [
                {"fwd": lstm_init(keys[4 + 2 * i], D if i == 0 else 2 * H, H),
                 "bwd": lstm_init(keys[5 + 2 * i], D if i == 0 else 2 * H, H)}
                for i in range(cfg.encoder_num_layers)]
            params["mlp_head"] = {"fc1": linear_init(keys[1], 2 * H, 2 * H),
                                  "fc2": linear_init(keys[2], D, 2 * H)}
        mx.eval(params)
        return params

    def virtual_tokens(self, params: dict) -> mx.array:
        """The (V, D) virtual token embeddings: the prompt encoder applied to the table."""
        x, mlp = params["embedding"], params["mlp_head"]
        if "lstm_head" in params:
            x = bilstm(params["lstm_head"], x)
            return linear(mlp["fc2"], mx.maximum(linear(mlp["fc1"], x), 0))
        x = mx.maximum(linear(mlp["fc1"], x), 0)
        x = mx.maximum(linear(mlp["fc2"], x), 0)
        return linear(mlp["fc3"], x)

    def scores(self, params: dict, batch: Batch) -> mx.array:
        return score_candidates(self.base.model, batch,
                                virtual=tile_virtual(self.virtual_tokens(params), batch))

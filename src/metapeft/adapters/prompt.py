"""Prompt tuning (Lester et al., 2021): V trainable "soft token" embeddings before every prompt.

The trainable tree is ``{"prompt": (V, D)}``. The model sees ``[prompt_1..prompt_V; BOS; prompt
tokens; label tokens]`` as one causal sequence (positions 0..V-1 are the virtual tokens, exactly
as in HF peft, which concatenates the prompt embeddings before ``inputs_embeds``); the forward is
``score_candidates(model, batch, virtual=broadcast(prompt, (B, V, D)))``. The frozen base model is
used as is and never mutated, so any number of prompt-tuning adapters can share it.

Initialisation (``init``), following peft's ``PromptTuningInit``:

* ``random``: N(0, s^2) with s the standard deviation of the base model's input embedding matrix
  (peft uses ``nn.Embedding``'s N(0, 1), which is far off-scale for real models whose embeddings
  have s ~ 0.02; matching s keeps the virtual tokens in-distribution).
* ``text``: the embeddings of ``init_text`` tokenised *without* special tokens (the real prompt
  already starts with BOS), truncated, or repeated then truncated, to V tokens (peft's TEXT).
* ``vocab``: the embeddings of V token ids drawn uniformly from the vocabulary with the seed
  (peft's RANDOM_DISCRETE).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from metapeft.adapters.base import Adapter, AdapterConfig
from metapeft.errors import UserError
from metapeft.models import BaseModel
from metapeft.scoring import Batch, score_candidates

PROMPT_INITS = ("random", "text", "vocab")
DEFAULT_INIT_TEXT = "Classify the input text"


def vocab_size(base: BaseModel) -> int:
    return int(base.model.model.embed_tokens.weight.shape[0])


def embedding_std(base: BaseModel, max_rows: int = 8192) -> float:
    """Std of the input embedding matrix, from at most ``max_rows`` evenly spaced rows (the table
    may be quantised, and dequantising a 150k-row table just for a statistic is wasteful)."""
    n = vocab_size(base)
    ids = mx.arange(n) if n <= max_rows else (mx.arange(max_rows) * n) // max_rows
    return float(mx.std(base.embed(ids).astype(mx.float32)).item())


def text_token_ids(base: BaseModel, text: str, n: int, *, field: str = "init_text") -> list[int]:
    """``text`` tokenised without special tokens, truncated or repeated to exactly ``n`` ids."""
    ids = list(base.tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise UserError(f"init text {text!r} tokenises to nothing", field=field)
    reps = -(-n // len(ids))
    return (ids * reps)[:n]


def tile_virtual(virtual: mx.array, batch: Batch) -> mx.array:
    """(V, D) -> (B, V, D) without copying."""
    B = batch.prompt.shape[0]
    return mx.broadcast_to(virtual[None], (B,) + tuple(virtual.shape))


@dataclass
class PromptTuningConfig(AdapterConfig):
    num_virtual_tokens: int = 8
    init: str = "random"  # random | text | vocab
    init_text: str | None = None  # for init="text"; default DEFAULT_INIT_TEXT

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise UserError(f"num_virtual_tokens must be an integer >= 1, got "
                            f"{self.num_virtual_tokens!r}", field="num_virtual_tokens")
        if self.init not in PROMPT_INITS:
            raise UserError(f"init must be one of {', '.join(PROMPT_INITS)}, got {self.init!r}",
                            field="init")
        if self.init_text is not None and (not isinstance(self.init_text, str)
                                           or not self.init_text.strip()):
            raise UserError("init_text must be a non-empty string", field="init_text")


class PromptTuning(Adapter):
    method = "prompt"
    Config = PromptTuningConfig
    default_lr = 3e-2
    structural = ("num_virtual_tokens",)

    def _attach(self) -> None:
        self.num_virtual_tokens = self.config.num_virtual_tokens
        self.dim = self.base.hidden_size
        if self.config.init == "text":  # fail at attach time on an unusable text
            text_token_ids(self.base, self.config.init_text or DEFAULT_INIT_TEXT, 1)

    def init_params(self, seed: int = 0) -> dict:
        cfg, V, D = self.config, self.num_virtual_tokens, self.dim
        key = mx.random.key(seed)
        if cfg.init == "random":
            prompt = mx.random.normal((V, D), key=key) * embedding_std(self.base)
        else:
            if cfg.init == "text":
                ids = mx.array(text_token_ids(self.base, cfg.init_text or DEFAULT_INIT_TEXT, V))
            else:  # vocab
                ids = mx.random.randint(0, vocab_size(self.base), (V,), key=key)
            prompt = self.base.embed(ids)
        prompt = prompt.astype(mx.float32)
        mx.eval(prompt)
        return {"prompt": prompt}

    def scores(self, params: dict, batch: Batch) -> mx.array:
        return score_candidates(self.base.model, batch, virtual=tile_virtual(params["prompt"], batch))

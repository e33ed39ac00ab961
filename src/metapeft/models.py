"""Load a base model frozen, from any path or id that ``mlx_lm.load`` accepts.

``tiny`` (the default) is the embedded llama the project builds offline (see ``tiny_model.py``).
mlx_lm (and through it transformers) is imported lazily: it costs ~2.5 s.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metapeft.errors import UserError

DEFAULT_MODEL = "tiny"
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class BaseModel:
    """A frozen mlx-lm model with its tokenizer and a stable identity for artifact metadata."""

    model: Any
    tokenizer: Any
    model_id: str  # what the user passed, resolved ("tiny", a path, or a hub id)
    path: str  # local directory holding config.json and weights
    fingerprint: str  # sha256 over config + weight file sizes/edges: detects a different model
    config: dict
    dequantized: bool = False  # a quantized checkpoint dequantised in memory at load
    requested: str = "any"  # the --dequantize mode it was loaded for ("any": not quantized)

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.config["num_attention_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim")
                   or self.config["hidden_size"] // self.config["num_attention_heads"])

    @property
    def num_parameters(self) -> int:
        """The model's parameter count as trained: a quantized weight counts its unpacked
        entries (32 / bits per uint32), and its quantization scales and biases do not count."""
        import mlx.core as mx
        from mlx.utils import tree_flatten

        bits = int((self.config.get("quantization") or {}).get("bits") or 0)
        total = 0
        for name, value in tree_flatten(self.model.parameters()):
            if bits and value.dtype == mx.uint32:
                total += value.size * 32 // bits
            elif not (bits and name.endswith((".scales", ".biases"))):
                total += value.size
        return total

    def embed(self, tokens):
        """Token embeddings from the frozen input table (dequantised if needed)."""
        return self.model.model.embed_tokens(tokens)


def fingerprint_dir(path: Path) -> str:
    """A cheap identity: config.json plus each weight file's name, size and first/last MiB."""
    h = hashlib.sha256()
    cfg = path / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > (1 << 21):
                fh.seek(-(1 << 20), 2)
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def resolve_model_path(model: str) -> tuple[str, Path | None]:
    """Map a model argument to (model_id, local path or None for a hub id)."""
    if model in ("tiny", "", None):
        from metapeft.tiny_model import ensure_tiny_model

        return "tiny", ensure_tiny_model()
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise UserError("not an mlx-lm model directory (no config.json)", path=str(p))
        return str(p.resolve()), p.resolve()
    if _HF_ID.match(model) and not model.startswith((".", "/", "~")):
        return model, None
    raise UserError("model path does not exist", path=model, field="model")


_CACHE: dict[tuple[str, bool], BaseModel] = {}
DEQUANTIZE = ("auto", "always", "never")


def should_dequantize(mode: str, quantized: bool) -> bool:
    """``auto`` dequantises a quantized model on the CPU, where MLX's quantized matmul has no fast
    kernel (a 4-bit SmolLM2-135M step was several times slower than float32), and keeps it on
    Metal, where training over quantized weights is QLoRA as in mlx-lm."""
    if mode not in DEQUANTIZE:
        raise UserError(f"--dequantize must be one of {', '.join(DEQUANTIZE)}, got {mode!r}",
                        field="dequantize")
    if not quantized or mode == "never":
        return False
    if mode == "always":
        return True
    import mlx.core as mx

    return not mx.metal.is_available()


def _to_float32(model) -> None:
    """Cast floating weights to float32 in place (dequantised weights keep the scales' dtype)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda a: a.astype(mx.float32)
                          if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))


def load_base_model(model: str = DEFAULT_MODEL, *, cache: bool = True,
                    dequantize: str = "auto") -> BaseModel:
    """Load and freeze a model. Loaded models are cached per process (they are never mutated:
    adapters attach to copies of the module tree, see ``adapters.base``). A quantized checkpoint
    is dequantised to float32 in memory per ``dequantize`` (see ``should_dequantize``); its
    ``model_id`` and ``fingerprint`` still name the checkpoint on disk."""
    model_id, path = resolve_model_path(model)
    if dequantize not in DEQUANTIZE:
        should_dequantize(dequantize, False)  # raises the one-line error
    if cache:
        for (mid, _), bm in _CACHE.items():
            if mid == model_id and bm.requested in (dequantize, "any"):
                return bm
    from mlx_lm import load  # lazy: pulls in transformers

    try:
        if path is None:
            from mlx_lm.utils import hf_repo_to_path

            path = Path(hf_repo_to_path(model_id))
        m, tok = load(str(path))
    except UserError:
        raise
    except Exception as e:  # surface loader failures as one line
        raise UserError(f"could not load model: {type(e).__name__}: {e}", path=str(path or model_id),
                        field="model") from None
    config = json.loads((Path(path) / "config.json").read_text())
    quantized = "quantization" in config
    dequantized = should_dequantize(dequantize, quantized)
    if dequantized:
        import sys
        import time

        from mlx_lm.utils import dequantize_model

        t0 = time.perf_counter()
        m = dequantize_model(m)
        _to_float32(m)
        print(f"note: dequantised {model_id} to float32 in memory ({time.perf_counter() - t0:.0f} "
              f"s; MLX has no fast quantized matmul on the CPU; --dequantize never keeps it)",
              file=sys.stderr)
    m.freeze()
    m.eval()
    bm = BaseModel(model=m, tokenizer=tok, model_id=model_id, path=str(path),
                   fingerprint=fingerprint_dir(Path(path)), config=config,
                   dequantized=dequantized, requested=dequantize if quantized else "any")
    if cache:
        _CACHE[(model_id, dequantized)] = bm
    return bm

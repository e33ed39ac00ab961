"""The embedded default base model: a tiny llama that metapeft builds itself, offline.

Nothing is downloaded. The model is an mlx-lm ``llama`` (hidden 64, 2 layers, 4 heads with 2 KV
heads, so grouped-query attention is exercised, tied embeddings) with deterministic numpy weights,
and a word-level tokenizer whose vocabulary is the synthetic generator's world plus the prompt
template's words. It is written once, atomically (temp dir + rename), to the user cache dir:
``$METAPEFT_CACHE`` or ``$XDG_CACHE_HOME/metapeft`` or ``~/.cache/metapeft``.

The weights are random (std 0.02), not pretrained: the tiny model exists so that every command and
test runs end to end in seconds with no network. Real-model results use ``--model PATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

NAME = "tiny-llama-v1"
CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
INIT_GAIN = float(os.environ.get("TG", 1.0))
EMBED_STD = float(os.environ.get("TE", 1.0))
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
# Words of the default prompt template and common punctuation, so prompts never hit <unk>.
EXTRA_WORDS = ["input", "label", "text", "answer", ":", ".", ",", "?", "!", "'", "-", "the", "a",
               "is", "it", "this", "that", "and", "or", "of", "to", "in", "for", "on", "with"]


def cache_dir() -> Path:
    if os.environ.get("METAPEFT_CACHE"):
        return Path(os.environ["METAPEFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metapeft"


def _vocab() -> list[str]:
    from metapeft.data.synthetic import vocabulary

    words = list(SPECIALS)
    seen = set(words)
    for w in EXTRA_WORDS + vocabulary():
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _weights(vocab_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261122)
    c = CONFIG
    d, inter = c["hidden_size"], c["intermediate_size"]
    hd = d // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd

    def w(*shape):  # (out, in), scaled so activations keep unit size through the blocks
        return (rng.standard_normal(shape) * INIT_GAIN / np.sqrt(shape[1])).astype(np.float32)

    # Unit-scale embeddings: with tied embeddings they are also the output layer, and 0.02-scale
    # rows would make every logit ~0 and the candidates' gradients vanish.
    emb = rng.standard_normal((vocab_size, d)).astype(np.float32) * EMBED_STD
    out = {"model.embed_tokens.weight": emb, "model.norm.weight": np.ones(d, np.float32)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(kv, d),
            p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, d),
            p + "mlp.gate_proj.weight": w(inter, d), p + "mlp.up_proj.weight": w(inter, d),
            p + "mlp.down_proj.weight": w(d, inter),
            p + "input_layernorm.weight": np.ones(d, np.float32),
            p + "post_attention_layernorm.weight": np.ones(d, np.float32),
        })
    return out


def _tokenizer_json(vocab: list[str]) -> dict:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return json.loads(tok.to_str())


def _write(dest: Path) -> None:
    from safetensors.numpy import save_file

    vocab = _vocab()
    config = dict(CONFIG, vocab_size=len(vocab))
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_weights(len(vocab)), str(dest / "model.safetensors"), metadata={"format": "mlx"})
    (dest / "tokenizer.json").write_text(json.dumps(_tokenizer_json(vocab)))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True,
        "model_max_length": 512, "clean_up_tokenization_spaces": False,
    }, indent=2))
    (dest / "README.md").write_text(
        "metapeft's embedded tiny llama: random deterministic weights, word-level tokenizer.\n")


def ensure_tiny_model(root: Path | None = None) -> Path:
    """Path of the tiny model, building it on first use (atomic: temp dir, then rename)."""
    root = Path(root) if root is not None else cache_dir()
    dest = root / NAME
    if (dest / "model.safetensors").exists() and (dest / "tokenizer.json").exists():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=root))
    try:
        _write(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race, or a stale partial dir is in the way
            if not (dest / "model.safetensors").exists():
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest

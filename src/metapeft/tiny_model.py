"""The embedded default base model: a tiny llama that metapeft builds itself, offline.

Nothing is downloaded. The model is an mlx-lm ``llama`` (hidden 64, 2 layers, 4 heads with 2 KV
heads, so grouped-query attention is exercised, tied embeddings) with deterministic numpy weights,
and a word-level tokenizer whose vocabulary is the synthetic generator's world plus the prompt
template's words. It is written once, atomically (temp dir + rename), to the user cache dir:
``$METAPEFT_CACHE`` or ``$XDG_CACHE_HOME/metapeft`` or ``~/.cache/metapeft``.

The weights start random and are then pretrained at build time (``_pretrain``, ~25 s on two CPU
cores, deterministic): a short causal-LM run on plain synthetic sentences, including keyword-dense
sentences that name their topic, so that few-shot adaptation generalises beyond the support set.
The tiny model exists so that every command and test runs end to end with no network; real-model
results use ``--model PATH``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

# The cache key includes a hash of this file, so any change to the recipe (config, corpus,
# pretraining) rebuilds the model instead of silently reusing a stale cache.
_RECIPE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]
NAME = f"tiny-llama-v2-{_RECIPE}"
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
INIT_GAIN = 1.0
EMBED_STD = 0.1  # small start for the build-time pretraining (unit scale trained worse)
# Build-time pretraining (see ``_pretrain``): a short causal-LM run on plain synthetic sentences.
PRETRAIN_SEED = 20261123
PRETRAIN_STEPS = 700
PRETRAIN_MAX_LEN = 16  # tokens, BOS and EOS included
PRETRAIN_BATCH = 16
PRETRAIN_LR = 2e-3
PRETRAIN_PER_LABEL = 30  # generate_pool rows per label and family
PRETRAIN_DENSE = 60  # keyword-dense sentences per topic
PRETRAIN_TOPIC_NAMES = 2  # 0: never name the topic, 1: name first, 2: also name last
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

    # Tied embeddings are also the output layer; _pretrain grows them from this scale.
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


def _corpus() -> list[str]:
    """Deterministic plain-text pretraining corpus: synthetic sentences of every family, never
    in the "Input: ... Label: ..." prompt format (that would make the tasks zero-shot solved)."""
    import random

    from metapeft.data.synthetic import FAMILIES, FILLER, TOPICS, generate_pool

    texts = [e.text for fam in FAMILIES for e in generate_pool(fam, 1000, PRETRAIN_PER_LABEL)]
    rng = random.Random(f"pretrain:{PRETRAIN_SEED}")
    heads = (("we", "talked", "about"), ("this", "is", "about"), ("a", "note", "on"), ("some",))
    tails = (("so", "it", "was", "about"), ("-", "about"), ("that", "is"), (".",))
    for topic in sorted(TOPICS):
        # keyword-dense sentences, sometimes naming their topic (real LMs know which words go
        # with a topic's name); never in the "Label:" prompt format
        name = topic.replace("_", " ").split()
        for _ in range(PRETRAIN_DENSE):
            words = [w for c in rng.sample(TOPICS[topic], rng.randint(3, 6)) for w in c.split("_")]
            words += [rng.choice(FILLER) for _ in range(rng.randint(0, 3))]
            rng.shuffle(words)
            r = rng.random()
            if PRETRAIN_TOPIC_NAMES >= 1 and r < 0.3:
                words = [*rng.choice(heads), *name, ":", *words]
            elif PRETRAIN_TOPIC_NAMES >= 2 and r < 0.6:
                words = [*words, *rng.choice(tails), *name]
            texts.append(" ".join(words))
    random.Random(PRETRAIN_SEED).shuffle(texts)
    return texts


def _pretrain(path: Path, weights: dict[str, np.ndarray], log=None) -> dict[str, np.ndarray]:
    """Train every weight of the freshly written random model at ``path`` for a few hundred Adam
    steps of next-token prediction on ``_corpus()``, so that its features know which words go
    together (what makes few-shot adaptation generalise). Deterministic; ~15 s on two CPU cores."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, tokenizer = load(str(path))
    eos = tokenizer.eos_token_id
    # Sequences cut to PRETRAIN_MAX_LEN tokens and padded to a few fixed widths: CPU attention
    # grows with length, and mx.compile retraces for every new shape.
    seqs = [(list(tokenizer.encode(t)) + [eos])[:PRETRAIN_MAX_LEN] for t in _corpus()]
    seqs.sort(key=len)  # batches of similar length waste little padding
    batches = []
    for s in range(0, len(seqs) - PRETRAIN_BATCH + 1, PRETRAIN_BATCH):
        chunk = seqs[s:s + PRETRAIN_BATCH]
        width = -(-max(len(q) for q in chunk) // 8) * 8
        ids = np.zeros((len(chunk), width), np.int32)
        mask = np.zeros((len(chunk), width - 1), np.float32)
        for r, q in enumerate(chunk):
            ids[r, :len(q)] = q
            mask[r, :len(q) - 1] = 1.0
        batches.append((mx.array(ids), mx.array(mask)))
    order = np.random.default_rng(PRETRAIN_SEED).permutation(
        np.resize(np.arange(len(batches)), PRETRAIN_STEPS))

    def loss_fn(model, ids, mask):
        logits = model(ids[:, :-1])
        ce = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="none")
        return (ce * mask).sum() / mask.sum()

    opt = optim.Adam(learning_rate=optim.cosine_decay(PRETRAIN_LR, PRETRAIN_STEPS,
                                                      PRETRAIN_LR * 0.1))
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(ids, mask):
        loss, grads = value_and_grad(model, ids, mask)
        opt.update(model, grads)
        return loss

    for i, b in enumerate(order):
        loss = step(*batches[b])
        mx.eval(loss, state)
        if log is not None:
            log(i, loss.item())
    trained = dict(tree_flatten(model.parameters()))
    return {k: np.array(trained[k].astype(mx.float32)) for k in weights}


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
    weights = _weights(len(vocab))
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "mlx"})
    (dest / "tokenizer.json").write_text(json.dumps(_tokenizer_json(vocab)))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True,
        "model_max_length": 512, "clean_up_tokenization_spaces": False,
    }, indent=2))
    if PRETRAIN_STEPS > 0:  # overwrite the random weights with briefly pretrained ones
        save_file(_pretrain(dest, weights), str(dest / "model.safetensors"),
                  metadata={"format": "mlx"})
    (dest / "README.md").write_text(
        "metapeft's embedded tiny llama: deterministic weights, briefly pretrained (causal LM) on\n"
        "metapeft's synthetic sentences at build time; word-level tokenizer.\n")


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

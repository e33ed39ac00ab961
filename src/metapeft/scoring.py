"""Rank classification: score every candidate label by its summed token log-probability.

Each label is verbalised ("pin_change" -> "pin change") and tokenised once per task. The score of
candidate c for an example is sum_t log p(label_c[t] | prompt, label_c[:t]) (T0 / MetaICL rank
classification), and training minimises the cross-entropy over the candidates' scores, which
trains the decision directly (label-token NLL would also spend capacity on the label text).

Scoring is two passes and exact (``score_candidates``): the prompts run once,
right-padded; their keys and values are then reused as a KV cache by all C label continuations,
which run as short sequences with per-sequence RoPE offsets. This costs about what one packed
"prompt + all labels" sequence would, without shifting the labels' positions. The continuations
run grouped by length (``Batch.label_groups``): one-token labels need no pass 2 at all, and no
position is padded, so the blocks and the vocabulary-wide head run only where a score is read.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from metapeft.data.tasks import Example

DEFAULT_TEMPLATE = "Input: {text}\nLabel:"
MAX_PROMPT_TOKENS = 96


def verbalise(label: str) -> str:
    return label.replace("_", " ").strip()


def _label_groups(label_arr: np.ndarray, label_len: np.ndarray) -> tuple:
    """``Batch.label_groups`` of right-padded label tokens (C, Lm) and their lengths (C,)."""
    groups = []
    for n in sorted({int(m) - 1 for m in label_len if m > 1}):
        cands = np.flatnonzero(label_len == n + 1).astype(np.int32)
        groups.append((mx.array(cands), mx.array(label_arr[cands, :n]),
                       mx.array(label_arr[cands, 1:n + 1])))
    return tuple(groups)


EMPTY = mx.zeros((0,), mx.float32)  # "no trunk states" (a zero-size array keeps Batch a tree)


class Batch(NamedTuple):
    """Encoded examples; a NamedTuple so it passes through mx.compile / mx.vmap as a tree."""

    prompt: mx.array  # (B, Lp) int32, right-padded prompts (BOS + template + text)
    prompt_len: mx.array  # (B,) int32
    label_tokens: mx.array  # (C, Lm) int32, right-padded candidate label tokens
    label_len: mx.array  # (C,) int32
    labels: mx.array  # (B,) int32: index of the gold candidate (-1 if unknown)
    weights: mx.array  # (B,) float32: per-example loss weight (replay, rating)
    # Frozen-trunk states (``trunk_states``), or EMPTY: the prompts' hidden states entering the
    # first trained block (B, Lp, D), and the label continuations' (B*C, Lm-1, D).
    hidden: mx.array = EMPTY
    label_hidden: mx.array = EMPTY
    # The label continuations grouped by length: one (cands (G,), inputs (G, n), targets (G, n))
    # per continuation length n >= 1, every candidate with n + 1 label tokens in the group of n.
    # Labels of 1-5 tokens padded to the longest leave about half of pass 2's positions empty
    # and one-token labels need no pass 2 at all, so pass 2 runs each group unpadded. The
    # groups are shapes, so mx.compile sees a fixed structure per task. () (meta-batches, whose
    # label tokens are re-padded per meta-batch) runs every candidate padded and masks.
    label_groups: tuple = ()
    # Frozen-trunk states of each group's continuations, (B*G, n, D) (``trunk_states``), or ().
    group_hidden: tuple = ()

    @property
    def size(self) -> int:
        return int(self.prompt.shape[0])


class TaskEncoder:
    """Tokenises a task's prompts and candidate labels once, then builds packed batches."""

    def __init__(self, tokenizer, labels: list[str], template: str = DEFAULT_TEMPLATE,
                 max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                 verbalisations: list[str] | None = None):
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.template = template
        self.max_prompt_tokens = max_prompt_tokens
        # the text scored for each label (default ``verbalise(label)``; an adapter directory
        # records the ones it was trained with)
        self.verbalisations = ([verbalise(lab) for lab in self.labels] if verbalisations is None
                               else list(verbalisations))
        if len(self.verbalisations) != len(self.labels):
            raise ValueError(f"{len(self.verbalisations)} verbalisations for "
                             f"{len(self.labels)} labels")
        self.label_tokens = [self._label_tokens(v) for v in self.verbalisations]
        lm = max(len(t) for t in self.label_tokens)
        self._label_arr = np.zeros((len(labels), lm), np.int32)
        for c, t in enumerate(self.label_tokens):
            self._label_arr[c, :len(t)] = t
        self._label_len = np.array([len(t) for t in self.label_tokens], np.int32)
        self._label_groups = _label_groups(self._label_arr, self._label_len)
        self._prompt_cache: dict[str, list[int]] = {}  # text -> ids: each text tokenised once

    def _label_tokens(self, text: str) -> list[int]:
        # Tokenise the label in context (after the template's tail) so that tokenisers which add a
        # word-boundary marker give the same ids they would inside the sequence.
        tail = self.template.split("{text}")[-1] or ":"
        tok = self.tokenizer
        ctx = tok.encode(tail, add_special_tokens=False)
        full = tok.encode(tail + " " + text, add_special_tokens=False)
        ids = full[len(ctx):] if full[:len(ctx)] == ctx else tok.encode(text, add_special_tokens=False)
        if not ids:
            raise ValueError(f"label {text!r} tokenises to nothing")
        return list(ids)

    def prompt_tokens(self, text: str) -> list[int]:
        ids = self._prompt_cache.get(text)
        if ids is None:
            ids = list(self.tokenizer.encode(self.template.format(text=text)))
            if len(ids) > self.max_prompt_tokens:  # keep BOS and the tail that ends in "Label:"
                ids = ids[:1] + ids[-(self.max_prompt_tokens - 1):]
            self._prompt_cache[text] = ids
        return ids

    def encode_buckets(self, examples: list[Example], weights: list[float] | None = None,
                       max_size: int = 32) -> list[Batch]:
        """Sort by prompt length and split into chunks of at most ``max_size``, each padded only to
        its own longest prompt. Attention costs O(L^2) and MLX's CPU softmax is the bottleneck, so
        trimming padding this way cuts a step's time markedly (see benchmarks/adapt_methods.py)."""
        return [self.encode([examples[i] for i in idx],
                            None if weights is None else [weights[i] for i in idx])
                for idx in self.bucket_order(examples, max_size)]

    def bucket_order(self, examples: list[Example], max_size: int = 32) -> list[list[int]]:
        """The indices of ``examples`` in each of ``encode_buckets``' chunks: sorted (stably) by
        prompt length, split into balanced chunks of at most ``max_size``."""
        if not examples:
            return []
        lengths = [len(self.prompt_tokens(e.text)) for e in examples]  # memoised
        order = sorted(range(len(examples)), key=lambda i: lengths[i])
        k = -(-len(order) // max_size)
        size = -(-len(order) // k)  # balanced chunks
        return [order[s:s + size] for s in range(0, len(order), size)]

    def encode(self, examples: list[Example], weights: list[float] | None = None,
               pad_multiple: int = 4) -> Batch:
        prompts = [self.prompt_tokens(e.text) for e in examples]
        lp = max(len(p) for p in prompts)
        lp = -(-lp // pad_multiple) * pad_multiple  # few distinct shapes -> few recompilations
        tokens = np.zeros((len(prompts), lp), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = p
        index = {lab: i for i, lab in enumerate(self.labels)}
        labels = np.array([index.get(e.label, -1) for e in examples], np.int32)
        w = np.ones(len(examples), np.float32) if weights is None else np.asarray(weights, np.float32)
        return Batch(mx.array(tokens), mx.array(np.array([len(p) for p in prompts], np.int32)),
                     mx.array(self._label_arr), mx.array(self._label_len), mx.array(labels),
                     mx.array(w), label_groups=self._label_groups)


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


# Architectures whose mlx-lm Model is ``embed_tokens -> layers[i](h, mask, cache=c) -> norm ->
# head`` (lm_head, or the tied embedding's ``as_linear``). For them scoring runs the blocks itself,
# which lets it start from cached hidden states (the frozen trunk) and apply the vocabulary-wide
# head only where a score is read. Other architectures run through ``model(...)`` unchanged.
BLOCK_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def runs_blocks(model: nn.Module) -> bool:
    """Whether scoring can run ``model`` block by block (see ``BLOCK_MODEL_TYPES``)."""
    args = getattr(model, "args", None)
    return (getattr(args, "model_type", None) in BLOCK_MODEL_TYPES
            and not getattr(args, "sliding_window", None)
            and hasattr(getattr(model, "model", None), "norm"))


def _head(model: nn.Module, h: mx.array) -> mx.array:
    h = model.model.norm(h)
    if hasattr(model, "lm_head"):
        return model.lm_head(h)
    return model.model.embed_tokens.as_linear(h)


def _run(model: nn.Module, h: mx.array, mask: mx.array, caches: list, start: int) -> mx.array:
    """Hidden states after blocks ``start..L-1`` (one cache per block, in that order)."""
    for layer, c in zip(model.model.layers[start:], caches):
        h = layer(h, mask, cache=c)
    return h


def _masks(batch: Batch, V: int, P: int):
    """Pass-1 mask (B, V+Lp, P+V+Lp), the pass-1 keys' validity (B, P+V+Lp) and the
    prompts' end positions (B,), from which every pass-2 mask and RoPE offset is made."""
    prompt, plen = batch.prompt, batch.prompt_len
    B, Lp = prompt.shape
    pos = mx.arange(Lp)
    valid = pos[None, :] < plen[:, None]  # (B, Lp) real prompt tokens
    causal = pos[:, None] >= pos[None, :]
    # mx.logical_and/or, not & and |: under mx.vmap the bitwise operators mis-broadcast an
    # unbatched operand against a batched one (MLX 0.32; see tests/test_meta.py vmap check).
    m1 = mx.logical_or(mx.logical_and(causal[None], valid[:, None, :]),
                       mx.eye(Lp, dtype=mx.bool_)[None])  # pads attend to themselves
    if V:
        top = mx.concatenate([mx.broadcast_to(mx.tril(mx.ones((V, V), mx.bool_)), (B, V, V)),
                              mx.zeros((B, V, Lp), mx.bool_)], axis=2)
        bottom = mx.concatenate([mx.ones((B, Lp, V), mx.bool_), m1], axis=2)
        m1 = mx.concatenate([top, bottom], axis=1)
    if P:
        m1 = mx.concatenate([mx.ones((B, V + Lp, P), mx.bool_), m1], axis=2)
    key_valid = mx.concatenate([mx.ones((B, P + V), mx.bool_), valid], axis=1)  # (B, S1)
    return m1, key_valid, P + V + plen


def _continuation_mask(key_valid: mx.array, G: int, n: int) -> mx.array:
    """Pass-2 mask (B*G, n, S1+n): G continuations of n tokens per example (example-major rows,
    as ``mx.repeat(..., G, axis=0)`` orders them) see the example's real pass-1 keys and their
    own earlier tokens."""
    B, S1 = key_valid.shape
    kv = mx.repeat(key_valid, G, axis=0)[:, None, :]  # (B*G, 1, S1)
    causal = mx.tril(mx.ones((n, n), mx.bool_))
    return mx.concatenate([mx.broadcast_to(kv, (B * G, n, S1)),
                           mx.broadcast_to(causal[None], (B * G, n, n))], axis=2)


def _continuation_caches(caches: list, key_valid: mx.array, ends: mx.array, G: int, n: int):
    """The mask (B*G, 1, n, S1+n) and one ``_ScoringCache`` per block for G continuations of n
    tokens per example on top of pass 1's keys/values (``caches[i].kv``), with per-sequence
    RoPE offsets (each example's prompt end)."""
    m = _continuation_mask(key_valid, G, n)[:, None]
    offsets = mx.repeat(ends, G)
    return m, [_ScoringCache(m, tuple(mx.repeat(t, G, axis=0) for t in c.kv), offsets)
               for c in caches]


def _continuations(batch: Batch) -> list[tuple[mx.array | None, mx.array, mx.array]]:
    """Pass 2's work as (candidates or None, inputs (G, n), targets (G, n)): the length groups,
    or (None: every candidate) all C labels padded to the longest when the batch has none."""
    if batch.label_groups:
        return [tuple(g) for g in batch.label_groups]
    lt = batch.label_tokens
    return [(None, lt[:, :-1], lt[:, 1:])]


def trunk_states(model: nn.Module, batch: Batch, upto: int) -> Batch:
    """``batch`` with the hidden states entering block ``upto`` filled in: the prompts'
    (``hidden``, (B, Lp, D)) and the label continuations' (``group_hidden``, one (B*G, n, D) per
    length group, or, for a batch without groups, ``label_hidden``, (B*C, Lm-1, D)).

    Blocks below ``upto`` are frozen for an adapter that trains only the top ones, so these states
    are the same at every step: computing them once per task and starting every later forward
    at block ``upto`` (``score_candidates(..., start=upto)``) skips the frozen trunk's cost in
    every inner step and evaluation. Gradients never flow into them."""
    m1, key_valid, ends = _masks(batch, 0, 0)
    B = batch.prompt.shape[0]
    caches = [_ScoringCache(m1[:, None], None, 0) for _ in range(upto)]
    h1 = _run(model, model.model.embed_tokens(batch.prompt), m1[:, None], caches, 0)
    states = []
    if batch.label_tokens.shape[1] > 1:
        for _, inputs, _ in _continuations(batch):
            G, n = inputs.shape
            x = model.model.embed_tokens(mx.tile(inputs, (B, 1)))
            h = _run(model, x, *_continuation_caches(caches, key_valid, ends, G, n), 0)
            states.append(mx.stop_gradient(h))
    if batch.label_groups:
        out = batch._replace(hidden=mx.stop_gradient(h1), group_hidden=tuple(states))
    else:
        out = batch._replace(hidden=mx.stop_gradient(h1),
                             label_hidden=states[0] if states else EMPTY)
    mx.eval(out.hidden, out.label_hidden, out.group_hidden)
    return out


def score_candidates(model: nn.Module, batch: Batch, *, virtual: mx.array | None = None,
                     prefix: list[tuple[mx.array, mx.array]] | None = None,
                     start: int = 0) -> mx.array:
    """Summed label-token log-probabilities for every candidate, (B, C).

    Pass 1 runs the right-padded prompts (after ``virtual`` embeddings (B, V, D) for prompt tuning
    and P-tuning, and after per-layer ``prefix`` keys/values (B, kv_heads, P, head_dim) for prefix
    tuning). Pass 2 runs the candidates' label continuations for every example on top of pass 1's
    keys/values, each with its own RoPE offset so positions equal those of the single sequence
    ``prompt + label``: one unpadded run per length group (``Batch.label_groups``), or all C
    labels padded and masked for a batch without groups.

    For block-structured models (``runs_blocks``) the head is applied only at the positions that
    are scored (the last prompt token and the label continuations), and when ``batch`` carries
    trunk states (``trunk_states(model, batch, start)``) both passes start at block ``start``.
    """
    prompt, plen = batch.prompt, batch.prompt_len
    B = prompt.shape[0]
    C, Lm = batch.label_tokens.shape
    n_layers = len(model.model.layers)
    V = 0 if virtual is None else virtual.shape[1]
    P = 0 if prefix is None else prefix[0][0].shape[2]
    m1, key_valid, ends = _masks(batch, V, P)
    blocks = runs_blocks(model)
    cached = batch.hidden.ndim == 3
    if cached and not (blocks and V == 0 and P == 0 and start > 0):
        raise ValueError("trunk states need a block-structured model, no virtual tokens or "
                         "prefix, and start > 0")
    start = start if cached else 0

    # ---- pass 1: the prompts ----------------------------------------------------------------
    inputs, embeddings = prompt, None
    if V:
        emb = model.model.embed_tokens(prompt)
        embeddings = mx.concatenate([virtual.astype(emb.dtype), emb], axis=1)
        inputs = mx.concatenate([mx.zeros((B, V), prompt.dtype), prompt], axis=1)
    caches = [_ScoringCache(m1[:, None], None if prefix is None else prefix[i], P)
              for i in range(start, n_layers)]
    last_pos = (V + plen - 1)[:, None, None]
    if blocks:
        h = batch.hidden if cached else (
            embeddings if embeddings is not None else model.model.embed_tokens(inputs))
        h = _run(model, h, m1[:, None], caches, start)
        last = _head(model, mx.take_along_axis(h, last_pos, axis=1)[:, 0])  # (B, vocab)
    else:
        logits1 = model(inputs, cache=caches, input_embeddings=embeddings) if V else \
            model(inputs, cache=caches)
        last = mx.take_along_axis(logits1, last_pos, axis=1)[:, 0]
    scores = _log_softmax(last)[:, batch.label_tokens[:, 0]]  # (B, C): log p(label_c[0] | prompt)
    if Lm == 1:
        return scores

    # ---- pass 2: label continuations over pass 1's keys/values ------------------------------
    hidden = batch.group_hidden if batch.label_groups else (batch.label_hidden,)
    for k, (cands, tokens, targets) in enumerate(_continuations(batch)):
        G, n = tokens.shape  # rows b*G + j: example b, candidate j of the group
        mask, caches2 = _continuation_caches(caches, key_valid, ends, G, n)
        tiled = mx.tile(tokens, (B, 1))
        if blocks:
            h2 = hidden[k] if cached else model.model.embed_tokens(tiled)
            logits2 = _head(model, _run(model, h2, mask, caches2, start))  # (B*G, n, vocab)
        else:
            logits2 = model(tiled, cache=caches2)
        lp = mx.take_along_axis(_log_softmax(logits2), mx.tile(targets, (B, 1))[..., None],
                                axis=-1)[..., 0].reshape(B, G, n)
        if cands is None:  # all C labels padded to the longest: mask the padding
            lp = lp * (mx.arange(1, Lm)[None, :] < batch.label_len[:, None])[None]
            scores = scores + lp.sum(axis=-1)
        else:  # add each group member's sum to its candidate's score
            owner = (cands[:, None] == mx.arange(C)[None, :]).astype(lp.dtype)  # (G, C)
            scores = scores + lp.sum(axis=-1) @ owner
    return scores


def pair_bytes(model: nn.Module, prompt_len: int, label_len: int) -> int:
    """Estimated bytes one (example, candidate) pair costs a training step (forward, backward):
    pass 2 repeats the prompt's keys/values for every candidate, attends over them and applies
    the vocabulary-wide head at every label position. Memory grows as examples x candidates,
    so ways x (shots + query) x ways for an episode; the constants were fitted on stories260K
    and SmolLM2-135M (measured peaks 0.4 and 5.8 MB a pair; this gives 0.66 and 5.7)."""
    args = getattr(model, "args", None)
    layers = len(getattr(getattr(model, "model", model), "layers", [])) or 1
    d = int(getattr(args, "hidden_size", 0) or 0)
    heads = int(getattr(args, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(args, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(args, "head_dim", 0) or (d // heads if d else 0))
    vocab = int(getattr(args, "vocab_size", 0) or 0)
    lm = max(int(label_len) - 1, 1)
    floats = (3 * layers * int(prompt_len) * (2 * kv_heads * head_dim + heads * lm)
              + 3 * lm * vocab + 8 * layers * lm * d)
    return 4 * floats


def check_memory(model: nn.Module, pairs: int, prompt_len: int, label_len: int, *, what: str,
                 hint: str, field: str) -> int:
    """Refuse (one-line ``UserError``) a run whose step would need more memory than
    ``platform.memory_budget_bytes`` allows; returns the estimate in bytes. ``pairs`` is how
    many (example, candidate) pairs one step scores, ``what`` says where they come from."""
    from metapeft.errors import UserError
    from metapeft.platform import memory_budget_bytes

    def size(n: int) -> str:
        return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"

    need = pairs * pair_bytes(model, prompt_len, label_len)
    budget, source = memory_budget_bytes()
    if budget is not None and need > budget:
        raise UserError(f"{what} scores {pairs} (example, label) pairs at once, about "
                        f"{size(need)} by estimate, over {source} ({size(budget)}); {hint}",
                        field=field)
    return need


OBJECTIVES = ("ce", "nll", "ce_mean", "ce_nll")  # training losses; "ce" is the default


def classification_loss(scores: mx.array, batch: Batch, normalise: bool = True,
                        objective: str = "ce") -> mx.array:
    """Weighted loss over candidate scores (a weighted sum when ``normalise`` is False).

    ``ce``: cross-entropy over the candidates' summed log-probabilities (the default: it trains the
    ranking decision itself). ``nll``: the gold label's per-token negative log-likelihood
    (MetaICL-style), which ignores the other candidates.
    """
    gold_idx = mx.maximum(batch.labels, 0)[:, None]
    per_token = scores / batch.label_len.astype(scores.dtype)[None, :]
    if objective == "nll":
        gold = mx.take_along_axis(per_token, gold_idx, axis=1)[:, 0]
    elif objective == "ce_mean":
        logp = per_token - mx.logsumexp(per_token, axis=-1, keepdims=True)
        gold = mx.take_along_axis(logp, gold_idx, axis=1)[:, 0]
    elif objective == "ce_nll":
        logp = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
        gold = mx.take_along_axis(logp, gold_idx, axis=1)[:, 0] + mx.take_along_axis(per_token, gold_idx, axis=1)[:, 0]
    else:
        logp = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
        gold = mx.take_along_axis(logp, gold_idx, axis=1)[:, 0]
    w = batch.weights * (batch.labels >= 0)
    total = -(gold * w).sum()
    return total / mx.maximum(w.sum(), 1e-8) if normalise else total


def total_weight(batch: Batch) -> mx.array:
    return (batch.weights * (batch.labels >= 0)).sum()


def accuracy(scores: mx.array, batch: Batch) -> mx.array:
    valid = batch.labels >= 0
    hit = mx.logical_and(mx.argmax(scores, axis=-1) == batch.labels, valid)
    return hit.sum() / mx.maximum(valid.sum(), 1)

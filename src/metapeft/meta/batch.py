"""Meta-batches: tasks encoded to one fixed-shape (support, query) pair of Batches each, and
stacked along a leading task axis so the inner loops run under ``mx.vmap``.

Stacking needs equal shapes across the meta-batch: the same number of candidates (ways) and of
support/query examples, which episodic N-way K-shot sampling gives, and prompts/labels padded to a
common length. Prompt lengths are rounded up to a multiple of ``pad_to`` so that ``mx.compile``
sees few distinct shapes. Tasks that cannot be stacked (different ways or sizes) are grouped by
shape, and a group of one runs through the same code without vmap.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import mlx.core as mx

from metapeft.data.tasks import Task
from metapeft.scoring import Batch, TaskEncoder


@dataclass
class EncodedEpisode:
    task: Task
    support: Batch
    query: Batch

    @property
    def signature(self) -> tuple:
        return (self.support.prompt.shape[0], self.query.prompt.shape[0],
                self.support.label_tokens.shape[0])


def _pad_batch(b: Batch, lp: int, lm: int) -> Batch:
    prompt = b.prompt
    if prompt.shape[1] < lp:
        prompt = mx.pad(prompt, [(0, 0), (0, lp - prompt.shape[1])])
    labels = b.label_tokens
    if labels.shape[1] < lm:
        labels = mx.pad(labels, [(0, 0), (0, lm - labels.shape[1])])
    # tasks' label lengths differ, so a meta-batch cannot stack length groups: its tasks run
    # every candidate padded to the longest and masked
    return b._replace(prompt=prompt, label_tokens=labels, label_groups=(), group_hidden=())


def encode_episode(task: Task, tokenizer, template: str | None = None,
                   support_weights: list[float] | None = None, prepare=None) -> EncodedEpisode:
    enc = TaskEncoder(tokenizer, task.labels, **({"template": template} if template else {}))
    support, query = enc.encode(task.support, support_weights), enc.encode(task.query)
    if prepare is not None:
        support, query = prepare(support), prepare(query)
    return EncodedEpisode(task, support, query)


def stack_episodes(episodes: list[EncodedEpisode], pad_to: int = 8,
                   prepare=None) -> tuple[Batch, Batch]:
    """Stack same-signature episodes into (support, query) Batches with a leading task axis.
    ``prepare`` (``Adapter.prepare``: frozen-trunk states) runs on each padded task batch."""
    def lengths(get):
        lp = max(get(e).prompt.shape[1] for e in episodes)
        lm = max(get(e).label_tokens.shape[1] for e in episodes)
        return -(-lp // pad_to) * pad_to, lm

    lm = max(max(e.support.label_tokens.shape[1], e.query.label_tokens.shape[1]) for e in episodes)
    out = []
    for get in (lambda e: e.support, lambda e: e.query):
        lp, _ = lengths(get)
        padded = [_pad_batch(get(e), lp, lm) for e in episodes]
        if prepare is not None:
            padded = [prepare(b) for b in padded]
        out.append(Batch(*[mx.stack(field) if isinstance(field[0], mx.array) else ()
                           for field in zip(*padded)]))
    return out[0], out[1]


def group_by_signature(episodes: list[EncodedEpisode]) -> list[list[EncodedEpisode]]:
    groups: dict[tuple, list[EncodedEpisode]] = defaultdict(list)
    for e in episodes:
        groups[e.signature].append(e)
    return list(groups.values())

"""Prototype: a training-free classifier, the nearest class mean of the frozen model's hidden states.

Every text is embedded by the frozen base model: its final hidden states (after the final norm)
mean-pooled over the prompt tokens (``pooling: mean``; ``last``: the state at the last prompt
token, where the model would predict the label), then L2-normalised. With ``center`` (the
default) the support set's mean embedding is subtracted and the result normalised again
(SimpleShot's "CL2N", Wang et al., 2019). Each class's prototype is the normalised mean of its
support embeddings; a text's score for a class is the cosine similarity to that prototype
divided by ``temperature``, so the probabilities are ``softmax(cos / temperature)`` and the
prediction is the nearest class mean by cosine.

There is nothing to train: ``fit`` computes the tree from the support set, ``adapt`` runs no
optimizer step (the curve is the one step-0 accuracy), and there is nothing to meta-learn. The
tree ``{"means": (C, D), "center": (D,)}`` (zeros when ``center`` is off) is what
``adapt --out`` saves, with the same self-describing header as every method, in the label order
of the directory's ``labels``.

Measured on CLINC150's held-out banking/travel test split, 5-way 5-shot, 10 query examples per
class (30 episodes on stories260K, 20 on SmolLM2-135M): mean pooling beats the last token by
19 points on stories260K (71-73% vs 52-53%), centring adds about a point on both models, and a
temperature of 0.1 gave the lowest expected calibration error of 0.02/0.05/0.1/0.2 (stories260K
0.170, SmolLM2 0.105) and matched a temperature fitted on the support set by leave-one-out.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from metapeft.adapters.base import Adapter, AdapterConfig
from metapeft.errors import UserError
from metapeft.scoring import Batch

POOLINGS = ("mean", "last")


@dataclass
class PrototypeConfig(AdapterConfig):
    pooling: str = "mean"  # mean | last
    center: bool = True  # subtract the support set's mean embedding (CL2N)
    temperature: float = 0.1  # probabilities: softmax(cosine / temperature)

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got "
                            f"{self.pooling!r}", field="pooling")
        if not isinstance(self.center, bool):
            raise UserError("center must be true or false", field="center")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise UserError(f"temperature must be > 0, got {self.temperature!r}",
                            field="temperature")


def _normalise(x: mx.array) -> mx.array:
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def pooled_states(model, batch: Batch, pooling: str = "mean") -> mx.array:
    """(B, D) float32: the frozen model's final hidden states (after its final norm) for the
    batch's right-padded prompts, mean-pooled over each prompt's tokens or taken at its last one.
    The causal mask keeps the padding out of every real token's state."""
    h = model.model(batch.prompt).astype(mx.float32)  # (B, L, D)
    plen = batch.prompt_len
    if pooling == "last":
        return mx.take_along_axis(h, (plen - 1)[:, None, None], axis=1)[:, 0]
    mask = (mx.arange(h.shape[1])[None, :] < plen[:, None])[..., None]
    return (h * mask).sum(axis=1) / plen[:, None].astype(mx.float32)


class Prototype(Adapter):
    method = "prototype"
    Config = PrototypeConfig
    training_free = True

    def _attach(self) -> None:
        self.dim = self.base.hidden_size

    def init_params(self, seed: int = 0) -> dict:
        """An empty tree of the right width: the class means come from ``fit``."""
        return {"means": mx.zeros((0, self.dim), mx.float32),
                "center": mx.zeros((self.dim,), mx.float32)}

    def embed(self, params: dict, batch: Batch) -> mx.array:
        """(B, D) unit vectors: pooled, normalised, centred on the support mean, normalised."""
        f = _normalise(pooled_states(self.base.model, batch, self.config.pooling))
        return _normalise(f - params["center"]) if self.config.center else f

    def fit(self, params: dict, support: list[Batch]) -> dict:
        """The class means of the support set's embeddings (and their centre), in the order of
        the task's labels; a class without support examples gets a zero prototype."""
        feats, labels = [], []
        for b in support:
            feats.append(np.asarray(_normalise(pooled_states(self.base.model, b,
                                                             self.config.pooling))))
            labels.append(np.asarray(b.labels))
        if not feats:
            raise UserError("the prototype method needs a support set", field="support")
        f, y = np.concatenate(feats).astype(np.float64), np.concatenate(labels)
        center = f.mean(0) if self.config.center else np.zeros(f.shape[1])
        if self.config.center:
            f = f - center
            f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)
        means = np.zeros((support[0].label_tokens.shape[0], f.shape[1]))
        for c in range(means.shape[0]):
            if (y == c).any():
                m = f[y == c].mean(0)
                means[c] = m / max(float(np.linalg.norm(m)), 1e-8)
        out = {"means": mx.array(means.astype(np.float32)),
               "center": mx.array(center.astype(np.float32))}
        mx.eval(out)
        return out

    def scores(self, params: dict, batch: Batch) -> mx.array:
        """(B, C) cosine similarity to every class mean over the temperature."""
        return (self.embed(params, batch) @ params["means"].T) / self.config.temperature

    def check_compatible(self, params: dict, metadata: dict, source: str) -> dict:
        """Any number of classes (the task's), each a D-wide mean for this model."""
        self.check_origin(metadata, source, "file was written")
        if set(params) != {"means", "center"}:
            raise UserError(f"expected the tensors means and center, got {sorted(params)}",
                            path=source, field="parameters")
        means, center = params["means"], params["center"]
        if means.ndim != 2 or means.shape[1] != self.dim or tuple(center.shape) != (self.dim,):
            raise UserError(f"means {tuple(means.shape)} and center {tuple(center.shape)} do not "
                            f"fit this model's hidden size {self.dim}", path=source,
                            field="shape")
        labels = metadata.get("labels")
        if labels is not None:
            import json

            n = len(json.loads(labels))
            if n != means.shape[0]:
                raise UserError(f"{means.shape[0]} class means for {n} labels", path=source,
                                field="means")
        return params

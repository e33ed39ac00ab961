"""``adapt --method lora --route arrow``: training-free Arrow routing over the adapter library
(Ostapenko et al., 2024; HF peft ``tuners/lora/arrow.py``).

Every library LoRA that fits the adapter (``library.candidates``: same base model, same LoRA
structure) is an expert. For each adapted linear module, expert e's prototype is the top right
singular vector of its ΔWₑ = Bₑ·Aₑ (peft's orientation; in mlx-lm's layout ΔWₑᵀ = Aₑ·Bₑ, and the
vector is its top left singular vector, computed from a QR of Aₑ and an r×out SVD, never forming
ΔW). Each token's input x to the module is routed to the ``top_k`` (3, peft's default) experts
with the largest |cos(x, protoₑ)| (sign-agnostic, as singular vectors are), their weights a
softmax over those cosines at ``temperature`` 1, and the module adds
scale · Σₑ gₑ(x)·(x·Aₑ)·Bₑ to its frozen output. No parameter is trained; that model is the
step-0 predictor (``routed accuracy``).

Further steps need one LoRA to train, so the routed mixture is merged per module: the routing
weights averaged over every support token that enters the module (padding included) give
ΔW = Σₑ ḡₑ·Aₑ·Bₑ, and its best rank-r approximation (truncated SVD, √S split between A and B)
is the init that ``adapt`` trains as usual. With a single expert both are that expert exactly.
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

TOP_K = 3
TEMPERATURE = 1.0


def _orth_factor(a: np.ndarray, b: np.ndarray):
    """(U, S, Vt) of M = a @ b (a: (in, R), b: (R, out)) without forming M: QR of a, then the
    SVD of the small R×out matrix."""
    q, r = np.linalg.qr(a.astype(np.float64))
    u, s, vt = np.linalg.svd(r @ b.astype(np.float64), full_matrices=False)
    return q @ u, s, vt


def prototype(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The unit top singular vector of a @ b in the input space (``in``,), sign-agnostic."""
    u, _, _ = _orth_factor(a, b)
    v = u[:, 0]
    return (v / max(np.linalg.norm(v), 1e-12)).astype(np.float32)


class ArrowLinear(nn.Module):
    """A frozen linear layer plus Arrow's per-token mixture of expert LoRAs."""

    def __init__(self, linear, a: mx.array, b: mx.array, protos: mx.array, scale: float,
                 top_k: int, temperature: float):
        super().__init__()
        self.linear = linear
        self.experts, self.rank = a.shape[0], a.shape[2]
        # A_cat (in, E·r) and B_cat (E·r, out): Σₑ gₑ (x Aₑ) Bₑ as two matmuls
        self._a = mx.concatenate(list(a), axis=1)
        self._b = mx.concatenate(list(b), axis=0)
        self._protos = protos  # (E, in), unit rows
        self._scale, self._k, self._t = scale, min(top_k, a.shape[0]), temperature
        self.collect = False
        self._sum, self._count = None, 0
        self.freeze()

    def gates(self, x: mx.array) -> mx.array:
        """(..., E) routing weights of the tokens ``x`` (..., in)."""
        xf = x.astype(mx.float32)
        sim = mx.abs(xf @ self._protos.T) / mx.maximum(
            mx.linalg.norm(xf, axis=-1, keepdims=True), 1e-8)
        if self._k < self.experts:
            kth = mx.sort(sim, axis=-1)[..., -self._k][..., None]
            sim = mx.where(sim >= kth, sim, -mx.inf)
        return mx.softmax(sim / self._t, axis=-1)

    def __call__(self, x):
        y = self.linear(x)
        g = self.gates(x)
        if self.collect:
            flat = g.reshape(-1, self.experts)
            s = flat.sum(axis=0)
            self._sum = s if self._sum is None else self._sum + s
            self._count += flat.shape[0]
        z = (x.astype(mx.float32) @ self._a) * mx.repeat(g, self.rank, axis=-1)
        return y + (self._scale * (z @ self._b)).astype(x.dtype)

    def mean_gates(self) -> np.ndarray:
        return np.asarray(self._sum / max(self._count, 1))


def routed_model(adapter, experts: list[dict], top_k: int = TOP_K,
                 temperature: float = TEMPERATURE):
    """(a copy of the adapter's model with every LoRA module replaced by ``ArrowLinear`` over
    ``experts`` (flat parameter dicts), {module path: ArrowLinear})."""
    from metapeft.adapters.base import structural_copy

    model = structural_copy(adapter.model)
    modules = sorted({k.rsplit(".", 1)[0] for k in experts[0] if k.endswith(".lora_a")})
    named = dict(model.named_modules())
    new = []
    for path in modules:
        lora = named[path]
        a = mx.stack([e[f"{path}.lora_a"].astype(mx.float32) for e in experts])
        b = mx.stack([e[f"{path}.lora_b"].astype(mx.float32) for e in experts])
        an, bn = np.asarray(a), np.asarray(b)
        protos = mx.array(np.stack([prototype(an[i], bn[i]) for i in range(len(experts))]))
        new.append((path, ArrowLinear(lora.linear, a, b, protos, float(lora.scale), top_k,
                                      temperature)))
    model.update_modules(tree_unflatten(new))
    return model, dict(new)


def _accuracy(model, adapter, buckets) -> float:
    from metapeft.scoring import score_candidates

    hits = n = 0
    for bt in buckets:
        s = score_candidates(model, bt, start=adapter.frozen_blocks)
        valid = bt.labels >= 0
        hits += int(mx.logical_and(mx.argmax(s, axis=-1) == bt.labels, valid).sum().item())
        n += bt.size
    return hits / max(n, 1)


def merged_params(adapter, experts: list[dict], layers: dict) -> dict:
    """The rank-r LoRA closest to each module's support-averaged routed mixture."""
    out = {}
    r = adapter.config.rank
    for path, layer in layers.items():
        g = layer.mean_gates()
        a = np.concatenate([np.asarray(e[f"{path}.lora_a"], dtype=np.float64) * g[i]
                            for i, e in enumerate(experts)], axis=1)
        b = np.concatenate([np.asarray(e[f"{path}.lora_b"], dtype=np.float64)
                            for e in experts], axis=0)
        u, s, vt = _orth_factor(a, b)
        root = np.sqrt(s[:r])
        dtype = experts[0][f"{path}.lora_a"].dtype
        out[f"{path}.lora_a"] = mx.array((u[:, :r] * root).astype(np.float32)).astype(dtype)
        out[f"{path}.lora_b"] = mx.array((root[:, None] * vt[:r]).astype(np.float32)).astype(dtype)
    return adapter.unflat(out)


def arrow_init(adapter, data, task, *, registry=None, top_k: int = TOP_K,
               temperature: float = TEMPERATURE, max_experts: int | None = None
               ) -> tuple[dict, dict]:
    """(merged init params, report with the routed step-0 accuracy) for ``--route arrow``.
    ``max_experts``: only the library's entries nearest to the task (default: all that fit)."""
    from metapeft import library

    t0 = time.perf_counter()
    usable, skipped = library.candidates(adapter, registry)
    if max_experts is not None:
        query = library.profile(adapter.base, task)
        usable = sorted(usable, key=lambda ea: -library.similarity(query, ea[0]))[:max_experts]
    experts = [arrays for _, arrays in usable]
    model, layers = routed_model(adapter, experts, top_k, temperature)
    t_build = time.perf_counter() - t0
    routed = _accuracy(model, adapter, data.prepared(adapter, "query")) if data.query else None
    t_route = time.perf_counter() - t0 - t_build
    for layer in layers.values():
        layer.collect = True
    for bt in data.prepared(adapter, "support"):
        from metapeft.scoring import score_candidates

        mx.eval(score_candidates(model, bt, start=adapter.frozen_blocks))
    for layer in layers.values():
        mx.eval(layer._sum)
    params = merged_params(adapter, experts, layers)
    usage = np.mean([layer.mean_gates() for layer in layers.values()], axis=0)
    report = {"routed_accuracy": routed, "experts": [
        {"id": e.id, "task": e.task, "mean_gate": round(float(u), 4)}
        for (e, _), u in zip(usable, usage)], "top_k": min(top_k, len(experts)),
        "temperature": temperature, "skipped": skipped,
        "build_seconds": round(t_build, 3), "route_seconds": round(t_route, 3),
        "seconds": round(time.perf_counter() - t0, 3),
        "init": "support-averaged routing merged per module, truncated to rank "
                f"{adapter.config.rank}"}
    return params, report

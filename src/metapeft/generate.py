"""``adapt --init library:generate``: a task-conditioned LoRA generator (after Text-to-LoRA,
Charakorn et al. 2025), trained by reconstruction on the adapter library.

The generator is a small MLX network. For a task embedding e (``library.task_embedding``: the
frozen base model's mean-pooled support states), a block index l and a module type t (q_proj,
..., down_proj), h = tanh(W_e·e + E_layer[l] + E_module[t]), h = tanh(W·h), and the type's head
maps h to that module's A (in, r) and B (r, out). Targets are the library LoRAs in a canonical
gauge: a LoRA's A/B pair is defined only up to an invertible r×r mixing (A·M, M⁻¹·B), so each
is refactored through the SVD of its ΔW = A·B (A = U·√S, B = √S·Vᵀ, each singular vector's
sign fixed by its largest entry) and the generator regresses that, each module type's outputs
scaled by the targets' standard deviation. Trained with Adam on the mean squared error over every
library entry that has a content embedding and fits the structure (``library.candidates``); no
end-to-end fine-tuning through the support/query loss (a possible next step).

Stored as versioned safetensors, ``<registry>/library/generators/vNNNN.safetensors``: the
network's weights, and in the header the base model fingerprint, the LoRA structure, the module
shapes, the output scales, the entries it was trained on, the loss curve and the time.
``adapt --init library:generate`` uses the newest one for this base model and structure.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from metapeft.errors import UserError

FORMAT = "metapeft-lora-generator"
HIDDEN = 128
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _split(path: str) -> tuple[int, str]:
    """(block index, module type) of a module path like ``model.layers.3.self_attn.q_proj``."""
    m = _LAYER.search(path + ".")
    if m is None:
        raise UserError(f"module {path!r} is not inside a numbered block", field="parameters")
    return int(m.group(1)), path[m.end():]


class Generator(nn.Module):
    def __init__(self, dim: int, layers: list[int], types: dict[str, tuple[int, int]],
                 rank: int, hidden: int = HIDDEN):
        super().__init__()
        self.layers, self.type_names, self.shapes, self.rank = layers, sorted(types), types, rank
        self.inp = nn.Linear(dim, hidden)
        self.layer_emb = nn.Embedding(len(layers), hidden)
        self.type_emb = nn.Embedding(len(types), hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.heads = [nn.Linear(hidden, (i + o) * rank) for i, o in
                      (types[t] for t in self.type_names)]

    def __call__(self, e: mx.array, t: int) -> mx.array:
        """(N, L, (in + out)·r): type ``t``'s outputs for N embeddings at every block."""
        h = self.inp(e)[:, None, :] + self.layer_emb.weight[None] + self.type_emb.weight[t]
        return self.heads[t](mx.tanh(self.mid(mx.tanh(h))))


def canonical(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A·B unchanged, in the SVD gauge with fixed signs."""
    from metapeft.route import _orth_factor

    u, s, vt = _orth_factor(a, b)
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    sign = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    sign[sign == 0] = 1.0
    root = np.sqrt(s) * sign  # (U·diag(root)) (diag(root)·Vᵀ) = U·S·Vᵀ, since sign² = 1
    return u * root, root[:, None] * vt


def _modules(flat_keys) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in flat_keys if k.endswith(".lora_a")})


def generators_dir(registry=None) -> Path:
    from metapeft.library import library_dir

    return library_dir(registry) / "generators"


def train_generator(adapter, *, registry=None, epochs: int = 400, lr: float = 1e-3,
                    seed: int = 0, hidden: int = HIDDEN) -> dict:
    """Train a generator on the library entries that fit ``adapter`` (a plain LoRA on the base
    model) and have a content embedding; save it as the next version. Returns its summary."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from metapeft import __version__
    from metapeft.artifacts import file_lock, save_safetensors
    from metapeft.library import candidates

    t0 = time.perf_counter()
    usable, _ = candidates(adapter, registry)
    usable = [(e, a) for e, a in usable if e.embedding is not None]
    if len(usable) < 2:
        raise UserError(f"a generator needs at least 2 library LoRAs with a task embedding (add "
                        f"them with their task), found {len(usable)}", field="library")
    rank = adapter.config.rank
    modules = _modules(usable[0][1])
    layers = sorted({_split(m)[0] for m in modules})
    types: dict[str, tuple[int, int]] = {}
    for m in modules:
        a = usable[0][1][f"{m}.lora_a"]
        types[_split(m)[1]] = (a.shape[0], usable[0][1][f"{m}.lora_b"].shape[1])
    names = sorted(types)
    emb = mx.array(np.asarray([e.embedding for e, _ in usable], np.float32))
    targets, scales = [], []
    for t in names:  # (N, L, (in + out)·r) per type, in the canonical gauge
        rows = []
        for _, arrays in usable:
            per_layer = []
            for layer in layers:
                key = next(m for m in modules if _split(m) == (layer, t))
                ca, cb = canonical(np.asarray(arrays[f"{key}.lora_a"], np.float64),
                                   np.asarray(arrays[f"{key}.lora_b"], np.float64), rank)
                per_layer.append(np.concatenate([ca.reshape(-1), cb.reshape(-1)]))
            rows.append(per_layer)
        y = np.asarray(rows, np.float32)
        s = float(y.std()) or 1.0
        targets.append(mx.array(y / s))
        scales.append(s)
    mx.random.seed(seed)
    net = Generator(emb.shape[1], layers, types, rank, hidden)
    opt = optim.Adam(learning_rate=lr)

    def loss_fn(model):
        return sum(mx.mean((model(emb, i) - y) ** 2) for i, y in enumerate(targets)) / len(names)

    vg = nn.value_and_grad(net, loss_fn)
    curve = []
    for step in range(epochs):
        loss, grads = vg(net)
        opt.update(net, grads)
        mx.eval(net.parameters(), opt.state, loss)
        if step % 50 == 0 or step == epochs - 1:
            curve.append(round(float(loss.item()), 6))
    base = adapter.base
    meta = {"format": FORMAT, "base_model": base.model_id, "base_model_hash": base.fingerprint,
            "config": adapter.config.to_dict(), "rank": rank, "layers": layers,
            "types": {t: list(v) for t, v in types.items()}, "scales": scales,
            "hidden": hidden, "dim": int(emb.shape[1]), "entries": [e.id for e, _ in usable],
            "epochs": epochs, "lr": lr, "loss_curve": curve, "final_loss": curve[-1],
            "seconds": round(time.perf_counter() - t0, 3), "metapeft_version": __version__}
    d = generators_dir(registry)
    d.mkdir(parents=True, exist_ok=True)
    with file_lock(d / ".lock"):
        version = 1 + max([int(p.stem[1:]) for p in d.glob("v*.safetensors")] or [0])
        meta["version"] = version
        path = save_safetensors(d / f"v{version:04d}.safetensors",
                                dict(tree_flatten(net.parameters())), meta)
    return {**{k: meta[k] for k in ("version", "entries", "final_loss", "loss_curve",
                                     "seconds", "base_model")}, "path": str(path)}


def latest_generator(adapter, registry=None) -> tuple[Path, dict]:
    """(path, header) of the newest generator for this adapter's base model and structure."""
    from metapeft.artifacts import json_field, read_metadata
    from metapeft.library import STRUCTURE

    want = adapter.config.to_dict()
    d = generators_dir(registry)
    for p in sorted(d.glob("v*.safetensors"), reverse=True) if d.is_dir() else []:
        meta = read_metadata(p)
        cfg = json_field(meta, "config") or {}
        if (meta.get("base_model_hash") == adapter.base.fingerprint
                and all(cfg.get(k) == want.get(k) for k in STRUCTURE)):
            return p, {k: json_field(meta, k) for k in meta}
    raise UserError("no LoRA generator for this base model and LoRA structure in the library; "
                    "train one with `metapeft library train-generator`", path=str(d),
                    field="init")


def generate_init(adapter, task, registry=None) -> tuple[dict, dict]:
    """(init params, report) for ``adapt --init library:generate``."""
    from mlx.utils import tree_unflatten

    from metapeft.artifacts import load_safetensors
    from metapeft.library import task_embedding

    t0 = time.perf_counter()
    path, meta = latest_generator(adapter, registry)
    arrays, _ = load_safetensors(path)
    types = {t: tuple(v) for t, v in meta["types"].items()}
    net = Generator(int(meta["dim"]), list(meta["layers"]), types, int(meta["rank"]),
                    int(meta["hidden"]))
    net.update(tree_unflatten(list(arrays.items())))
    e = mx.array(np.asarray([task_embedding(adapter.base, task)], np.float32))
    want = adapter.flat(adapter.init_params(0))
    r = int(meta["rank"])
    out = {}
    for i, t in enumerate(net.type_names):
        y = np.asarray(net(e, i)[0]) * meta["scales"][i]
        n_in, n_out = types[t]
        for j, layer in enumerate(net.layers):
            key = next(k.rsplit(".", 1)[0] for k in want
                       if k.endswith(".lora_a") and _split(k.rsplit(".", 1)[0]) == (layer, t))
            out[f"{key}.lora_a"] = mx.array(y[j, :n_in * r].reshape(n_in, r))
            out[f"{key}.lora_b"] = mx.array(y[j, n_in * r:].reshape(r, n_out))
    if set(out) != set(want):
        raise UserError("the generator's modules do not match this adapter's", path=str(path),
                        field="parameters")
    params = adapter.unflat({k: out[k].astype(want[k].dtype) for k in want})
    return params, {"generator": str(path), "version": meta.get("version"),
                    "entries": len(meta.get("entries") or []),
                    "final_loss": meta.get("final_loss"),
                    "seconds": round(time.perf_counter() - t0, 3)}

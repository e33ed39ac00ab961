"""``adapt --init library:generate``: a task-conditioned LoRA generator (after Text-to-LoRA,
Charakorn et al. 2025), trained by reconstruction on the adapter library and optionally
fine-tuned end to end through the support/query loss.

The generator is a small MLX network. For a task embedding e (``library.task_embedding``: the
frozen base model's mean-pooled support states), a block index l and a module type t (q_proj,
..., down_proj), h = tanh(W_e·e + E_layer[l] + E_module[t]), h = tanh(W·h), and the type's head
maps h to that module's A (in, r) and B (r, out). Targets are the library LoRAs in a canonical
gauge: a LoRA's A/B pair is defined only up to an invertible r×r mixing (A·M, M⁻¹·B), so each
is refactored through the SVD of its ΔW = A·B (A = U·√S, B = √S·Vᵀ, each singular vector's
sign fixed by its largest entry) and the generator regresses that, each module type's outputs
scaled by the targets' standard deviation. Stage 1 (``epochs`` steps, may be 0): Adam on the
mean squared error over every library entry that has a content embedding and fits the structure
(``library.candidates``).

Stage 2, end to end (``E2E``, ``library train-generator --e2e-steps N``; off by default): the
generator's output is θ, so it is meta-trained like a meta-init (a MAML-style objective). Each
step draws ``meta_batch`` episodes of a meta-train pool (the one the library was built from,
with the same domain filters: never the meta-test classes), generates θᵢ = G(eᵢ) from each
task's embedding, and asks the functional meta-learner (``meta.learner.task_contribution``,
which runs ``inner_adapt``'s k support steps and ``train.batch_loss`` on the query set) for
gᵢ = ∂L_query/∂θᵢ. G's gradient is the vector-Jacobian product Σᵢ gᵢ·∂θᵢ/∂G / n (the
surrogate Σᵢ⟨θᵢ(G), stop_gradient(gᵢ)⟩ / n under ``nn.value_and_grad``), and Adam updates G.
With k = 0 (the default) gᵢ is the exact gradient of the query loss at the generated θ; with
k > 0 it is first-order MAML's (the query gradient at the adapted φᵢ, the inner loop not
differentiated) unless ``second_order``, which differentiates through the k inner steps
(exact, costs about k extra backward passes). The inner loop is the meta-learner's (Adam, no
bias correction, as mlx's and ``adapt``'s) at the adapter's default learning rate, the one
``adapt`` uses. ``algorithm="reptile"`` (k ≥ 1) uses Reptile's direction instead: gᵢ = θᵢ − φᵢ,
so G learns to put each task's θ where its k support steps would have taken it, the rule the
meta-init itself is trained with (``meta.learner.task_contribution``'s Reptile contribution).

Anchored at an init (``anchor``, ``library train-generator --anchor INIT``; after task-conditioned
meta-learning, e.g. Vuorio et al.'s MMAML, 2019): θ = θ_INIT + G(e), a residual on the meta-init
rather than a LoRA from nothing. G's output heads start at zero, so before the end-to-end stage
every task starts exactly at INIT; there is no reconstruction stage (the library LoRAs were not
trained from INIT, so a residual target does not exist). The file keeps INIT's tensors
(``anchor.*``) and its calibrated step size (``adapt_lr``, ``adapt_lr_decay``,
``adapt_lr_calibration``), which ``adapt --init library:generate`` then uses, as it does for
``library:compose:K+INIT``. The inner loop runs at that step size's first step.

Stored as versioned safetensors, ``<registry>/library/generators/vNNNN.safetensors``: the
network's weights, and in the header the base model fingerprint, the LoRA structure, the module
shapes, the output scales, the entries it was trained on, the loss curve, the time and
``training`` (reconstruction steps, e2e steps, inner steps, order, learning rates, tasks seen,
the pool and its filters, the query-loss curve). ``adapt --init library:generate`` uses the
newest one for this base model and structure; ``library:generate@V`` picks version V.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from metapeft.adapter_io import stored_step_size
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
        # Task embeddings are mean-pooled LM states: they share one large direction (pairwise
        # cosine 0.97-0.99 between CLINC150 tasks on SmolLM2) and differ by ~12% of their norm, so
        # raw, they give G an almost constant input and it learns one residual for every task.
        # Centred on the library's mean and scaled to unit RMS they differ by O(1). Not trained;
        # saved with the weights (files from before load as identity).
        self.inp_center = mx.zeros((dim,))
        self.inp_scale = mx.ones((1,))
        self.freeze(recurse=False, keys=["inp_center", "inp_scale"])

    def set_input_stats(self, emb: np.ndarray) -> None:
        """Centre on ``emb``'s mean (N, dim) and scale its deviations to unit RMS."""
        emb = np.asarray(emb, np.float64)
        center = emb.mean(axis=0)
        rms = float(np.sqrt(((emb - center) ** 2).mean()))
        self.inp_center = mx.array(center.astype(np.float32))
        self.inp_scale = mx.array([rms if rms > 0 else 1.0], mx.float32)

    def __call__(self, e: mx.array, t: int) -> mx.array:
        """(N, L, (in + out)·r): type ``t``'s outputs for N embeddings at every block."""
        e = (e - self.inp_center) / self.inp_scale
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


E2E_ALGORITHMS = ("fomaml", "maml", "reptile")
ANCHOR_PREFIX = "anchor."  # an anchored generator's file: INIT's tensors beside the network's


@dataclass
class E2E:
    """End-to-end fine-tuning of the generator (stage 2, see the module doc); ``steps`` 0: off."""

    steps: int = 0
    inner_steps: int = 0  # k support steps before the query loss (0: the query loss at G's θ)
    second_order: bool = False  # k > 0: differentiate through the inner steps (else first order)
    algorithm: str = "fomaml"  # fomaml | maml (= second_order) | reptile (gᵢ = θᵢ − φᵢ, k ≥ 1)
    lr: float = 1e-4  # the generator's Adam
    meta_batch: int = 4  # episodes per step
    inner_lr: float | None = None  # None: the adapter's default lr (what `adapt` uses)
    data: str | None = None  # the meta-train pool (JSONL/CSV) the library was built from
    domains: list[str] | None = None
    exclude_domains: list[str] | None = None
    ways: int = 5
    shots: int = 5
    query: int = 10
    val_episodes: int = 8  # fixed held-out episodes of the pool, scored before and after

    def validate(self) -> None:
        for flag, name in (("--e2e-steps", "steps"), ("--inner-steps", "inner_steps")):
            if getattr(self, name) < 0:
                raise UserError(f"{flag} must be >= 0, got {getattr(self, name)}", field=name)
        if self.steps and self.data is None:
            raise UserError("end-to-end fine-tuning (--e2e-steps) needs --data: the meta-train "
                            "pool the library was built from", field="data")
        if not self.steps and self.data is not None:
            raise UserError("--data is the end-to-end stage's pool; give --e2e-steps N too",
                            field="data")
        if self.val_episodes < 0:
            raise UserError(f"--val-episodes must be >= 0, got {self.val_episodes}",
                            field="val_episodes")
        if self.meta_batch < 1:
            raise UserError(f"--meta-batch must be >= 1, got {self.meta_batch}",
                            field="meta_batch")
        if self.lr <= 0 or (self.inner_lr is not None and self.inner_lr <= 0):
            raise UserError("learning rates must be positive", field="e2e_lr")
        if self.algorithm not in E2E_ALGORITHMS:
            raise UserError(f"unknown --e2e-algorithm {self.algorithm!r}; choose from "
                            f"{', '.join(E2E_ALGORITHMS)}", field="e2e_algorithm")
        if self.algorithm == "reptile" and self.second_order:
            raise UserError("--second-order is MAML's; Reptile is first order by construction",
                            field="second_order")
        if self.algorithm == "reptile" and self.steps and self.inner_steps < 1:
            raise UserError("--e2e-algorithm reptile needs --inner-steps >= 1 (its direction is "
                            "where the support steps go)", field="inner_steps")

    @property
    def meta_algorithm(self) -> str:
        """The meta-learner's algorithm for ``task_contribution``."""
        return "maml" if self.second_order or self.algorithm == "maml" else self.algorithm

    def source(self):
        """The episode source over the filtered pool (one-line errors for bad filters)."""
        from metapeft.data.episodes import EpisodeSource
        from metapeft.data.pools import filter_pool
        from metapeft.data.tasks import read_rows

        pool = filter_pool(read_rows(Path(self.data)), domains=self.domains,
                           exclude_domains=self.exclude_domains)
        return EpisodeSource(pool, ways=self.ways, shots=self.shots, query=self.query,
                             name=str(self.data))


def _keymap(adapter, layers: list[int], names: list[str]) -> dict[str, list[str]]:
    """Per module type, the adapter's module path at each generated block, in order."""
    mods = _modules(adapter.flat(adapter.init_params(0)))
    try:
        return {t: [next(m for m in mods if _split(m) == (layer, t)) for layer in layers]
                for t in names}
    except StopIteration:
        raise UserError("the generator's modules do not match this adapter's",
                        field="parameters") from None


def generated(net: Generator, emb: mx.array, scales: list[float],
              keymap: dict[str, list[str]], anchor: dict | None = None) -> dict[str, mx.array]:
    """The flat LoRA tensors the generator gives N task embeddings, each (N, ...) and
    differentiable in the network's parameters; with ``anchor`` (flat tensors) the residual is
    added to it."""
    r, out = net.rank, {}
    for i, t in enumerate(net.type_names):
        y = net(emb, i) * scales[i]  # (N, L, (in + out)·r)
        n_in, n_out = net.shapes[t]
        for j, key in enumerate(keymap[t]):
            out[f"{key}.lora_a"] = y[:, j, :n_in * r].reshape(-1, n_in, r)
            out[f"{key}.lora_b"] = y[:, j, n_in * r:].reshape(-1, r, n_out)
    if anchor is not None:
        out = {k: v + anchor[k].astype(mx.float32) for k, v in out.items()}
    return out


def zero_heads(net: Generator) -> None:
    """Output heads at zero: the residual G(e) is 0 for every task until it is trained."""
    for head in net.heads:
        head.weight = mx.zeros_like(head.weight)
        head.bias = mx.zeros_like(head.bias)


def _task_thetas(net: Generator, adapter, emb: mx.array, scales: list[float], keymap,
                 anchor: dict | None = None) -> list[dict]:
    """The adapter parameter tree the generator gives each of the N task embeddings (evaluated,
    so no gradient flows back into the generator from them)."""
    want = adapter.flat(adapter.init_params(0))
    theta = generated(net, emb, scales, keymap, anchor)
    mx.eval(theta)
    return [adapter.unflat({k: theta[k][j].astype(want[k].dtype) for k in want})
            for j in range(emb.shape[0])]


def e2e_gradients(net: Generator, adapter, scales: list[float], keymap, inner, emb: mx.array,
                  episodes: list, anchor: dict | None = None
                  ) -> tuple[list[float], list[float], dict]:
    """(query losses, query accuracies, the generator's gradient) for one meta-batch: task i's
    θᵢ = G(emb[i]), gᵢ = ∂L_query/∂θᵢ from ``meta.learner.task_contribution`` (``inner``: a
    MetaConfig, fomaml or maml, any number of inner steps), and the gradient of
    mean_i L_query(θᵢ(G)) through G as the vector-Jacobian product at (gᵢ): the gradient of the
    surrogate Σᵢ⟨θᵢ(G), gᵢ⟩ / n, gᵢ held constant. ``episodes``: (support, query) Batches.
    Reptile (``inner.algorithm``): gᵢ = θᵢ − φᵢ, the negated Reptile contribution, so a descent
    step on G moves each θᵢ toward its adapted φᵢ."""
    from mlx.utils import tree_map

    from metapeft.meta.learner import task_contribution

    want = adapter.flat(adapter.init_params(0))
    losses, hits, cots = [], [], []
    for th, (support, query) in zip(_task_thetas(net, adapter, emb, scales, keymap, anchor),
                                    episodes):
        loss, acc, g = task_contribution(adapter, inner, th, support, query)
        if inner.algorithm == "reptile":  # the contribution is φ − θ, the way θ should move
            g = tree_map(lambda c: -c, g)
        g = adapter.flat(tree_map(mx.stop_gradient, g))
        mx.eval(loss, acc, g)
        losses.append(loss.item())
        hits.append(acc.item())
        cots.append(g)
    cot = {k: mx.stack([g[k].astype(mx.float32) for g in cots]) for k in want}

    def surrogate(model):
        out = generated(model, emb, scales, keymap)  # the anchor is a constant: no gradient
        return sum((out[k] * cot[k]).sum() for k in cot) / len(episodes)

    _, grads = nn.value_and_grad(net, surrogate)(net)
    return losses, hits, grads


def _episodes(adapter, source, seeds) -> tuple[mx.array, list, list]:
    """(task embeddings, (support, query) Batches, tasks) of the pool's episodes ``seeds``."""
    from metapeft.library import task_embedding
    from metapeft.meta.batch import encode_episode

    tasks = [source.sample(s) for s in seeds]
    eps = [encode_episode(t, adapter.base.tokenizer, prepare=adapter.prepare) for t in tasks]
    emb = mx.array(np.asarray([task_embedding(adapter.base, t) for t in tasks], np.float32))
    return emb, [(e.support, e.query) for e in eps], tasks


def mean_query_loss(net: Generator, adapter, scales, keymap, inner, emb, episodes,
                    anchor: dict | None = None) -> float:
    """The mean query loss of the generated LoRAs after ``inner.inner_steps`` support steps."""
    from metapeft.meta.learner import inner_adapt
    from metapeft.train import batch_loss

    out = []
    for th, (support, query) in zip(_task_thetas(net, adapter, emb, scales, keymap, anchor),
                                    episodes):
        loss = batch_loss(adapter, inner_adapt(adapter, th, support, inner), query)
        mx.eval(loss)
        out.append(loss.item())
    return float(np.mean(out))


def finetune_e2e(net: Generator, adapter, scales: list[float], keymap, cfg: E2E, *,
                 seed: int = 0, source=None, on_step=None, anchor: dict | None = None,
                 inner_lr: float | None = None) -> dict:
    """Stage 2 (module doc): ``cfg.steps`` Adam steps of the generator on the mean query loss of
    its θ (after ``cfg.inner_steps`` support steps) over fresh meta-train episodes. Returns the
    settings, the query-loss curve (before each step) and ``validation``: the mean query loss
    on ``cfg.val_episodes`` fixed episodes of the pool that training never draws, before and
    after. ``anchor``: the flat tensors G's residual is added to; ``inner_lr``: the inner lr
    when ``cfg`` has none (an anchor's calibrated lr), else the adapter's default."""
    import mlx.optimizers as optim

    from metapeft.meta.learner import MetaConfig

    t0 = time.perf_counter()
    source = source if source is not None else cfg.source()
    inner = MetaConfig(algorithm=cfg.meta_algorithm, inner_steps=cfg.inner_steps,
                       inner_lr=cfg.inner_lr or inner_lr or type(adapter).default_lr,
                       inner_optimizer="adam")  # k = 0 is allowed here: no validate()
    opt = optim.Adam(learning_rate=cfg.lr)
    curve, accs, classes, tasks = [], [], set(), 0
    # validation: fixed episodes whose seeds training never draws (unseen episodes of the
    # pool's classes), scored before and after
    val = _episodes(adapter, source, [2_000_003 + seed * 100_003 + j
                                      for j in range(cfg.val_episodes)])[:2]
    val_before = mean_query_loss(net, adapter, scales, keymap, inner, *val, anchor) \
        if cfg.val_episodes else None

    for step in range(cfg.steps):  # episode seeds apart from `library build`'s seed + i
        emb, eps, drawn = _episodes(adapter, source, [
            1_000_003 + seed * 100_003 + step * cfg.meta_batch + j
            for j in range(cfg.meta_batch)])
        classes.update(label for t in drawn for label in t.labels)
        losses, hits, grads = e2e_gradients(net, adapter, scales, keymap, inner, emb, eps,
                                            anchor)
        opt.update(net, grads)
        mx.eval(net.parameters(), opt.state)
        tasks += len(eps)
        curve.append(float(np.mean(losses)))
        accs.append(float(np.mean(hits)))
        if on_step is not None:
            on_step("e2e", step + 1, curve[-1], accs[-1])
    order = ("exact (k = 0)" if cfg.inner_steps == 0 else "reptile"
             if inner.algorithm == "reptile" else
             "second" if inner.algorithm == "maml" else "first")
    return {"steps": cfg.steps, "inner_steps": cfg.inner_steps, "order": order,
            "algorithm": inner.algorithm,
            "inner_lr": inner.inner_lr, "inner_optimizer": inner.inner_optimizer,
            "lr": cfg.lr, "meta_batch": cfg.meta_batch, "tasks": tasks,
            "classes": len(classes), "data": cfg.data, "domains": cfg.domains,
            "exclude_domains": cfg.exclude_domains, "ways": cfg.ways, "shots": cfg.shots,
            "query": cfg.query,
            "query_loss_curve": [round(x, 5) for x in curve[:: max(1, len(curve) // 50)]],
            "query_loss_first": round(curve[0], 5) if curve else None,
            "query_loss_last": round(curve[-1], 5) if curve else None,
            "query_acc_last": round(accs[-1], 4) if accs else None,
            "validation": None if val_before is None else {
                "episodes": cfg.val_episodes, "query_loss_before": round(val_before, 5),
                "query_loss_after": round(mean_query_loss(net, adapter, scales, keymap,
                                                          inner, *val, anchor), 5)},
            "seconds": round(time.perf_counter() - t0, 3)}


def train_generator(adapter, *, registry=None, epochs: int | None = None, lr: float = 1e-3,
                    seed: int = 0, hidden: int = HIDDEN, e2e: E2E | None = None,
                    anchor: str | None = None, on_step=None) -> dict:
    """Train a generator on the library entries that fit ``adapter`` (a plain LoRA on the base
    model) and have a content embedding (``epochs`` reconstruction steps, default 400), then,
    with ``e2e``, fine-tune it end to end on the support/query loss; save it as the next
    version. With ``anchor`` (a registry name, NAME@V or file, as ``adapt --init`` takes) the
    generator is a residual on that init, trained end to end only (module doc). Returns its
    summary. ``on_step(phase, step, loss, acc)`` after every step (phase "reconstruction" or
    "e2e"; acc None in reconstruction)."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from metapeft import __version__
    from metapeft.artifacts import file_lock, save_safetensors
    from metapeft.library import candidates

    t0 = time.perf_counter()
    e2e = e2e or E2E()
    e2e.validate()
    if anchor is not None and epochs:
        raise UserError("an anchored generator has no reconstruction stage (the library LoRAs "
                        "were not trained from the anchor); drop --epochs", field="epochs")
    if anchor is not None and not e2e.steps:
        raise UserError("an anchored generator starts as the anchor itself; give --e2e-steps N "
                        "(and --data) to train it", field="e2e_steps")
    epochs = (0 if anchor is not None else 400) if epochs is None else epochs
    if epochs < 0:
        raise UserError(f"--epochs must be >= 0, got {epochs}", field="epochs")
    anchor_flat, anchor_meta = (None, {}) if anchor is None else _anchor(adapter, anchor,
                                                                         registry)
    usable, _ = candidates(adapter, registry)
    usable = [(e, a) for e, a in usable if e.embedding is not None]
    if len(usable) < 2:
        raise UserError(f"a generator needs at least 2 library LoRAs with a task embedding (add "
                        f"them with their task), found {len(usable)}", field="library")
    source = e2e.source() if e2e.steps else None  # bad pool or filters: fail before training
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
    net.set_input_stats(np.asarray(emb))
    if anchor_flat is not None:
        zero_heads(net)
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
        if on_step is not None:
            on_step("reconstruction", step + 1, float(loss.item()), None)
    if not curve:  # no reconstruction: the untrained network's error, for the record
        curve.append(round(float(loss_fn(net).item()), 6))
    rec_seconds = round(time.perf_counter() - t0, 3)
    stage2 = None
    if e2e.steps:
        step = stored_step_size(anchor_meta) if anchor_flat is not None else None
        stage2 = finetune_e2e(net, adapter, scales, _keymap(adapter, layers, names), e2e,
                              seed=seed, source=source, on_step=on_step, anchor=anchor_flat,
                              inner_lr=None if step is None else step["adapt_lr"])
    base = adapter.base
    meta = {"format": FORMAT, "base_model": base.model_id, "base_model_hash": base.fingerprint,
            "config": adapter.config.to_dict(), "rank": rank, "layers": layers,
            "types": {t: list(v) for t, v in types.items()}, "scales": scales,
            "hidden": hidden, "dim": int(emb.shape[1]), "entries": [e.id for e, _ in usable],
            "input": "centred on the entries' mean embedding, scaled to unit RMS",
            "epochs": epochs, "lr": lr, "loss_curve": curve, "final_loss": curve[-1],
            "training": {"reconstruction_steps": epochs, "reconstruction_lr": lr,
                         "reconstruction_seconds": rec_seconds, "seed": seed,
                         "e2e_steps": e2e.steps, "inner_steps": e2e.inner_steps if
                         e2e.steps else None, "e2e": stage2},
            "seconds": round(time.perf_counter() - t0, 3), "metapeft_version": __version__}
    tensors = dict(tree_flatten(net.parameters()))
    if anchor_flat is not None:  # INIT's tensors and calibrated step size travel with G
        meta["anchor"] = anchor_meta["describe"]
        meta.update({k: anchor_meta[k] for k in STEP_SIZE_KEYS if k in anchor_meta})
        tensors.update({ANCHOR_PREFIX + k: v for k, v in anchor_flat.items()})
    d = generators_dir(registry)
    d.mkdir(parents=True, exist_ok=True)
    with file_lock(d / ".lock"):
        version = 1 + max([int(p.stem[1:]) for p in d.glob("v*.safetensors")] or [0])
        meta["version"] = version
        path = save_safetensors(d / f"v{version:04d}.safetensors", tensors, meta)
    return {**{k: meta[k] for k in ("version", "entries", "final_loss", "loss_curve",
                                     "training", "seconds", "base_model")}, "path": str(path),
            "anchor": meta.get("anchor")}


STEP_SIZE_KEYS = ("adapt_lr", "adapt_lr_decay", "adapt_lr_calibration")


def _anchor(adapter, init: str, registry=None) -> tuple[dict, dict]:
    """(flat float32 tensors, header) of the anchor init, checked against ``adapter``; the
    header gains ``describe`` (NAME@VERSION or the path, as resolved now)."""
    from metapeft.adapter_io import describe_init, init_path, resolve_init
    from metapeft.artifacts import read_metadata

    if str(init).startswith("library:"):
        raise UserError("--anchor takes a meta-init (a registry name, NAME@V or a file), not a "
                        "library init", field="anchor")
    try:
        params = resolve_init(init, adapter, registry)
        meta = dict(read_metadata(init_path(init, registry)))
    except UserError as err:  # the same error, named for the option it came from
        raise UserError(err.message, path=err.path, field="anchor") from None
    meta["describe"] = describe_init(init, registry)
    flat = {k: v.astype(mx.float32) for k, v in adapter.flat(params).items()}
    mx.eval(flat)
    return flat, meta


def latest_generator(adapter, registry=None, version: int | None = None) -> tuple[Path, dict]:
    """(path, header) of the newest generator (or of ``version``) for this adapter's base model
    and structure."""
    from metapeft.artifacts import json_field, read_metadata
    from metapeft.library import STRUCTURE

    want = adapter.config.to_dict()
    d = generators_dir(registry)
    paths = sorted(d.glob("v*.safetensors"), reverse=True) if d.is_dir() else []
    if version is not None:
        paths = [p for p in paths if p.stem == f"v{version:04d}"]
        if not paths:
            raise UserError(f"no LoRA generator version {version} in the library", path=str(d),
                            field="init")
    for p in paths:
        meta = read_metadata(p)
        cfg = json_field(meta, "config") or {}
        if (meta.get("base_model_hash") == adapter.base.fingerprint
                and all(cfg.get(k) == want.get(k) for k in STRUCTURE)):
            return p, {k: json_field(meta, k) for k in meta}
    if version is not None:
        raise UserError(f"LoRA generator version {version} was trained for another base model "
                        "or LoRA structure", path=str(paths[0]), field="init")
    raise UserError("no LoRA generator for this base model and LoRA structure in the library; "
                    "train one with `metapeft library train-generator`", path=str(d),
                    field="init")


def load_generator(path, meta: dict) -> Generator:
    """The network of a generator file (``meta``: its header, as ``latest_generator`` gives)."""
    from mlx.utils import tree_unflatten

    from metapeft.artifacts import load_safetensors

    arrays, _ = load_safetensors(path)
    types = {t: tuple(v) for t, v in meta["types"].items()}
    net = Generator(int(meta["dim"]), list(meta["layers"]), types, int(meta["rank"]),
                    int(meta["hidden"]))
    net.update(tree_unflatten([(k, v) for k, v in arrays.items()
                               if not k.startswith(ANCHOR_PREFIX)]))
    return net


def load_anchor(path) -> dict | None:
    """An anchored generator's INIT tensors (flat, float32), or None for a plain generator."""
    from metapeft.artifacts import load_safetensors

    arrays, _ = load_safetensors(path)
    out = {k[len(ANCHOR_PREFIX):]: v.astype(mx.float32) for k, v in arrays.items()
           if k.startswith(ANCHOR_PREFIX)}
    return out or None


def generate_init(adapter, task, registry=None, version: int | None = None
                  ) -> tuple[dict, dict]:
    """(init params, report) for ``adapt --init library:generate[@V]``."""
    from metapeft.library import task_embedding

    t0 = time.perf_counter()
    path, meta = latest_generator(adapter, registry, version)
    net = load_generator(path, meta)
    e = mx.array(np.asarray([task_embedding(adapter.base, task)], np.float32))
    want = adapter.flat(adapter.init_params(0))
    anchor = load_anchor(path)
    try:
        out = generated(net, e, list(meta["scales"]),
                        _keymap(adapter, net.layers, net.type_names), anchor)
    except UserError as err:
        raise UserError(err.message, path=str(path), field="parameters") from None
    if set(out) != set(want) or (anchor is not None and set(anchor) != set(want)):
        raise UserError("the generator's modules do not match this adapter's", path=str(path),
                        field="parameters")
    params = adapter.unflat({k: out[k][0].astype(want[k].dtype) for k in want})
    training = meta.get("training") or {}
    return params, {"generator": str(path), "version": meta.get("version"),
                    "entries": len(meta.get("entries") or []),
                    "final_loss": meta.get("final_loss"),
                    "e2e_steps": training.get("e2e_steps", 0),
                    "inner_steps": training.get("inner_steps"),
                    **({"anchor": meta.get("anchor")} if anchor is not None else {}),
                    "seconds": round(time.perf_counter() - t0, 3)}

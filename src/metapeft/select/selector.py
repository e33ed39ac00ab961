"""The method selector: task embedding -> expected accuracy of every PEFT method (MLX).

Model. An ensemble of ``MEMBERS`` = 5 small MLPs, each fed ``[embedding, normalised features]``
and trained on a bootstrap resample of the experience tasks (different seeds) with a masked MSE.
Each predicts ``sigmoid(prior_m + shared(x) + dev_m(x))``: ``prior_m`` is the logit of method m's
mean accuracy over the training tasks, ``shared`` a task-difficulty term and ``dev_m`` a
method-specific deviation whose square is penalised (the output layer starts at zero, AdamW weight
decay). With weak or noisy evidence the ranking therefore stays at "the best method on average";
a method moves up only when the experience says so consistently. The penalty is picked from
(0.01, 0.1, 0.3, 1.0) on out-of-bag regret with the one-standard-error rule. The prediction is the members' mean, the
*uncertainty* their standard deviation. *Confidence* is P(best): softmax(mean prediction / T)
over the methods, with T fitted by minimising the negative log-likelihood of the observed winners
on out-of-bag predictions (each task scored only by members whose bootstrap left it out).

Hyperparameters. For each method: the best config (highest accuracy) among the ``k`` nearest
past tasks (in embedding space) that ran that method; otherwise the method's own defaults
(``Adapter.default_hyperparameters``: its ``default_lr`` and Config defaults).

Priors. With no (or too little) experience the ranking comes from documented priors:
LoRA > prototype > AdaLoRA > DoRA > prefix > P-tuning > prompt, the project's earlier few-shot
measurements (benchmarks/select_eval.py's synthetic sweep, 8 steps, gave LoRA 0.398 ~ DoRA 0.397 >
AdaLoRA 0.340 > P-tuning 0.324 > prefix 0.320 > prompt 0.311 mean query accuracy). The
training-free prototype (nearest class mean) tied LoRA on 40 tasks of that sweep (0.392 vs 0.371,
paired +0.020 +- 0.032) and beat it on 20 CLINC150 sweep tasks with stories260K at 8 steps
(0.588 vs 0.410, paired +0.178 +- 0.080, 17 of 20 tasks); it is second because LoRA at `adapt`'s default 20 steps is ahead of it on both
real models (README). The answer then says so, has no predicted accuracies, and reports low
confidence (at most 0.30).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from metapeft.errors import UserError
from metapeft.select.embedder import (TaskEmbedder, _mlp, nearest, normalise, profile_matrix,
                                      task_table, train_embedder)
from metapeft.select.features import FEATURE_NAMES, feature_vector

DEFAULTS_SOURCE = "method defaults"  # where hyperparameters come from without experience
MEMBERS = 5
HIDDEN = 32
MIN_TASKS = 3  # fewer tasks than this in the store: answer from priors
PRIOR_CONFIDENCE: tuple[float, ...] = (0.28, 0.20, 0.15, 0.12, 0.10, 0.08, 0.07)
PRIOR_REASON = ("no usable experience: ranking from documented priors (LoRA > prototype > AdaLoRA "
                "> DoRA > prefix > P-tuning > prompt), low confidence; run `metapeft sweep` and "
                "`metapeft train-selector` to learn from data")


def default_selector_dir() -> Path:
    from metapeft.registry import registry_root

    return registry_root() / "selector"


def default_hyperparameters(method: str) -> dict:
    """What ``adapt`` would run ``method`` with: the adapter's learning rate and options
    (``Adapter.default_hyperparameters``) plus the run-level steps and optimizer; a
    training-free method has its options only, and 0 steps."""
    from metapeft.adapters import get_adapter_class
    from metapeft.config import run_defaults

    cls = get_adapter_class(method)
    if cls.training_free:
        return {**cls.default_hyperparameters(), "steps": 0}
    run = run_defaults()
    return {**cls.default_hyperparameters(), "steps": run["steps"],
            "optimizer": run["optimizer"]}


# ----------------------------------------------------------------------------- the model

def _logits(out):
    """Net output (N, 1 + M) -> per-method logit offsets: a shared task-difficulty term plus a
    method-specific deviation."""
    return out[:, :1] + out[:, 1:]


def _members_forward(nets, x, prior_logit=None):
    import mlx.core as mx

    b = 0.0 if prior_logit is None else mx.array(np.asarray(prior_logit, np.float32))
    preds = [mx.sigmoid(b + _logits(n(x))) for n in nets]
    out = mx.stack(preds)
    mx.eval(out)
    return np.asarray(out, np.float64)  # (members, N, M)


def _softmax(x: np.ndarray, t: float, mask: np.ndarray | None = None) -> np.ndarray:
    z = x / max(t, 1e-6)
    if mask is not None:
        z = np.where(mask, z, -np.inf)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def fit_temperature(pred: np.ndarray, acc: np.ndarray, mask: np.ndarray) -> float:
    """T minimising the NLL of the observed winners (ties share the target) under
    softmax(pred / T) restricted to the observed methods."""
    ok = (mask.sum(1) >= 2) & np.isfinite(pred).all(1)
    if ok.sum() == 0:
        return 0.05
    p, a, m = pred[ok], np.where(mask[ok], acc[ok], -np.inf), mask[ok]
    target = (a >= a.max(1, keepdims=True) - 1e-9).astype(np.float64)
    target /= target.sum(1, keepdims=True)
    best_t, best_nll = 0.05, math.inf
    for t in np.logspace(-3, 0.5, 60):
        q = _softmax(p, t, m)
        nll = -(target * np.log(np.clip(q, 1e-12, 1))).sum(1).mean()
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


class MethodSelector:
    def __init__(self, embedder: TaskEmbedder, nets: list, methods: list[str], temperature: float,
                 ref_features: np.ndarray, ref_accuracy: np.ndarray, ref_info: list[dict],
                 info: dict | None = None, prior_logit: np.ndarray | None = None):
        self.embedder, self.nets, self.methods = embedder, nets, list(methods)
        self.prior_logit = (np.zeros(len(self.methods)) if prior_logit is None
                            else np.asarray(prior_logit, np.float64))
        self.temperature = temperature
        self.ref_features, self.ref_accuracy, self.ref_info = ref_features, ref_accuracy, ref_info
        self.info = info or {}
        self._ref_emb = embedder.embed(ref_features) if len(ref_features) else np.zeros((0, 1))

    # -- inference
    def _inputs(self, x: np.ndarray):
        import mlx.core as mx

        x = np.atleast_2d(np.asarray(x, np.float64))
        e = self.embedder.embed(x)
        z = normalise(x, self.embedder.mean, self.embedder.std)
        return mx.array(np.concatenate([e, z], 1).astype(np.float32)), e

    def predict(self, x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean (N, M), std (N, M), P(best) (N, M)) for raw feature vectors (N, F)."""
        inp, _ = self._inputs(x)
        p = _members_forward(self.nets, inp, self.prior_logit)
        mean, std = p.mean(0), p.std(0)
        return mean, std, _softmax(mean, self.temperature)

    def similar(self, x, k: int = 5, exclude: int | None = None) -> list[tuple[int, float]]:
        e = self.embedder.embed(x)[0]
        return nearest(e, self._ref_emb, k, exclude)

    def recommend(self, method: str, neighbours: list[tuple[int, float]]) -> tuple[dict, str]:
        """(hyperparameters, where from) for ``method`` given the nearest reference tasks."""
        j = self.methods.index(method) if method in self.methods else None
        best = None
        for i, _d in neighbours:
            hp = self.ref_info[i].get("best_hp", {}).get(method)
            if hp is None or j is None or not np.isfinite(self.ref_accuracy[i, j]):
                continue
            if best is None or self.ref_accuracy[i, j] > best[0]:
                best = (self.ref_accuracy[i, j], hp, self.ref_info[i].get("id", ""))
        if best is not None:
            return dict(best[1]), f"nearest task {best[2]}"
        return default_hyperparameters(method), DEFAULTS_SOURCE

    # -- persistence
    def save(self, out: str | Path) -> dict[str, Path]:
        from mlx.utils import tree_flatten

        from metapeft import __version__
        from metapeft.artifacts import save_safetensors

        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UserError("output path exists and is not a directory", path=str(out),
                            field="out")
        emb_path = self.embedder.save(out / "embedder.safetensors")
        arrays = {f"member{i}.{k}": v for i, n in enumerate(self.nets)
                  for k, v in tree_flatten(n.parameters())}
        arrays["ref_features"] = self.ref_features.astype(np.float32)
        arrays["ref_accuracy"] = self.ref_accuracy.astype(np.float32)
        arrays["prior_logit"] = self.prior_logit.astype(np.float32)
        meta = {"format": "metapeft-method-selector", "methods": self.methods,
                "members": len(self.nets), "hidden": HIDDEN, "temperature": self.temperature,
                "feature_names": list(FEATURE_NAMES), "ref": self.ref_info,
                "metapeft_version": __version__, **self.info}
        sel_path = save_safetensors(out / "selector.safetensors", arrays, meta)
        return {"embedder": emb_path, "selector": sel_path}

    @classmethod
    def load(cls, directory: str | Path) -> "MethodSelector":
        from mlx.utils import tree_unflatten

        from metapeft.artifacts import json_field, load_safetensors

        d = Path(directory)
        emb = TaskEmbedder.load(d / "embedder.safetensors")
        arrays, meta = load_safetensors(d / "selector.safetensors")
        where = str(d / "selector.safetensors")
        if meta.get("format") != "metapeft-method-selector":
            raise UserError("not a metapeft method selector", path=where, field="format")
        methods = json_field(meta, "methods")
        n_members, hidden = int(json_field(meta, "members")), int(json_field(meta, "hidden"))
        nets = []
        for i in range(n_members):
            net = _mlp(emb.dim + len(FEATURE_NAMES), hidden, len(methods) + 1, i)
            pre = f"member{i}."
            try:
                net.update(tree_unflatten([(k[len(pre):], v) for k, v in arrays.items()
                                           if k.startswith(pre)]))
            except Exception as e:
                raise UserError(f"selector weights do not fit: {e}", path=where) from None
            nets.append(net)
        ref_f = np.asarray(arrays["ref_features"], np.float64)
        ref_a = np.asarray(arrays["ref_accuracy"], np.float64)
        info = {k: json_field(meta, k) for k in ("num_tasks", "num_records", "trained_on",
                                                 "deviation_penalty", "oob_regret") if k in meta}
        prior = np.asarray(arrays["prior_logit"], np.float64) if "prior_logit" in arrays else None
        return cls(emb, nets, methods, float(json_field(meta, "temperature")), ref_f, ref_a,
                   json_field(meta, "ref") or [], info, prior)


def train_selector(records, *, methods: list[str] | None = None, members: int = MEMBERS,
                   epochs: int = 300, embed_epochs: int = 300, lr: float = 3e-3, seed: int = 0,
                   weight_decay: float = 1e-2,
                   deviation_penalty: float | tuple[float, ...] = (0.01, 0.1, 0.3, 1.0),
                   domain_weight: float | None = None, info: dict | None = None) -> MethodSelector:
    """Train the embedder, then the ensemble, from experience records."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    rows = task_table(records)
    if methods is None:
        methods = sorted({m for r in rows for m in r.accuracy})
    if len(rows) < 2 or len(methods) < 2:
        raise UserError(f"training the selector needs at least 2 tasks and 2 methods in the "
                        f"experience store (found {len(rows)} tasks, {len(methods)} methods); "
                        "run `metapeft sweep` first", field="experience")
    from metapeft.select.embedder import DOMAIN_WEIGHT

    emb = train_embedder(rows, methods, epochs=embed_epochs, seed=seed,
                         domain_weight=DOMAIN_WEIGHT if domain_weight is None else domain_weight)
    x = np.stack([r.features for r in rows])
    acc, mask = profile_matrix(rows, methods)
    e = emb.embed(x)
    inp = np.concatenate([e, normalise(x, emb.mean, emb.std)], 1).astype(np.float32)
    y = np.where(mask, acc, 0.0).astype(np.float32)
    w = mask.astype(np.float32)
    n = len(rows)

    # Shrinkage: every member predicts sigmoid(prior_logit + net(x)) with the net's last layer
    # zero-initialised and weight decay, so with little evidence the prediction stays at the
    # per-method mean accuracy of the training tasks (which ranks like "best method on average").
    col_mean = np.clip((y * w).sum(0) / np.maximum(w.sum(0), 1), 1e-3, 1 - 1e-3)
    prior_logit = np.log(col_mean / (1 - col_mean))
    b = mx.array(prior_logit.astype(np.float32))

    def fit(penalty: float):
        def loss_fn(model, xb, yb, wb):
            out = model(xb)
            p = mx.sigmoid(b + _logits(out))
            mse = mx.sum(wb * (p - yb) ** 2) / mx.maximum(mx.sum(wb), 1.0)
            # method-specific deviations are penalised, the shared difficulty term is not: a
            # method only leaves its average rank when the experience says so consistently
            return mse + penalty * mx.mean(out[:, 1:] ** 2)

        rng = np.random.default_rng(seed)
        nets, bags = [], []
        for k in range(members):
            idx = rng.integers(0, n, size=n) if members > 1 else np.arange(n)
            bags.append(set(idx.tolist()))
            net = _mlp(inp.shape[1], HIDDEN, len(methods) + 1, seed * 100 + k + 1)
            last = net.layers[-1]
            last.weight = mx.zeros_like(last.weight)
            last.bias = mx.zeros_like(last.bias)
            opt = optim.AdamW(learning_rate=lr, weight_decay=weight_decay)
            step = nn.value_and_grad(net, loss_fn)
            xb, yb, wb = mx.array(inp[idx]), mx.array(y[idx]), mx.array(w[idx])
            for _ in range(epochs):
                _loss, grads = step(net, xb, yb, wb)
                opt.update(net, grads)
                mx.eval(net.parameters(), opt.state)
            nets.append(net)
        preds = _members_forward(nets, mx.array(inp), prior_logit)  # (K, N, M)
        oob = np.full((n, len(methods)), np.nan)
        for i in range(n):
            ks = [k for k in range(members) if i not in bags[k]]
            if ks:
                oob[i] = preds[ks, i].mean(0)
        return nets, oob

    def oob_regrets(oob) -> np.ndarray:
        ok = np.isfinite(oob).all(1) & (mask.sum(1) >= 2)
        a = np.where(mask, acc, -np.inf)
        pick = np.argmax(np.where(mask, np.nan_to_num(oob, nan=-1.0), -np.inf), 1)
        return (a.max(1) - a[np.arange(n), pick])[ok]

    # The deviation penalty is chosen on out-of-bag regret with the one-standard-error rule: the
    # strongest penalty whose OOB regret is within one SE of the best. Clear method effects get a
    # weak penalty; noise (the usual case with few, small tasks) a strong one.
    fits = []
    for pen in sorted(np.atleast_1d(deviation_penalty).tolist(), reverse=True):
        nets, oob = fit(pen)
        fits.append((pen, nets, oob, oob_regrets(oob)))
    means = [float(r.mean()) if len(r) else math.inf for *_, r in fits]
    i_best = int(np.argmin(means))
    r_best = fits[i_best][3]
    se = float(r_best.std(ddof=1) / math.sqrt(len(r_best))) if len(r_best) > 1 else 0.0
    choice = next(i for i, m in enumerate(means) if m <= means[i_best] + se)
    penalty, nets, oob, _ = fits[choice]
    _r = means[choice]
    info = {**(info or {}), "deviation_penalty": penalty,
            "oob_regret": None if not math.isfinite(_r) else round(_r, 5)}
    temperature = fit_temperature(oob, acc, mask)
    ref_info = [{"id": r.id, "task": r.name, "domain": r.domain, "best_method": r.best_method,
                 "best_hp": r.best_hp} for r in rows]
    meta = {"num_tasks": n, "num_records": len(records), **(info or {})}
    return MethodSelector(emb, nets, methods, temperature, x, acc, ref_info, meta, prior_logit)


# ----------------------------------------------------------------------------- answering

def priors_answer(features: dict, top: int | None = None) -> dict:
    from metapeft.adapters import METHODS, PRIOR_ORDER

    order = [m for m in PRIOR_ORDER if m in METHODS] + [m for m in METHODS if m not in PRIOR_ORDER]
    conf = list(PRIOR_CONFIDENCE) + [0.05] * max(0, len(order) - len(PRIOR_CONFIDENCE))
    total = sum(conf[:len(order)])
    ranking = [{"method": m, "predicted_accuracy": None, "confidence": round(conf[i] / total, 4),
                "uncertainty": None, "hyperparameters": default_hyperparameters(m),
                "hyperparameters_from": DEFAULTS_SOURCE}
               for i, m in enumerate(order)]
    return {"features": features, "ranking": ranking[:top] if top else ranking,
            "similar_tasks": [], "source": "priors", "reason": PRIOR_REASON}


def answer(selector: MethodSelector, features: dict, *, top: int | None = None, k: int = 5,
           source: str = "selector") -> dict:
    """The ranking, similar tasks and a one-line reason for one task's features."""
    x = np.asarray([feature_vector(features)])
    mean, std, pbest = selector.predict(x)
    neigh = selector.similar(x, k)
    order = np.argsort(-mean[0], kind="stable")
    ranking = []
    for j in order:
        m = selector.methods[j]
        hp, where = selector.recommend(m, neigh)
        ranking.append({"method": m, "predicted_accuracy": round(float(mean[0, j]), 4),
                        "confidence": round(float(pbest[0, j]), 4),
                        "uncertainty": round(float(std[0, j]), 4), "hyperparameters": hp,
                        "hyperparameters_from": where})
    similar = [{"id": selector.ref_info[i].get("id", ""), "distance": round(d, 4),
                "best_method": selector.ref_info[i].get("best_method"),
                "task": selector.ref_info[i].get("task"),
                "domain": selector.ref_info[i].get("domain")} for i, d in neigh]
    best = ranking[0]
    runner = ranking[1] if len(ranking) > 1 else None
    won = [s["best_method"] for s in similar[:3]]
    reason = (f"{best['method']} is predicted best ({best['predicted_accuracy']:.0%}"
              + (f" vs {runner['predicted_accuracy']:.0%} for {runner['method']}" if runner else "")
              + f", P(best) {best['confidence']:.0%}) by a {len(selector.nets)}-model ensemble "
              f"trained on {len(selector.ref_info)} past tasks"
              + (f"; the nearest past tasks were won by {', '.join(map(str, won))}" if won else ""))
    return {"features": features, "ranking": ranking[:top] if top else ranking,
            "similar_tasks": similar, "source": source, "reason": reason}


def select(features: dict, *, selector_dir: str | Path | None = None, store=None,
           top: int | None = None, k: int = 5) -> dict:
    """Answer for a task's features: a trained selector (``selector_dir``, default
    ``<registry root>/selector``) if present; else one trained on the fly from the experience
    store when it holds at least ``MIN_TASKS`` tasks; else the documented priors."""
    from metapeft.experience import ExperienceStore

    d = Path(selector_dir) if selector_dir else default_selector_dir()
    if (d / "selector.safetensors").exists():
        return answer(MethodSelector.load(d), features, top=top, k=k)
    if selector_dir is not None:
        raise UserError("no trained selector here (expected selector.safetensors); run "
                        "`metapeft train-selector --out DIR`", path=str(d), field="selector")
    if not isinstance(store, ExperienceStore):
        store = ExperienceStore(store)
    records = store.load()
    rows = task_table(records)
    methods = {m for r in rows for m in r.accuracy}
    if len(rows) >= MIN_TASKS and len(methods) >= 2:
        sel = train_selector(records, epochs=200, embed_epochs=150)
        out = answer(sel, features, top=top, k=k, source="experience (selector trained now)")
        return out
    return priors_answer(features, top)


def public_json(result: dict) -> dict:
    """Exactly the documented keys of ``metapeft select --json``."""
    return {"features": result["features"],
            "ranking": [{k: r[k] for k in ("method", "predicted_accuracy", "confidence",
                                           "uncertainty", "hyperparameters")}
                        for r in result["ranking"]],
            "similar_tasks": [{k: s[k] for k in ("id", "distance", "best_method")}
                              for s in result["similar_tasks"]]}

"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form with importance-driven rank allocation.

Follows HF peft ``src/peft/tuners/adalora/`` (``layer.py``: ``SVDLinear``, ``RankAllocator``;
``model.py``: the orthogonal regulariser and ``update_and_allocate``; ``config.py``).

Forward (peft ``SVDLinear.forward``)::

    y = W x + (dropout(x) @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5)

with A (r, in) right singular vectors, E (r, 1) singular values, B (out, r) left singular
vectors, r = ``init_r``. peft initialises E = 0 and A, B ~ N(0, 0.02) (``reset_lora_parameters``),
so a fresh adapter is an exact no-op. ``scaling = lora_alpha if lora_alpha > 0 else r`` (peft
``update_layer``; *not* alpha / r) and ``ranknum = init_r`` for the whole run: masking a triplet
zeroes its E entry but never changes ``ranknum``, so the effective factor is
``lora_alpha / init_r``. peft inherits ``lora_alpha = 8`` from ``LoraConfig``; our default is 32,
the value of peft's own AdaLoRA example and of the paper's experiments.

Regulariser (peft ``AdaLoraModel.forward``)::

    orth_reg_weight * mean over every A and every B matrix of ||P P^T - I||_F   (A: P = A, B: P = B^T)

i.e. the *unsquared* Frobenius norm (``torch.norm(para_cov - I, p="fro")``), averaged over the
2 * n_modules matrices (``regu_loss / num_param``). The paper writes the squared norm; we follow
peft.

Rank allocation (peft ``RankAllocator``), after every optimizer step with that step's gradients:

* sensitivity ``I = |p * grad|`` for each entry of A, E, B (p = the params after the step);
* ``exp_avg_ipt = b1 * exp_avg_ipt + (1 - b1) * I``;
  ``exp_avg_unc = b2 * exp_avg_unc + (1 - b2) * |I - exp_avg_ipt|`` (updated ``exp_avg_ipt``);
* element score ``s = exp_avg_ipt * exp_avg_unc``; triplet score for rank i of a module:
  ``s_E[i] + mean_j s_A[i, j] + mean_j s_B[j, i]``;
* budget (peft ``budget_schedule``), init_bgt = init_r * n_modules, target_bgt = target_r * n_modules::

      step <= tinit:              budget = init_bgt,  no mask
      step >  T - tfinal:         budget = target_bgt, mask
      otherwise:                  c = 1 - (step - tinit) / (T - tfinal - tinit)
                                  budget = int((init_bgt - target_bgt) * c**3 + target_bgt)
                                  mask iff step % deltaT == 0

* masking: threshold = the (init_bgt - budget)-th smallest triplet score (``torch.kthvalue``),
  E entries with score <= threshold are set to 0;
* ``update_and_allocate``: sensitivities are updated while step < T - tfinal; at step
  T - tfinal the mask is forced (budget = target_bgt), the resulting rank pattern is stored and the
  sensitivities reset; after it the stored rank pattern is re-applied every step.

``T`` is ``config.total_step`` or, when that is None, the ``total_steps`` the train loop passes.
Masking happens on E itself (as peft does), so ``scoring_params`` returns the params as-is.

The allocator is the protocol's optax-style hook: ``init_state(params)`` gives zero EMAs and an
all-kept rank pattern, ``on_step(params, grads, state, step, T) -> (params, state)`` is written in
mx ops only (the k-th smallest score by ``mx.sort``), with ``step`` and ``T`` as Python numbers. So
the same allocator runs in ``adapt``, inside the meta-learner's traced (vmapped, differentiated)
inner loops and in validation: meta-training adapts the AdaLoRA that test time adapts. AdaLoRA
adapters are not loadable by mlx-lm (mlx-lm has no SVD adapter type).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from metapeft.adapters.base import (Adapter, AdapterConfig, check_num_layers,
                                    copy_and_check_targets)
from metapeft.adapters.lora import ALL_LINEAR
from metapeft.errors import UserError
from metapeft.scoring import Batch, score_candidates

LEAVES = ("lora_A", "lora_E", "lora_B")


@dataclass
class AdaLoRAConfig(AdapterConfig):
    init_r: int = 12
    target_r: int = 8
    lora_alpha: float = 32.0  # peft's LoraConfig default is 8; 32 as in peft's AdaLoRA example
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    num_layers: int = -1  # last N transformer blocks; -1 = all
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None  # None: the train loop's number of steps

    def validate(self) -> None:
        if self.init_r < 1:
            raise UserError(f"init_r must be >= 1, got {self.init_r}", field="init_r")
        if not 0 <= self.target_r <= self.init_r:
            raise UserError(f"target_r must be in [0, init_r={self.init_r}], got {self.target_r}",
                            field="target_r")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}", field="dropout")
        if not self.target_modules:
            raise UserError("target_modules is empty", field="target_modules")
        check_num_layers(self.num_layers)
        if self.tinit < 0:
            raise UserError(f"tinit must be >= 0, got {self.tinit}", field="tinit")
        if self.tfinal < 0:
            raise UserError(f"tfinal must be >= 0, got {self.tfinal}", field="tfinal")
        if self.deltaT < 1:
            raise UserError(f"deltaT must be >= 1, got {self.deltaT}", field="deltaT")
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not 0.0 < b < 1.0:
                raise UserError(f"{name} must be in (0, 1), got {b}", field=name)
        if self.orth_reg_weight < 0:
            raise UserError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}",
                            field="orth_reg_weight")
        if self.total_step is not None:
            if self.total_step < 1:
                raise UserError(f"total_step must be >= 1, got {self.total_step}",
                                field="total_step")
            self.check_schedule(self.total_step)

    @classmethod
    def repair(cls, options: dict) -> dict:
        """A drawn target_r above the drawn init_r is clipped to it."""
        if "target_r" in options and "init_r" in options:
            options["target_r"] = min(int(options["target_r"]), int(options["init_r"]))
        return options

    def check_schedule(self, total_step: int) -> None:
        """peft's check: the schedule must leave a budgeting phase, tinit < total_step - tfinal."""
        if self.tinit >= total_step - self.tfinal:
            raise UserError(f"tinit ({self.tinit}) must be < total_step - tfinal "
                            f"({total_step} - {self.tfinal}) so that a budgeting phase exists",
                            field="tinit")

    @property
    def scaling(self) -> float:
        return self.lora_alpha if self.lora_alpha > 0 else float(self.init_r)


class SVDLinear(nn.Module):
    """A frozen ``nn.Linear`` / ``nn.QuantizedLinear`` plus the SVD-form increment B diag(E) A."""

    def __init__(self, linear: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            in_dims = in_dims * 32 // linear.bits
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.ranknum = float(r)
        self.scaling = float(scaling)
        self.lora_A = mx.zeros((r, in_dims))
        self.lora_E = mx.zeros((r, 1))
        self.lora_B = mx.zeros((out_dims, r))

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ (self.lora_A * self.lora_E).T) @ self.lora_B.T
        return y + (z * (self.scaling / (self.ranknum + 1e-5))).astype(y.dtype)


def budget_schedule(step: int, *, init_bgt: int, target_bgt: int, tinit: int, tfinal: int,
                    total_step: int, deltaT: int) -> tuple[int, bool]:
    """(budget, mask now?) at ``step``, peft's cubic ``RankAllocator.budget_schedule``."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt)
    return budget, step % deltaT == 0


class AdaLoRA(Adapter):
    method = "adalora"
    Config = AdaLoRAConfig
    default_lr = 3e-3
    structural = ("init_r", "target_modules", "num_layers")
    swaps_layers = True

    def _attach(self) -> None:
        cfg = self.config
        self.model, self.num_layers = copy_and_check_targets(self.base.model, cfg.target_modules,
                                                             cfg.num_layers)
        n = len(self.model.layers)
        self.frozen_blocks = n - self.num_layers
        self.module_names: list[str] = []
        for li in range(n - self.num_layers, n):
            block = self.model.layers[li]
            mods = dict(block.named_modules())
            swaps = []
            for key in cfg.target_modules:
                mod = mods[key]
                if not isinstance(mod, (nn.Linear, nn.QuantizedLinear)):
                    raise UserError(f"target module '{key}' is a {type(mod).__name__}, not a "
                                    f"linear layer", field="target_modules")
                swaps.append((key, SVDLinear(mod, cfg.init_r, cfg.scaling, cfg.dropout)))
                self.module_names.append(f"model.layers.{li}.{key}")
            block.update_modules(tree_unflatten(swaps))
        self.model.freeze()
        self.model.unfreeze(keys=list(LEAVES), strict=False)
        self.model.train(cfg.dropout > 0)
        self._template = self.model.trainable_parameters()
        self.init_bgt = cfg.init_r * len(self.module_names)
        self.target_bgt = cfg.target_r * len(self.module_names)

    def init_params(self, seed: int = 0) -> dict:
        key = mx.random.key(seed)
        flat = tree_flatten(self._template)
        keys = mx.random.split(key, max(len(flat), 1))
        out = []
        for i, (path, value) in enumerate(flat):
            leaf = path.rsplit(".", 1)[-1]
            if leaf in ("lora_A", "lora_B"):
                value = 0.02 * mx.random.normal(value.shape, key=keys[i])
            else:  # lora_E
                value = mx.zeros(value.shape, value.dtype)
            out.append((path, value))
        return tree_unflatten(out)

    def scores(self, params: dict, batch: Batch) -> mx.array:
        self.model.update(params)
        return score_candidates(self.model, batch, start=self.frozen_blocks)

    def regularizer(self, params: dict) -> mx.array | None:
        w = self.config.orth_reg_weight
        if w <= 0:
            return None
        terms = []
        for path, p in tree_flatten(params):
            leaf = path.rsplit(".", 1)[-1]
            if leaf == "lora_A":
                cov = p @ p.T
            elif leaf == "lora_B":
                cov = p.T @ p
            else:
                continue
            d = cov - mx.eye(cov.shape[0], dtype=cov.dtype)
            # ||d||_F with a floor so the gradient stays finite at an exactly orthonormal P
            terms.append(mx.sqrt(mx.maximum(mx.sum(d * d), 1e-30)))
        if not terms:
            return None
        return w * (sum(terms) / len(terms))

    # --- rank allocation (the protocol's step hook) -----------------------------------------
    def total_step(self, total_steps: int) -> int:
        return self.config.total_step if self.config.total_step is not None else int(total_steps)

    def schedule(self, step: int, total_steps: int) -> tuple[int, bool]:
        c = self.config
        return budget_schedule(step, init_bgt=self.init_bgt, target_bgt=self.target_bgt,
                               tinit=c.tinit, tfinal=c.tfinal,
                               total_step=self.total_step(total_steps), deltaT=c.deltaT)

    def init_state(self, params: dict) -> dict:
        """Zero sensitivity EMAs (peft starts from zeros too), every rank kept, the full budget.
        ``scored`` (a Python bool) says whether any sensitivity was recorded: masking on all-zero
        scores would drop every rank."""
        zeros = {path: mx.zeros(v.shape, mx.float32) for path, v in tree_flatten(params)
                 if path.rsplit(".", 1)[-1] in LEAVES}
        r = self.config.init_r
        return {"ipt": zeros, "unc": dict(zeros),
                "pattern": {n: mx.ones((r, 1), mx.float32) for n in self.module_names},
                "budget": self.init_bgt, "scored": False, "final": False}

    def _update_ipt(self, state: dict, params: dict, grads: dict) -> dict:
        b1, b2 = self.config.beta1, self.config.beta2
        p_flat = dict(tree_flatten(params))
        ipt_avg, unc_avg = dict(state["ipt"]), dict(state["unc"])
        for path, g in tree_flatten(grads):
            if path not in ipt_avg or path not in p_flat:
                continue
            # sensitivities steer the mask; they are not part of what MAML differentiates
            ipt = mx.stop_gradient(mx.abs(p_flat[path].astype(mx.float32) * g.astype(mx.float32)))
            avg = b1 * ipt_avg[path] + (1 - b1) * ipt
            unc_avg[path] = b2 * unc_avg[path] + (1 - b2) * mx.abs(ipt - avg)
            ipt_avg[path] = avg
        return {**state, "ipt": ipt_avg, "unc": unc_avg, "scored": True}

    def triplet_scores(self, state: dict) -> dict[str, mx.array]:
        """Per module, the (r,) triplet scores s_E + mean_row s_A + mean_col s_B (peft)."""
        out = {}
        for name in self.module_names:
            s = {leaf: state["ipt"][f"{name}.{leaf}"] * state["unc"][f"{name}.{leaf}"]
                 for leaf in LEAVES}
            out[name] = (s["lora_E"].reshape(-1) + s["lora_A"].mean(axis=1)
                         + s["lora_B"].mean(axis=0))
        return out

    def _mask_to_budget(self, state: dict, budget: int) -> dict[str, mx.array]:
        """Keep-masks (r, 1): triplets scoring above the (init_bgt - budget)-th smallest score."""
        triplet = self.triplet_scores(state)
        k = self.init_bgt - budget
        if k <= 0:
            return {n: mx.ones((v.shape[0], 1), mx.float32) for n, v in triplet.items()}
        all_scores = mx.concatenate([triplet[n] for n in self.module_names])
        threshold = mx.sort(all_scores)[k - 1]  # torch.kthvalue(k)
        return {n: (v > threshold).astype(mx.float32)[:, None] for n, v in triplet.items()}

    @staticmethod
    def _apply_pattern(params: dict, pattern: dict[str, mx.array]) -> dict:
        flat = []
        for path, v in tree_flatten(params):
            name, leaf = path.rsplit(".", 1)
            if leaf == "lora_E" and name in pattern:
                v = v * pattern[name].astype(v.dtype)
            flat.append((path, v))
        return tree_unflatten(flat)

    def on_step(self, params: dict, grads: dict | None, state: dict, step: int,
                total_steps: int) -> tuple[dict, dict]:
        """peft's ``update_and_allocate(step)``: params with E masked where due, and new state."""
        c = self.config
        T = self.total_step(total_steps)
        c.check_schedule(T)
        boundary = T - c.tfinal
        if step < boundary:
            if grads is not None:
                state = self._update_ipt(state, params, grads)
            budget, mask_ind = self.schedule(step, total_steps)
            if mask_ind and state["scored"]:
                pattern = self._mask_to_budget(state, budget)
                state = {**state, "pattern": pattern, "budget": budget}
                return self._apply_pattern(params, pattern), state
            return params, state
        if step == boundary and state["scored"]:
            # force the final mask with the target budget (peft does not update ipt here)
            pattern = self._mask_to_budget(state, self.target_bgt)
            state = {**state, "pattern": pattern, "budget": self.target_bgt, "final": True}
        if state["final"]:
            return self._apply_pattern(params, state["pattern"]), state
        return params, state

    def rank_counts(self, params: dict) -> dict[str, int]:
        """Nonzero E entries (the live rank) per module."""
        out = {}
        for path, v in tree_flatten(params):
            name, leaf = path.rsplit(".", 1)
            if leaf == "lora_E":
                out[name] = int(np.count_nonzero(np.array(v)))
        return out

    def metadata(self, params: dict | None = None, **extra) -> dict[str, str]:
        """With ``params``, the header records the kept ranks (nonzero E entries) per module, as
        peft's ``rank_pattern``."""
        if params is not None and "rank_pattern" not in extra:
            extra["rank_pattern"] = {
                path.rsplit(".", 1)[0]: [bool(b) for b in np.array(v).reshape(-1) != 0]
                for path, v in tree_flatten(params) if path.endswith(".lora_E")}
        return super().metadata(params, **extra)

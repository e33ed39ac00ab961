"""LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024), using mlx-lm's own layers.

y = W x + s * B A x with s = alpha / r (or alpha / sqrt(r) with rsLoRA), A kaiming-uniform
(bound 1/sqrt(fan_in), PyTorch's default that HF peft keeps) and B = 0, so a fresh adapter is a
no-op. mlx-lm stores A as (in, r) and B as (r, out); we keep that layout, so the saved
``adapters.safetensors`` + ``adapter_config.json`` load unchanged with
``mlx_lm.load(model, adapter_path=DIR)``. DoRA adds mlx-lm's learned magnitude ``m``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from metapeft.adapters.base import (Adapter, AdapterConfig, check_num_layers,
                                    copy_and_check_targets)
from metapeft.errors import UserError
from metapeft.scoring import Batch, score_candidates

ALL_LINEAR = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@dataclass
class LoRAConfig(AdapterConfig):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    # Last N transformer blocks (-1 = all). 16, by benchmarks/depth_ablation.py on SmolLM2-135M
    # (30 blocks; 8 meta-train-domain CLINC150 tasks, never the test domains): top-16 matched full
    # depth at steps 5/10 (94.5/96.5% vs 93.5/95.0%) at 1.8x less time per step, top-8 was 2
    # points lower. Models with at most 16 blocks (stories260K, the tiny model) adapt every block.
    num_layers: int = 16
    use_rslora: bool = False
    use_dora: bool = False

    def validate(self) -> None:
        if self.rank < 1:
            raise UserError(f"rank must be >= 1, got {self.rank}", field="rank")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}", field="dropout")
        if not self.target_modules:
            raise UserError("target_modules is empty", field="target_modules")
        check_num_layers(self.num_layers)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRA(Adapter):
    method = "lora"
    Config = LoRAConfig
    default_lr = 1e-3
    structural = ("rank", "target_modules", "num_layers")
    swaps_layers = True

    def _attach(self) -> None:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        cfg = self.config
        self.model, self.num_layers = copy_and_check_targets(self.base.model, cfg.target_modules,
                                                             cfg.num_layers)
        self.frozen_blocks = len(self.model.layers) - self.num_layers
        linear_to_lora_layers(self.model, self.num_layers, self.mlx_lm_parameters(),
                              use_dora=cfg.use_dora)
        self.model.freeze()
        leaves = ["lora_a", "lora_b"] + (["m"] if cfg.use_dora else [])
        self.model.unfreeze(keys=leaves, strict=False)
        self.model.train(cfg.dropout > 0)
        self._template = self.model.trainable_parameters()

    def mlx_lm_parameters(self) -> dict:
        c = self.config
        return {"rank": c.rank, "scale": c.scale, "dropout": c.dropout, "keys": list(c.target_modules)}

    def init_params(self, seed: int = 0) -> dict:
        key = mx.random.key(seed)
        flat = tree_flatten(self._template)
        keys = mx.random.split(key, max(len(flat), 1))
        out = []
        for i, (path, value) in enumerate(flat):
            leaf = path.rsplit(".", 1)[-1]
            if leaf == "lora_a":
                bound = 1.0 / math.sqrt(value.shape[0])
                value = mx.random.uniform(-bound, bound, value.shape, key=keys[i])
            elif leaf == "lora_b":
                value = mx.zeros(value.shape, value.dtype)
            out.append((path, value))  # DoRA's m keeps its init, ||W|| per output row
        return tree_unflatten(out)

    def scores(self, params: dict, batch: Batch) -> mx.array:
        self.model.update(params)
        return score_candidates(self.model, batch, start=self.frozen_blocks)

    def widened(self, times: int) -> "LoRA":
        """This LoRA (targets, depth and scale) at ``times`` × the rank, attached to the same base:
        room for ``times`` LoRAs side by side (``side_by_side``), whose summed update it then
        computes exactly. The scale alpha/r (or alpha/√r) is kept by growing alpha with r."""
        c = self.config
        grow = math.sqrt(times) if c.use_rslora else times
        return type(self).attach(self.base, {**c.to_dict(), "rank": c.rank * times,
                                             "alpha": c.alpha * grow})

    @staticmethod
    def side_by_side(flats: list[dict], weights) -> dict:
        """One flat tree (for ``widened(len(flats))``) whose update is Σ wᵢ·sBᵢAᵢ exactly: each
        module's As (in, r) side by side, each times its weight, over its Bs (r, out) stacked,
        since x·[w₁a₁ … wₙaₙ]·[b₁; …; bₙ] = Σ wᵢ·(x·aᵢ)·bᵢ. (Summing A and B separately, as
        LoraHub does, adds the cross terms aᵢ·bⱼ.)"""
        out = {}
        for key in flats[0]:
            leaf = key.rsplit(".", 1)[-1]
            if leaf == "lora_a":
                out[key] = mx.concatenate([float(w) * f[key].astype(mx.float32)
                                           for w, f in zip(weights, flats)], axis=1)
            elif leaf == "lora_b":
                out[key] = mx.concatenate([f[key].astype(mx.float32) for f in flats], axis=0)
            else:
                raise UserError(f"'{key}' cannot be put side by side (plain LoRA only)",
                                field="method")
        return out

    @classmethod
    def compose_refusal(cls, config: dict) -> str | None:
        if config.get("use_dora"):
            return "DoRA's learned magnitude does not compose by a weighted sum of A and B"
        return None

    def mlx_lm_config(self) -> dict:
        return {"fine_tune_type": "dora" if self.config.use_dora else "lora",
                "num_layers": self.num_layers, "lora_parameters": self.mlx_lm_parameters()}

    @classmethod
    def to_peft(cls, arrays: dict, metadata: dict, source: str) -> tuple[dict, dict]:
        """HF peft's LoRA layout. mlx-lm stores ``lora_a`` as (in, r) and ``lora_b`` as (r, out);
        peft stores ``lora_A.weight`` as (r, in) and ``lora_B.weight`` as (out, r), under
        ``base_model.model.<module path>``. The scale alpha/r (or alpha/sqrt(r)) carries over as
        ``lora_alpha`` and ``use_rslora``."""
        import json

        import numpy as np

        cfg = json.loads(metadata.get("config", "{}"))
        _check_lora_shapes(arrays, cfg.get("rank"), source)
        tensors = {}
        for name, value in arrays.items():
            module, leaf = name.rsplit(".", 1)
            a = np.array(value.astype(mx.float32))
            key = f"base_model.model.{module}"
            if leaf == "lora_a":
                tensors[f"{key}.lora_A.weight"] = a.T.copy()
            elif leaf == "lora_b":
                tensors[f"{key}.lora_B.weight"] = a.T.copy()
            elif leaf == "m":  # DoRA magnitude
                tensors[f"{key}.lora_magnitude_vector"] = a
            else:
                raise UserError(f"unexpected tensor '{name}'", path=source, field="tensors")
        layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in arrays
                         if ".layers." in n})
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.get("rank", 8),
            "lora_alpha": cfg.get("alpha", 16.0), "lora_dropout": cfg.get("dropout", 0.0),
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in cfg.get("target_modules", [])}),
            "layers_to_transform": layers, "use_rslora": cfg.get("use_rslora", False),
            "use_dora": bool(cfg.get("use_dora", False)), "bias": "none",
            "fan_in_fan_out": False, "base_model_name_or_path": metadata.get("base_model"),
            "inference_mode": True,
        }
        return tensors, config


def _check_lora_shapes(arrays: dict, rank, source: str) -> None:
    """Refuse an adapter file whose A (in, r) and B (r, out) do not pair up: each module needs
    both, with the same rank r, which is the config's ``rank`` when it names one."""
    modules: dict[str, dict] = {}
    for name, value in arrays.items():
        module, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        modules.setdefault(module, {})[leaf] = tuple(value.shape)
    for module, leaves in sorted(modules.items()):
        a, b = leaves.get("lora_a"), leaves.get("lora_b")
        if a is None or b is None:
            raise UserError(f"'{module}' has {'lora_b' if a is None else 'lora_a'} without "
                            f"{'lora_a' if a is None else 'lora_b'}", path=source,
                            field="tensors")
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise UserError(f"'{module}': lora_a {a} and lora_b {b} do not pair up (expected "
                            "(in, r) and (r, out))", path=source, field="shape")
        if isinstance(rank, int) and a[1] != rank:
            raise UserError(f"'{module}': rank {a[1]} but the config says rank {rank}",
                            path=source, field="shape")


class DoRA(LoRA):
    """DoRA is LoRA with ``use_dora=True``; a separate name so ``--method dora`` reads naturally."""

    method = "dora"

    @dataclass
    class Config(LoRAConfig):
        use_dora: bool = True

"""Export a metapeft LoRA adapter to HF peft's layout (``adapter_model.safetensors`` +
``adapter_config.json``), so a PyTorch user can load it with ``PeftModel.from_pretrained``.

mlx-lm stores ``lora_a`` as (in, r) and ``lora_b`` as (r, out); peft stores ``lora_A.weight`` as
(r, in) and ``lora_B.weight`` as (out, r), under ``base_model.model.<module path>``. The scale
alpha/r (or alpha/sqrt(r)) carries over as ``lora_alpha`` and ``use_rslora``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from metapeft.artifacts import atomic_write_json, load_safetensors, save_safetensors
from metapeft.errors import UserError


def export_peft(adapter_dir: str | Path, out: str | Path) -> Path:
    import mlx.core as mx

    adapter_dir, out = Path(adapter_dir), Path(out)
    weights = adapter_dir / "adapters.safetensors"
    arrays, meta = load_safetensors(weights)
    method = meta.get("method")
    if method not in ("lora", "dora"):
        raise UserError(f"only LoRA/DoRA adapters export to peft, this one is '{method}'",
                        path=str(weights), field="method")
    cfg = json.loads(meta.get("config", "{}"))
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
            raise UserError(f"unexpected tensor '{name}'", path=str(weights), field="tensors")
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in arrays if ".layers." in n})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.get("rank", 8),
        "lora_alpha": cfg.get("alpha", 16.0), "lora_dropout": cfg.get("dropout", 0.0),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in cfg.get("target_modules", [])}),
        "layers_to_transform": layers, "use_rslora": cfg.get("use_rslora", False),
        "use_dora": method == "dora", "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": meta.get("base_model"), "inference_mode": True,
    }
    save_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    atomic_write_json(out / "adapter_config.json", config)
    return out

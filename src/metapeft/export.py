"""Export an adapter directory to another ecosystem's layout.

``peft``: HF peft's ``adapter_model.safetensors`` + ``adapter_config.json``, so a PyTorch user can
load it with ``PeftModel.from_pretrained``. Each adapter says whether and how it converts
(``Adapter.to_peft``); this module only reads, refuses and writes.
"""

from __future__ import annotations

from pathlib import Path

from metapeft.adapter_io import WEIGHTS_FILE, read_adapter
from metapeft.artifacts import atomic_write_json, save_safetensors, writable_dir
from metapeft.errors import UserError


def export_peft(adapter_dir: str | Path, out: str | Path) -> Path:
    from metapeft.adapters import get_adapter_class
    from metapeft.adapters.stacked import STACK_METHOD

    adapter_dir, out = Path(adapter_dir), Path(out)
    if out.exists() and out.resolve() == adapter_dir.resolve():
        # peft's adapter_config.json would overwrite mlx-lm's, and mlx_lm.load would then fail
        raise UserError("--out must differ from the adapter directory (both layouts use "
                        "adapter_config.json)", path=str(out), field="out")
    weights, arrays, meta, method = read_adapter(adapter_dir / WEIGHTS_FILE)
    writable_dir(out, field="out")
    if method == STACK_METHOD:
        raise UserError("a two-stage adapter (`adapt --switch auto`) has no single HF peft "
                        "equivalent to export to", path=str(weights), field="method")
    converted = get_adapter_class(method).to_peft(arrays, meta, str(weights))
    if converted is None:
        raise UserError(f"'{method}' adapters have no HF peft equivalent to export to",
                        path=str(weights), field="method")
    tensors, config = converted
    save_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    atomic_write_json(out / "adapter_config.json", config)
    return out

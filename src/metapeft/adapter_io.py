"""Adapter directories on disk: ``adapters.safetensors`` (weights, metadata in the header) and
``adapter_config.json``, and the ``--init`` argument that names one.

``save_adapter`` writes what ``adapt --out`` produces; for methods with an mlx-lm equivalent
(``Adapter.mlx_lm_config``) the config is mlx-lm's own, so ``mlx_lm.load(model, adapter_path=out)``
works. ``load_adapter`` reads it back; ``init_path`` / ``resolve_init`` turn ``--init`` (a file,
an adapter directory or registry ``NAME[@VERSION]``) into a file and into parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

from metapeft import __version__
from metapeft.artifacts import atomic_write_json, load_safetensors, save_safetensors
from metapeft.errors import UserError

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def init_path(init: str | Path, registry: str | Path | None = None) -> Path:
    """The safetensors file ``init`` names: itself, ``DIR/adapters.safetensors`` for an adapter
    directory, or a version in the meta-weights registry (``NAME[@VERSION]``)."""
    path = Path(init)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.exists():
        from metapeft.registry import resolve

        path = resolve(str(init), registry)
    return path


def resolve_init(init: str | Path | None, adapter, registry: str | Path | None = None
                 ) -> dict | None:
    """Initial adapter params from ``init`` (see ``init_path``), checked against ``adapter``;
    ``None`` for a fresh init."""
    if init is None:
        return None
    path = init_path(init, registry)
    arrays, meta = load_safetensors(path)
    return adapter.check_compatible(adapter.unflat(arrays), meta, str(path))


def save_adapter(out: str | Path, adapter, params: dict, extra: dict | None = None) -> Path:
    """Write ``out/adapters.safetensors`` (metadata in the header) and ``out/adapter_config.json``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError("output path exists and is not a directory", path=str(out), field="out")
    params = adapter.scoring_params(params)
    save_safetensors(out / WEIGHTS_FILE, adapter.flat(params),
                     adapter.metadata(params, **(extra or {})))
    config = {"metapeft_version": __version__, "method": adapter.method,
              "config": adapter.config.to_dict(), "model": adapter.base.path,
              "base_model": adapter.base.model_id, "base_model_hash": adapter.base.fingerprint}
    config.update(adapter.mlx_lm_config() or {})
    atomic_write_json(out / CONFIG_FILE, config)
    return out


def read_adapter(path: str | Path) -> tuple[Path, dict, dict, str]:
    """(weights file, arrays, header metadata, method) of an adapter directory or weights file."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    arrays, meta = load_safetensors(weights)
    method = meta.get("method")
    if method is None:
        raise UserError("no 'method' in the safetensors header; not a metapeft adapter",
                        path=str(weights), field="method")
    return weights, arrays, meta, method


def load_adapter(path: str | Path, model: str | None = None, *, dequantize: str = "auto"):
    """(adapter, params) from a directory (or weights file) written by ``save_adapter``, attached
    to ``model`` (default: the base model named in the file's header)."""
    from metapeft.adapters import get_adapter_class
    from metapeft.models import DEFAULT_MODEL, load_base_model

    weights, arrays, meta, method = read_adapter(path)
    cls = get_adapter_class(method)
    config = json.loads(meta.get("config", "{}"))
    base = load_base_model(model or meta.get("base_model") or DEFAULT_MODEL, dequantize=dequantize)
    adapter = cls.attach(base, cls.Config.from_dict(config, source=str(weights)))
    return adapter, adapter.check_compatible(adapter.unflat(arrays), meta, str(weights))

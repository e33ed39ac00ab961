"""A local, versioned registry of meta-weights.

Layout (``<root>`` from :func:`registry_root`)::

    <root>/weights/<NAME>/v0001.safetensors   one file per version, metadata in the header
    <root>/weights/<NAME>/v0002.safetensors
    <root>/weights/<NAME>/LATEST              the version number that "latest" means
    <root>/weights/<NAME>/NEXT                the next version number to hand out
    <root>/weights/<NAME>/checkpoint.safetensors   in-progress meta-training checkpoint
    <root>/weights/<NAME>/.lock               flock'ed around every mutation

Specs are ``NAME``, ``NAME@latest``, ``NAME@3`` or ``NAME@v3``.

Version numbers are never reused: a save allocates ``max(NEXT, highest existing + 1)`` and then
bumps ``NEXT``, so deleting the newest version (or all of them -- ``delete(NAME)`` keeps the
directory with its ``NEXT`` counter) does not let a later save recycle its number. Allocation,
the write and the ``LATEST`` update happen under an exclusive ``fcntl.flock`` on
``<NAME>/.lock``, so concurrent saves (threads or processes) get distinct versions, and every
file is written atomically (temp file + fsync + rename) via :mod:`metapeft.artifacts`.

``LATEST`` is advisory: if it is missing or names a deleted version, "latest" falls back to
the highest existing version.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from metapeft.artifacts import (
    atomic_write_text,
    file_lock,
    is_extra_tensor,
    json_field,
    load_safetensors,
    read_metadata,
    save_safetensors,
)
from metapeft.errors import UserError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_VERSION_FILE_RE = re.compile(r"v(\d{4,})\.safetensors")
_SPEC_VERSION_RE = re.compile(r"[vV]?(\d+)")
VOLATILE_KEYS = frozenset({"created", "name", "version", "duration_seconds"})

__all__ = [
    "checkpoint_path",
    "compare",
    "delete",
    "delete_plan",
    "latest_version",
    "list_versions",
    "list_weights",
    "name_dir",
    "parse_spec",
    "registry_root",
    "resolve",
    "rollback",
    "save_version",
    "show",
    "validate_name",
    "version_path",
    "weights_dir",
]


# ----------------------------------------------------------------------------- paths & names

def registry_root(registry: str | Path | None = None) -> Path:
    """``registry`` if given, else ``$METAPEFT_HOME``, else ``$XDG_DATA_HOME/metapeft``, else
    ``~/.local/share/metapeft``."""
    if registry is not None and str(registry) != "":
        return Path(registry).expanduser()
    home = os.environ.get("METAPEFT_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return Path(xdg).expanduser() / "metapeft"
    return Path.home() / ".local" / "share" / "metapeft"


def weights_dir(registry: str | Path | None = None) -> Path:
    return registry_root(registry) / "weights"


def validate_name(name: str, what: str = "meta-weights name") -> str:
    """``name`` if it is safe as one path component under the registry root (meta-weights,
    schedules); a one-line ``UserError`` naming ``what`` otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UserError(f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-', "
                        "starting with a letter or digit", field="name")
    return name


def name_dir(name: str, registry: str | Path | None = None) -> Path:
    return weights_dir(registry) / validate_name(name)


def checkpoint_path(name: str, registry: str | Path | None = None) -> Path:
    """Where the in-progress meta-training checkpoint of ``name`` lives."""
    return name_dir(name, registry) / "checkpoint.safetensors"


def version_path(name: str, version: int, registry: str | Path | None = None) -> Path:
    return name_dir(name, registry) / f"v{int(version):04d}.safetensors"


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``NAME`` / ``NAME@latest`` -> (NAME, None); ``NAME@3`` / ``NAME@v3`` -> (NAME, 3)."""
    if not isinstance(spec, str) or not spec:
        raise UserError(f"invalid meta-weights spec {spec!r}: expected NAME[@VERSION]",
                        field="name")
    name, sep, ver = spec.partition("@")
    if not NAME_RE.fullmatch(name):
        raise UserError(f"invalid meta-weights spec {spec!r}: expected NAME[@VERSION] with NAME "
                        "made of letters, digits, '.', '_' and '-'", field="name")
    if not sep or ver.lower() == "latest":
        return name, None
    m = _SPEC_VERSION_RE.fullmatch(ver)
    if not m or int(m.group(1)) < 1:
        raise UserError(f"invalid version in meta-weights spec {spec!r}: expected a positive "
                        "number (3 or v3) or 'latest'", field="version")
    return name, int(m.group(1))


# ----------------------------------------------------------------------------- state

def _locked(d: Path):
    """The exclusive lock on one name's directory, held around every mutation."""
    return file_lock(d / ".lock")


def _scan(d: Path) -> list[int]:
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _VERSION_FILE_RE.fullmatch(p.name)
        if m and p.is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def _read_int(p: Path) -> int | None:
    try:
        return int(p.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def list_versions(name: str, registry: str | Path | None = None) -> list[int]:
    """The existing version numbers of ``name``, ascending."""
    return _scan(name_dir(name, registry))


def _latest_in(d: Path, versions: list[int]) -> int | None:
    if not versions:
        return None
    v = _read_int(d / "LATEST")
    return v if v in versions else versions[-1]


def latest_version(name: str, registry: str | Path | None = None) -> int | None:
    """The version "latest" means (``LATEST``, else the highest existing), or None."""
    d = name_dir(name, registry)
    return _latest_in(d, _scan(d))


def _names(registry) -> list[str]:
    w = weights_dir(registry)
    if not w.is_dir():
        return []
    return sorted(p.name for p in w.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))


# ----------------------------------------------------------------------------- save / resolve

def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def save_version(name: str, arrays: dict, metadata: dict[str, Any] | None = None,
                 registry: str | Path | None = None) -> tuple[int, Path]:
    """Store ``arrays`` as the next version of ``name`` and make it the latest.

    ``name``, ``version`` and ``created`` (UTC ISO time) are added to the metadata if absent
    (``version`` is always the allocated number). Returns ``(version, path)``.
    """
    d = name_dir(name, registry)
    with _locked(d):
        existing = _scan(d)
        version = max((existing[-1] + 1) if existing else 1, _read_int(d / "NEXT") or 1)
        meta = dict(metadata or {})
        meta.setdefault("name", name)
        meta["version"] = version
        meta.setdefault("created", _now())
        path = save_safetensors(d / f"v{version:04d}.safetensors", arrays, meta)
        atomic_write_text(d / "NEXT", f"{version + 1}\n")
        atomic_write_text(d / "LATEST", f"{version}\n")
    return version, path


def _missing(spec: str, name: str, version: int | None, registry,
             field: str = "init") -> UserError:
    """The one-line error for a spec that names nothing; ``field`` is the argument that gave
    it (``--init`` for a run, ``spec``/``name`` for the ``weights`` commands)."""
    root = registry_root(registry)
    versions = list_versions(name, registry)
    if versions:
        avail = ", ".join(str(v) for v in versions)
        return UserError(f"meta-weights {spec!r} not found in registry {root}: "
                         f"available versions of {name}: {avail}", field=field)
    names = [n for n in _names(registry) if _scan(weights_dir(registry) / n)]
    hint = f"available: {', '.join(names)}" if names else "the registry has no meta-weights"
    return UserError(f"no meta-weights named {name!r} in registry {root} ({hint})", field=field)


def _resolve(spec: str, registry, field: str = "init") -> tuple[str, int, Path]:
    name, version = parse_spec(spec)
    d = name_dir(name, registry)
    versions = _scan(d)
    if version is None:
        version = _latest_in(d, versions)
    if version is None or version not in versions:
        raise _missing(spec, name, version, registry, field)
    return name, version, d / f"v{version:04d}.safetensors"


def resolve(spec: str, registry: str | Path | None = None) -> Path:
    """The file of ``NAME[@VERSION]`` (latest when no version); a UserError when missing."""
    if (isinstance(spec, str) and ("/" in spec or os.sep in spec or spec.endswith(".safetensors"))
            and ("@" not in spec or "/" in spec.partition("@")[0])):
        raise UserError(f"{spec!r} is neither an existing file nor a registry spec "
                        "NAME[@VERSION]", path=spec, field="init")
    return _resolve(spec, registry)[2]


# ----------------------------------------------------------------------------- inspection

def _final(value: Any) -> Any:
    if isinstance(value, list):
        vals = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return vals[-1] if vals else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


def _row(name: str, version: int, latest: int | None, path: Path) -> dict[str, Any]:
    try:
        meta = read_metadata(path)
    except UserError:
        meta = {}
    return {
        "name": name, "version": version, "latest": version == latest,
        "method": json_field(meta, "method"), "algorithm": json_field(meta, "algorithm"),
        "base_model": json_field(meta, "base_model"), "created": json_field(meta, "created"),
        "num_tasks": json_field(meta, "num_tasks"),
        "meta_loss": _final(json_field(meta, "meta_loss")),
        "val_accuracy": _final(json_field(meta, "val_accuracy")),
        "size_bytes": path.stat().st_size if path.exists() else None,
        "path": str(path),
    }


def list_weights(registry: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per stored version (by name, then version): name, version, latest, method,
    algorithm, base_model, created, num_tasks, final meta_loss / val_accuracy, size_bytes, path."""
    rows = []
    for name in _names(registry):
        d = weights_dir(registry) / name
        versions = _scan(d)
        latest = _latest_in(d, versions)
        rows.extend(_row(name, v, latest, d / f"v{v:04d}.safetensors") for v in versions)
    return rows


def _header(path: Path) -> dict[str, Any]:
    read_metadata(path)  # clear UserError on a missing/corrupt file
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def show(spec: str, registry: str | Path | None = None) -> dict[str, Any]:
    """Decoded metadata plus tensor names/shapes/dtypes and the parameter count (header only)."""
    name, version, path = _resolve(spec, registry, "spec")
    header = _header(path)
    meta = dict(header.pop("__metadata__", None) or {})
    tensors = {k: {"shape": list(v.get("shape", [])), "dtype": v.get("dtype")}
               for k, v in sorted(header.items())}
    return {
        "name": name, "version": version,
        "latest": version == latest_version(name, registry),
        "path": str(path), "size_bytes": path.stat().st_size,
        "metadata": {k: json_field(meta, k) for k in sorted(meta)},
        "tensors": tensors,
        "num_tensors": sum(not is_extra_tensor(k) for k in tensors),
        "num_parameters": sum(math.prod(t["shape"]) for k, t in tensors.items()
                              if not is_extra_tensor(k)),  # EWC Fisher, inner-lr multipliers
    }


def _np(a):
    import mlx.core as mx
    import numpy as np

    return np.asarray(a.astype(mx.float32), dtype=np.float64).reshape(-1)


def compare(spec_a: str, spec_b: str, registry: str | Path | None = None) -> dict[str, Any]:
    """Metadata differences (volatile keys like ``created`` excluded), shape compatibility and,
    when tensor names and shapes match, the L2 distance / cosine similarity of the flattened
    parameter vectors plus per-tensor max abs differences."""
    import numpy as np

    out: dict[str, Any] = {}
    loaded = []
    for key, spec in (("a", spec_a), ("b", spec_b)):
        name, version, path = _resolve(spec, registry, "spec")
        arrays, meta = load_safetensors(path)
        arrays = {k: v for k, v in arrays.items() if not is_extra_tensor(k)}  # Fisher, inner lrs
        loaded.append((arrays, meta))
        out[key] = {"spec": spec, "name": name, "version": version, "path": str(path)}
    (arr_a, meta_a), (arr_b, meta_b) = loaded
    diff = {}
    for k in sorted(set(meta_a) | set(meta_b)):
        if k in VOLATILE_KEYS:
            continue
        va, vb = json_field(meta_a, k), json_field(meta_b, k)
        if va != vb:
            diff[k] = {"a": va, "b": vb}
    out["metadata_diff"] = diff
    only_a = sorted(set(arr_a) - set(arr_b))
    only_b = sorted(set(arr_b) - set(arr_a))
    common = sorted(set(arr_a) & set(arr_b))
    mismatch = {k: [list(arr_a[k].shape), list(arr_b[k].shape)] for k in common
                if tuple(arr_a[k].shape) != tuple(arr_b[k].shape)}
    compatible = not only_a and not only_b and not mismatch
    out.update(only_in_a=only_a, only_in_b=only_b, shape_mismatch=mismatch,
               compatible=compatible, num_parameters=sum(int(arr_a[k].size) for k in common))
    if not compatible:
        out.update(l2_distance=None, cosine_similarity=None, per_tensor_max_abs_diff=None,
                   max_abs_diff=None)
        return out
    sq = dot = na = nb = 0.0
    per = {}
    for k in common:
        a, b = _np(arr_a[k]), _np(arr_b[k])
        d = a - b
        sq += float(d @ d)
        dot += float(a @ b)
        na += float(a @ a)
        nb += float(b @ b)
        per[k] = float(np.max(np.abs(d))) if d.size else 0.0
    denom = math.sqrt(na) * math.sqrt(nb)
    out["l2_distance"] = math.sqrt(sq)
    out["cosine_similarity"] = dot / denom if denom > 0 else None
    out["per_tensor_max_abs_diff"] = per
    if per:
        worst = max(per, key=per.get)
        vals = list(per.values())
        out["max_abs_diff"] = {"max": per[worst], "tensor": worst,
                               "mean": sum(vals) / len(vals), "min": min(vals),
                               "identical_tensors": sum(v == 0.0 for v in vals)}
    else:
        out["max_abs_diff"] = None
    return out


# ----------------------------------------------------------------------------- mutation

def rollback(name: str, version: int | str, registry: str | Path | None = None) -> Path:
    """Make an existing earlier ``version`` the latest; nothing is deleted. Returns its path."""
    if isinstance(version, str):
        _, v = parse_spec(f"{name}@{version}")
        if v is None:
            raise UserError("rollback needs an explicit version number", field="version")
        version = v
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"invalid version {version!r}: expected a positive number",
                        field="version")
    d = name_dir(name, registry)
    if version not in _scan(d):  # checked before _locked, which would create the directory
        raise _missing(f"{name}@{version}", name, version, registry, "name")
    with _locked(d):
        if version not in _scan(d):
            raise _missing(f"{name}@{version}", name, version, registry, "name")
        atomic_write_text(d / "LATEST", f"{version}\n")
    return d / f"v{version:04d}.safetensors"


def delete_plan(spec: str, registry: str | Path | None = None) -> dict[str, Any]:
    """What ``delete(spec)`` would do, without doing it: ``{"name", "deleted": [versions],
    "latest": the latest now, "latest_after": the latest afterwards (None: no version left)}``;
    a one-line UserError when ``spec`` names nothing."""
    name, version = parse_spec(spec)
    d = name_dir(name, registry)
    versions = _scan(d)
    if not versions:
        raise _missing(spec, name, version, registry, "spec")
    latest = _latest_in(d, versions)
    targets = _delete_targets(spec, name, version, versions, latest, registry)
    remaining = [v for v in versions if v not in targets]
    after = latest if latest in remaining else (remaining[-1] if remaining else None)
    return {"name": name, "deleted": targets, "latest": latest, "latest_after": after}


def _delete_targets(spec: str, name: str, version, versions: list[int], latest,
                    registry) -> list[int]:
    """The versions ``spec`` deletes: the one it names (``@latest`` resolved), or all of them."""
    if "@" not in spec:
        return list(versions)
    v = latest if version is None else version
    if v not in versions:
        raise _missing(spec, name, version, registry, "spec")
    return [v]


def delete(spec: str, registry: str | Path | None = None) -> dict[str, Any]:
    """Delete one version (``NAME@V``, ``NAME@latest``) or every version (``NAME``).

    If the deleted version was the latest, ``LATEST`` moves to the highest remaining version.
    The ``NEXT`` counter (and any in-progress checkpoint) is kept, so numbers are never reused.
    Returns ``{"name", "deleted": [versions], "paths": [...], "latest": int | None}``.
    """
    name, version = parse_spec(spec)
    d = name_dir(name, registry)
    if not d.is_dir() or not _scan(d):
        raise _missing(spec, name, version, registry, "spec")
    with _locked(d):
        versions = _scan(d)
        latest = _latest_in(d, versions)
        if not versions:
            raise _missing(spec, name, version, registry, "spec")
        targets = _delete_targets(spec, name, version, versions, latest, registry)
        paths = []
        for v in targets:
            p = d / f"v{v:04d}.safetensors"
            p.unlink()
            paths.append(str(p))
        remaining = [v for v in versions if v not in targets]
        new_latest = latest if latest in remaining else (remaining[-1] if remaining else None)
        if new_latest is None:
            with contextlib.suppress(FileNotFoundError):
                (d / "LATEST").unlink()
        elif new_latest != latest or _read_int(d / "LATEST") != new_latest:
            atomic_write_text(d / "LATEST", f"{new_latest}\n")
        nxt = max(_read_int(d / "NEXT") or 1, max(versions) + 1)
        atomic_write_text(d / "NEXT", f"{nxt}\n")
    return {"name": name, "deleted": targets, "paths": paths, "latest": new_latest}


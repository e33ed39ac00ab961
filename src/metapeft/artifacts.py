"""Atomic, pickle-free artifact I/O: safetensors files with their metadata in the header.

Every write goes to a temp file in the destination directory, is fsync'ed, then renamed over the
target (and the directory fsync'ed), so an interrupted run never leaves a half-written artifact:
readers see either the previous file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metapeft.errors import UserError

# Tensors stored beside a version's parameters that are not parameters: ``fisher.<param>`` (the
# EWC Fisher, meta.continual) and ``inner_lr.<param>`` (per-layer inner-lr multipliers,
# meta.learner's per-layer mode). Loaders that build a parameter tree skip them.
EXTRA_TENSOR_PREFIXES = ("fisher.", "inner_lr.")


def is_extra_tensor(name: str) -> bool:
    return name.startswith(EXTRA_TENSOR_PREFIXES)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: str | Path, *, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``fcntl.flock`` on the file ``path`` (created if missing) for the body.
    Yields True once held; with ``blocking=False`` it yields False at once when another open
    file holds it (another process, or another ``file_lock`` here). The kernel drops the lock
    when its holder exits, however it exits (``kill -9`` included), so a lock is never stale.
    Where ``fcntl`` is missing (not POSIX) it yields True without locking."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield True
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def writable_dir(path: str | Path, *, field: str = "out") -> Path:
    """Check, before any work is done, that directory ``path`` can be created (or exists) and
    written to; a one-line UserError otherwise. Nothing is left behind: the check creates and
    removes one temporary directory in the nearest existing ancestor."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError("exists and is not a directory", path=str(path), field=field)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create it: {probe} is not a directory", path=str(path),
                        field=field)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".metapeft-write-check-", dir=probe))
    except OSError as e:
        raise UserError(f"cannot write here ({e.strerror or e})", path=str(path),
                        field=field) from None
    return path


def writable_file(path: str | Path, *, field: str = "out") -> Path:
    """Check that file ``path`` can be written (see ``writable_dir``): not a directory, and its
    directory can be created and written to."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError("is a directory, expected a file name", path=str(path), field=field)
    writable_dir(path.parent, field=field)
    return path


def _umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path: Path, write, tmp_suffix: str | None = None) -> Path:
    """Run ``write(tmp)`` on a temp file next to ``path``, fsync it and rename it over ``path``.

    ``tmp_suffix`` (default ``.tmp`` + the target's suffix) must be a name the writer keeps as is:
    ``mx.save_safetensors`` appends ``.safetensors`` to any other name, and then the empty temp
    file would be the one renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.",
                               suffix=tmp_suffix or ".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; artifacts follow the umask
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return _atomic(Path(path), write)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _meta_str(metadata: dict[str, Any] | None) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}


def save_safetensors(path: str | Path, arrays: dict, metadata: dict[str, Any] | None = None) -> Path:
    """Atomically write mlx or numpy ``arrays`` with string ``metadata`` (non-strings as JSON) to
    exactly ``path``, whatever its suffix."""
    import mlx.core as mx

    arrays = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in arrays.items()}
    meta = _meta_str(metadata)
    return _atomic(Path(path), lambda tmp: mx.save_safetensors(tmp, arrays, metadata=meta),
                   tmp_suffix=".tmp.safetensors")


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a safetensors file, without loading its tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100 * 2**20:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise UserError("file does not exist", path=str(path)) from None
    except (ValueError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError("not a safetensors file (unreadable header)", path=str(path)) from None
    return dict(header.get("__metadata__") or {})


def load_safetensors(path: str | Path) -> tuple[dict, dict[str, str]]:
    """(arrays, metadata) of a safetensors file; a one-line UserError when it is missing/corrupt."""
    import mlx.core as mx

    path = Path(path)
    if not path.exists():
        raise UserError("file does not exist", path=str(path))
    read_metadata(path)  # validates the header with a clear message
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:
        raise UserError(f"could not read safetensors: {e}", path=str(path)) from None
    return arrays, dict(meta or {})


def json_field(meta: dict[str, str], key: str, default: Any = None) -> Any:
    """Decode a JSON-encoded metadata field, falling back to the raw string."""
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, TypeError):
        return meta[key]

"""Platform set-up that must run before ``import mlx``.

On Linux the ``mlx[cpu]`` wheel links a slow reference BLAS (a 512x512 matmul takes ~90 ms on our
2-core CI machines). Loading the system OpenBLAS into the global symbol namespace first makes MLX
resolve its GEMM calls there (~8 ms for the same matmul, measured). Single-threaded OpenBLAS is
faster for the small matrices PEFT training uses and avoids oversubscribing MLX's own threads.

Switch it off with ``METAPEFT_BLAS=off``; point it at another library with ``METAPEFT_BLAS=/path``.
"""

from __future__ import annotations

import ctypes
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

BLAS_LOADED: str | None = None


def preload_blas() -> str | None:
    """Load OpenBLAS globally on Linux, before mlx. Returns the path loaded, or None."""
    global BLAS_LOADED
    if BLAS_LOADED is not None or not sys.platform.startswith("linux"):
        return BLAS_LOADED
    choice = os.environ.get("METAPEFT_BLAS", "auto")
    if choice.lower() in ("off", "0", "none", "false"):
        return None
    if "mlx.core" in sys.modules:  # too late: mlx already bound its BLAS symbols
        return None
    paths = _CANDIDATES if choice == "auto" else (choice,)
    for path in paths:
        if os.path.exists(path):
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            BLAS_LOADED = path
            return path
    return None


def memory_budget_bytes() -> tuple[int | None, str]:
    """(bytes a run may plan to use, where that number comes from): ``METAPEFT_MAX_MEMORY_GB``
    when set, else the machine's physical memory (None where it cannot be read)."""
    raw = os.environ.get("METAPEFT_MAX_MEMORY_GB", "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if value > 0:
            return int(value * 2**30), "METAPEFT_MAX_MEMORY_GB"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's memory"
    except (ValueError, OSError, AttributeError):
        return None, ""

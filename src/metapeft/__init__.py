"""metapeft: meta-learned PEFT for MLX.

Importing the package is cheap: it only preloads OpenBLAS on Linux (see ``platform.py``) so that
MLX, imported later and lazily, uses it.
"""

from metapeft.platform import preload_blas as _preload_blas

_preload_blas()

__version__ = "0.1.0"

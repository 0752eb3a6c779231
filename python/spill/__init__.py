"""spill: training with more memory than the GPU has, from Python.

A thin ctypes layer over spill's C API (``spill/spill.h``): configuration, statistics,
snapshots, traces and steps. The native library is loaded on first use, not at import, and
importing spill never imports torch or CuPy (``spill.torch`` and ``spill.cupy`` do).
"""
from __future__ import annotations

from typing import Any

from ._errors import (CudaError, Error, InvalidArgumentError, LibraryNotFoundError,
                      OutOfMemoryError)
from ._lib import library_path

__version__ = "0.1.0"

__all__ = [
    "CudaError", "Error", "InvalidArgumentError", "LibraryNotFoundError", "OutOfMemoryError",
    "library_path", "version",
]


def __getattr__(name: str) -> Any:
    # `spill.version` is the loaded library's version; reading it loads the library.
    if name == "version":
        from ._lib import library
        return library().spill_version().decode()
    raise AttributeError(f"module 'spill' has no attribute {name!r}")

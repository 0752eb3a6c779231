"""spill: training with more memory than the GPU has, from Python.

A thin ctypes layer over spill's C API (``spill/spill.h``): configuration, memory, residency,
steps, statistics, snapshots and traces. The native library is loaded on first use, not at
import (see :func:`library_path` for where it is looked for), and importing spill never imports
torch or CuPy (``spill.cupy`` and ``spill.torch`` do). Failures raise :class:`spill.Error`
subclasses carrying the C library's message. Devices are CUDA ordinals (each its own simulated
GPU with ``device:sim``); pointers and stream handles are integers.
"""
from __future__ import annotations

from typing import Any

from ._capi import PinToken, Status
from ._errors import (CudaError, Error, InvalidArgumentError, LibraryNotFoundError,
                      OutOfMemoryError, WriteFailedError)
from ._lib import library_path
from ._memory import (BlockInfo, block_info, discard, evict, free, generation, malloc, pin,
                      pin_for_host, prefetch, record_stream, residence, set_swappable,
                      stream_create, stream_destroy, stream_destroyed, stream_synchronize, unpin)
from ._observe import (block_name, last_oom_message, reset_peak_stats, set_block_name, snapshot,
                       stats, trace)
from ._runtime import (begin_op, begin_step, budget, configure, empty_cache, end_scope, end_step,
                       is_simulated, parse_size, set_budget, set_scope_name, shutdown, step,
                       step_key, write_step_graph)
from ._version import __version__

__all__ = [
    # errors
    "CudaError", "Error", "InvalidArgumentError", "LibraryNotFoundError", "OutOfMemoryError",
    "Status", "WriteFailedError",
    # lifecycle and configuration
    "configure", "shutdown", "is_simulated", "library_path", "__version__",
    "set_budget", "budget", "empty_cache", "parse_size",
    # steps
    "step", "begin_step", "end_step", "begin_op", "end_scope", "write_step_graph", "step_key",
    "set_scope_name",
    # observability
    "stats", "snapshot", "trace", "last_oom_message", "reset_peak_stats", "set_block_name",
    "block_name",
    # memory and residency
    "malloc", "free", "record_stream", "set_swappable", "pin", "pin_for_host", "unpin",
    "PinToken", "prefetch", "evict", "residence", "discard", "generation", "block_info",
    "BlockInfo",
    "stream_create", "stream_destroy", "stream_synchronize", "stream_destroyed",
]


def __getattr__(name: str) -> Any:
    # `spill.version` is the loaded library's version string; reading it loads the library
    # (which is why it is not in __all__: `from spill import *` loads nothing).
    if name == "version":
        from ._lib import library
        return library().spill_version().decode()
    raise AttributeError(f"module 'spill' has no attribute {name!r}")

"""ctypes prototypes of the C API (integrations/c/spill/spill.h), declared once on load, and
the one place that turns a failed call's status into an exception."""
from __future__ import annotations

import ctypes
from typing import NoReturn

from ._errors import (CudaError, Error, InvalidArgumentError, LibraryNotFoundError,
                      OutOfMemoryError, Status, WriteFailedError)

_c_void_p, _c_int, _c_size_t, _c_uint64 = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t,
                                            ctypes.c_uint64)
_status = ctypes.c_int


class PinToken(ctypes.Structure):
    """What :func:`spill.pin` returns and :func:`spill.unpin` takes (``spill_pin_token``).

    ``block`` is 0 for a block that never moves (unpinning it does nothing); ``generation``
    tells the block from a later one at the same address, so unpinning a token whose block was
    freed does nothing; ``pin`` tells this pin from the block's others, so that unpinning the
    token twice is refused while they still hold it.
    """

    _fields_ = [("block", ctypes.c_uint64), ("generation", ctypes.c_uint64),
                ("device", ctypes.c_int32), ("flags", ctypes.c_uint32), ("pin", ctypes.c_uint64)]

    @property
    def empty(self) -> bool:
        """True for the token of a block that never moves."""
        return self.block == 0

    def __repr__(self) -> str:
        return (f"PinToken(block={self.block:#x}, generation={self.generation}, "
                f"device={self.device}, flags={self.flags}, pin={self.pin})")


class BlockInfoStruct(ctypes.Structure):
    """``spill_block_info``, what ``spill_get_block_info`` fills (see :func:`spill.block_info`)."""

    _fields_ = [("base", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("generation", ctypes.c_uint64), ("residence", ctypes.c_int),
                ("movable", ctypes.c_int32), ("swappable", ctypes.c_int32),
                ("pins", ctypes.c_int32)]


# name: (restype, argtypes)
_PROTOTYPES = {
    "spill_status_string": (ctypes.c_char_p, [_status]),
    "spill_last_error": (ctypes.c_char_p, []),
    "spill_version": (ctypes.c_char_p, []),
    "spill_parse_size": (_status, [ctypes.c_char_p, ctypes.POINTER(_c_uint64)]),
    "spill_init": (_status, [ctypes.c_char_p]),
    "spill_shutdown": (_status, []),
    "spill_device_open": (_status, [_c_int, ctypes.POINTER(_c_int)]),
    "spill_stream_create": (_status, [_c_int, ctypes.POINTER(_c_void_p)]),
    "spill_stream_destroy": (_status, [_c_int, _c_void_p]),
    "spill_stream_synchronize": (_status, [_c_int, _c_void_p]),
    "spill_stream_destroyed": (_status, [_c_int, _c_void_p]),
    "spill_malloc": (_status, [ctypes.POINTER(_c_void_p), _c_size_t, _c_int, _c_void_p]),
    "spill_free": (_status, [_c_void_p, _c_int, _c_void_p]),
    "spill_record_stream": (_status, [_c_void_p, _c_void_p]),
    "spill_empty_cache": (_status, [_c_int]),
    "spill_set_budget": (_status, [_c_int, _c_uint64]),
    "spill_get_budget": (_status, [_c_int, ctypes.POINTER(_c_uint64)]),
    "spill_set_swappable": (_status, [_c_void_p, _c_int]),
    "spill_pin": (_status, [_c_void_p, _c_void_p, ctypes.POINTER(PinToken)]),
    "spill_pin_for_host": (_status, [_c_void_p, ctypes.POINTER(PinToken)]),
    "spill_unpin": (_status, [ctypes.POINTER(PinToken), _c_void_p, _c_int]),
    "spill_prefetch": (_status, [_c_void_p]),
    "spill_evict": (_status, [_c_void_p]),
    "spill_discard": (_status, [_c_void_p, _c_size_t]),
    "spill_get_residence": (_status, [_c_void_p, ctypes.POINTER(_c_int)]),
    "spill_get_generation": (_status, [_c_void_p, ctypes.POINTER(_c_uint64)]),
    "spill_get_block_info": (_status, [_c_void_p, ctypes.POINTER(BlockInfoStruct)]),
    "spill_begin_step": (_status, [_c_int, _c_uint64]),
    "spill_end_step": (_status, [_c_int, _c_uint64]),
    "spill_end_scope": (_status, [_c_int, _c_uint64]),
    "spill_begin_op": (_status, [_c_int, _c_uint64, ctypes.c_char_p]),
    "spill_set_scope": (_status, [_c_int, _c_uint64]),
    "spill_step_key": (_status, [_c_int, _c_uint64, _c_uint64]),
    "spill_set_scope_name": (_status, [_c_int, _c_uint64, ctypes.c_char_p]),
    "spill_write_step_graph": (_status, [_c_int, _c_uint64, ctypes.c_char_p]),
    "spill_string_free": (None, [_c_void_p]),
    "spill_stats_json": (_status, [_c_int, ctypes.POINTER(_c_void_p)]),
    "spill_snapshot_json": (_status, [_c_int, ctypes.POINTER(_c_void_p)]),
    "spill_trace_export": (_status, [ctypes.c_char_p]),
    "spill_last_oom_message": (_status, [_c_int, ctypes.POINTER(_c_void_p)]),
    "spill_reset_peak_stats": (_status, [_c_int]),
    "spill_get_stats": (_status, [_c_int, _c_void_p]),  # a caller-sized spill_stats
    "spill_take_allocated_peak": (_status, [_c_int, ctypes.POINTER(_c_uint64)]),
    "spill_set_oom_note": (_status, [_c_int, ctypes.c_char_p]),
    "spill_set_block_name": (_status, [_c_void_p, ctypes.c_char_p]),
    "spill_get_block_name": (_status, [_c_void_p, ctypes.POINTER(_c_void_p)]),
}


def declare(lib: ctypes.CDLL, path: str) -> None:
    """Sets argtypes/restype of every function the package calls; fails if one is missing."""
    missing = [name for name in _PROTOTYPES if not hasattr(lib, name)]
    if missing:
        raise LibraryNotFoundError(
            f"spill: {path} lacks C API functions this package needs: {', '.join(missing)} "
            "(an older libspill? set SPILL_LIBRARY to a matching build)")
    for name, (restype, argtypes) in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


_EXCEPTIONS = {
    Status.INVALID_ARGUMENT: InvalidArgumentError,
    Status.OUT_OF_MEMORY: OutOfMemoryError,
    Status.HOST_CAP: OutOfMemoryError,
    Status.CUDA: CudaError,
    Status.WRITE_FAILED: WriteFailedError,
}


def raise_status(lib: ctypes.CDLL, status: int) -> NoReturn:
    """Raises the exception for a failed call; call it on the thread that made the call (the C
    message is thread-local)."""
    message = (lib.spill_last_error() or b"").decode(errors="replace")
    try:
        code = Status(status)
    except ValueError:
        code = Status.INTERNAL
    if not message:
        message = lib.spill_status_string(status).decode(errors="replace")
    raise _EXCEPTIONS.get(code, Error)(message, code)

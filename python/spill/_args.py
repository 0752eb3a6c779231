"""Checks and conversions of Python arguments before they reach C: ctypes would silently wrap
a negative or oversized integer, so each one is checked here and rejected naming the input."""
from __future__ import annotations

import ctypes
import os
from typing import Any, Optional, Union

from ._errors import InvalidArgumentError

#: A stream: None (the default stream), an integer handle (a cudaStream_t, or a stream from
#: spill.stream_create), or an object carrying one (CuPy's ``.ptr``, PyTorch's
#: ``.cuda_stream``, or the ``__cuda_stream__`` protocol).
StreamLike = Union[None, int, Any]
PathLike = Union[str, "os.PathLike[str]"]


def integer(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"spill: {name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidArgumentError(f"spill: {name} {value} is outside [{lo}, {hi}]")
    return value


def device(value: Any) -> int:
    return integer(value, "device", 0, 2**31 - 1)


def size(value: Any, name: str = "size") -> int:
    return integer(value, name, 0, 2**64 - 1)


def scope(value: Any) -> int:
    return integer(value, "scope", 0, 2**64 - 1)


def pointer(value: Any) -> ctypes.c_void_p:
    return ctypes.c_void_p(integer(value, "pointer", 0, 2**64 - 1))


def stream(value: StreamLike) -> Optional[ctypes.c_void_p]:
    if value is None:
        return None
    if not isinstance(value, int):
        if hasattr(value, "__cuda_stream__"):
            value = value.__cuda_stream__()[1]
        elif hasattr(value, "cuda_stream"):
            value = value.cuda_stream
        elif hasattr(value, "ptr"):
            value = value.ptr
        else:
            raise InvalidArgumentError(
                f"spill: stream {value!r} is not a handle (int) nor an object with one "
                "(.ptr, .cuda_stream, __cuda_stream__)")
    handle = integer(value, "stream", 0, 2**64 - 1)
    return ctypes.c_void_p(handle) if handle else None


def path(value: PathLike, name: str = "path") -> bytes:
    text = os.fspath(value)
    if not isinstance(text, str) or not text:
        raise InvalidArgumentError(f"spill: {name} must be a non-empty path, got {value!r}")
    return os.fsencode(text)

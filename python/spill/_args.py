"""Checks and conversions of Python arguments before they reach C: ctypes would silently wrap
a negative or oversized integer, C would end a string at an embedded NUL, and any object has a
truth value, so each argument is checked here and rejected naming the input. A value of the
wrong type raises InvalidArgumentTypeError (also a TypeError), a bad value of the right type
InvalidArgumentError (a ValueError)."""
from __future__ import annotations

import ctypes
import operator
import os
from typing import Any, Optional, Union

from ._errors import InvalidArgumentError, InvalidArgumentTypeError

#: A stream: None (the default stream), an integer handle (a cudaStream_t, or a stream from
#: spill.stream_create), or an object carrying one (CuPy's ``.ptr``, PyTorch's
#: ``.cuda_stream``, or the ``__cuda_stream__`` protocol).
StreamLike = Union[None, int, Any]
PathLike = Union[str, "os.PathLike[str]"]


def integer(value: Any, name: str, lo: int, hi: int) -> int:
    """An int, or an integer of another type (NumPy's: ``np.int64``, ``np.prod(shape)``) by
    ``operator.index``; never a bool (a flag passed by mistake; NumPy's ``np.bool_`` too,
    which has ``__index__``) nor a float."""
    if not isinstance(value, int) or isinstance(value, bool):
        kind = type(value)
        numpy_bool = kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool")
        if isinstance(value, bool) or numpy_bool or not hasattr(kind, "__index__"):
            raise InvalidArgumentTypeError(
                f"spill: {name} must be an integer, got {value!r} ({type(value).__name__})")
        value = operator.index(value)
    if not lo <= value <= hi:
        raise InvalidArgumentError(f"spill: {name} {value} is outside [{lo}, {hi}]")
    return value


#: SPILL_MAX_DEVICES of spill.h: C refuses any ordinal from it on.
MAX_DEVICES = 64


def device(value: Any) -> int:
    try:
        return integer(value, "device", 0, MAX_DEVICES - 1)
    except InvalidArgumentTypeError:
        raise
    except InvalidArgumentError:  # say it as C does; [0, 63] reads as a size range
        raise InvalidArgumentError(f"spill: device {value} is not a device ordinal "
                                   f"(0 to {MAX_DEVICES - 1})") from None


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
            given = value.__cuda_stream__()  # (version, handle), the protocol says
            if not isinstance(given, tuple) or len(given) != 2:
                raise InvalidArgumentTypeError(
                    f"spill: stream {value!r}: __cuda_stream__() must return (version, handle), "
                    f"got {given!r}")
            value = given[1]
        elif hasattr(value, "cuda_stream"):
            value = value.cuda_stream
        elif hasattr(value, "ptr"):
            value = value.ptr
        else:
            raise InvalidArgumentTypeError(
                f"spill: stream {value!r} is not a handle (int) nor an object with one "
                "(.ptr, .cuda_stream, __cuda_stream__)")
    handle = integer(value, "stream", 0, 2**64 - 1)
    return ctypes.c_void_p(handle) if handle else None


def flag(value: Any, name: str) -> int:
    """A yes/no argument as the C API's 1 or 0: True or False (or the ints 1 and 0, the C
    API's own values). Anything else is refused, not taken by its truth value: "no" is a
    true string, and ``set_swappable(p, "no")`` declared the block swappable."""
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, int):
        raise InvalidArgumentTypeError(f"spill: {name} must be True or False, got {value!r}")
    if value not in (0, 1):
        raise InvalidArgumentError(f"spill: {name} must be True or False (or 1 or 0), "
                                   f"got {value!r}")
    return value


def _refuse_nul(text: str, name: str) -> None:
    # C reads a string up to its first NUL: what follows would be dropped without a word (a
    # configuration key after it never checked, "4GiB\0junk" read as 4 GiB).
    if "\0" in text:
        cut = text.index("\0")
        raise InvalidArgumentError(
            f"spill: {name} {text!r} holds a NUL character at index {cut}; C would read only "
            f"{text[:cut]!r}")


def text(value: Any, name: str) -> bytes:
    """A string for C (a configuration, a size, an op's name), encoded as UTF-8."""
    if not isinstance(value, str):
        raise InvalidArgumentTypeError(f"spill: {name} must be a string, got {value!r}")
    _refuse_nul(value, name)
    try:
        return value.encode()
    except UnicodeEncodeError as e:  # a lone surrogate (from surrogateescape): no UTF-8 for it
        raise InvalidArgumentError(f"spill: {name} is not valid text: {e.reason} at "
                                   f"index {e.start}") from None


def path(value: PathLike, name: str = "path") -> bytes:
    """A file path for C or for open(): a non-empty str or os.PathLike giving one."""
    try:
        fs_path = os.fspath(value)
    except TypeError:
        fs_path = None
    if not isinstance(fs_path, str):
        raise InvalidArgumentTypeError(
            f"spill: {name} must be a str or os.PathLike, got {value!r}")
    if not fs_path:
        raise InvalidArgumentError(f"spill: {name} must be a non-empty path, got {value!r}")
    _refuse_nul(fs_path, name)
    try:
        # surrogateescape: a path of undecodable bytes (U+DC80..U+DCFF) gets its bytes back
        return os.fsencode(fs_path)
    except UnicodeEncodeError as e:  # any other lone surrogate has no bytes at all
        raise InvalidArgumentError(f"spill: {name} {fs_path!r} is not a valid file name: "
                                   f"{e.reason} at index {e.start}") from None

"""Exceptions raised by the spill package: one per C API error code, all under `spill.Error`."""
from __future__ import annotations


class Error(Exception):
    """Any failure reported by spill; ``code`` is the C API's error code (0 when none)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class OutOfMemoryError(Error, MemoryError):
    """spill could not find the bytes asked for (device budget or host cap exhausted).

    The message is the C library's: it says where every byte is (allocated, cached, swapped
    out, pinned).
    """


class InvalidArgumentError(Error, ValueError):
    """A pointer, size, device, stream or configuration string was rejected; nothing changed."""


class InvalidArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument of the wrong type (a string where a size goes, an int where a path goes):
    an :class:`InvalidArgumentError` that is also Python's ``TypeError``, so code that catches
    either keeps working."""


class CudaError(Error, RuntimeError):
    """A CUDA runtime or driver call failed inside spill."""


class LibraryNotFoundError(Error, OSError):
    """libspill.so could not be found or loaded; the message lists every place tried."""

"""Exceptions raised by the spill package: one per C API error code, all under `spill.Error`,
and the codes themselves (``spill.Status``), so that an error raised in Python has one too."""
from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """The C API's status codes (``spill_status``); an exception's ``code`` is one of them."""

    OK = 0
    INVALID_ARGUMENT = 1
    OUT_OF_MEMORY = 2
    HOST_CAP = 3
    CUDA = 4
    SHUT_DOWN = 5
    FORKED_CHILD = 6
    ALREADY_INITIALIZED = 7
    NOT_FOUND = 8
    WRITE_FAILED = 9
    INTERNAL = 99


class Error(Exception):
    """Any failure reported by spill; ``code`` is the C API's status for it (``Status.OK``
    for a failure found in Python that no code names, such as a missing library)."""

    #: The code of a failure raised in Python without one.
    default_code = Status.OK

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = self.default_code if code is None else _as_status(code)


class OutOfMemoryError(Error, MemoryError):
    """spill could not find the bytes asked for (device budget or host cap exhausted).

    The message is the C library's: it says where every byte is (allocated, cached, swapped
    out, pinned).
    """


class InvalidArgumentError(Error, ValueError):
    """A pointer, size, device, stream or configuration string was rejected; nothing changed."""

    # Python's own argument checks (spill._args) raise it without a code: they refuse what C
    # would have refused with this status, or would have misread.
    default_code = Status.INVALID_ARGUMENT


class InvalidArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument of the wrong type (a string where a size goes, an int where a path goes):
    an :class:`InvalidArgumentError` that is also Python's ``TypeError``, so code that catches
    either keeps working."""


class CudaError(Error, RuntimeError):
    """A CUDA runtime or driver call failed inside spill."""


class WriteFailedError(Error, OSError):
    """A file spill was writing (a trace, a snapshot, a step's graph) could not be written whole
    for lack of room (a full disk, a quota, a file size limit) or an I/O error; the message names
    the file. Its earlier content, if any, is kept (unless the directory refused a new file and
    it was being rewritten in place: docs/architecture.md, outputs). Not raised for a path that
    cannot be used at all (a missing directory, no permission): that is an
    :class:`InvalidArgumentError`."""

    # Also for one raised in Python (spill.snapshot's write): its code says what it is.
    default_code = Status.WRITE_FAILED


class LibraryNotFoundError(Error, OSError):
    """libspill.so could not be found or loaded; the message lists every place tried."""


def _as_status(code: int) -> int:
    # A code C returned that this package does not know stays a plain int rather than failing
    # the raise that reports it.
    try:
        return Status(code)
    except ValueError:
        return code

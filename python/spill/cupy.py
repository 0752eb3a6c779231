"""spill as CuPy's allocator: ``cupy.cuda.set_allocator(spill.cupy.allocator)``.

CuPy asks for bytes without a stream; spill serves each request on CuPy's current stream and
device, and returns the block on that same stream when CuPy drops its last reference (RMM's CuPy
allocator works the same way). Streams spill has seen are kept alive until spill has forgotten
them (see _StreamKeeper). Blocks allocated for CuPy are not swappable (CuPy has no hook that
could pin them before use), so spill acts as a budgeted caching allocator for CuPy; its stats,
snapshots and traces cover CuPy's memory.

This module imports without CuPy; using it without CuPy raises ModuleNotFoundError.
"""
from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Dict, Optional, Tuple

import spill as _spill

try:
    import cupy as _cupy
except ImportError as _e:  # importable without CuPy; allocator() says why it cannot work
    _cupy = None
    _cupy_import_error: Optional[ImportError] = _e
else:
    _cupy_import_error = None

__all__ = ["allocator", "set_allocator", "OutOfMemoryError"]

_log = logging.getLogger(__name__)


def _require_cupy() -> Any:
    if _cupy is None:
        raise ModuleNotFoundError(
            f"spill.cupy needs CuPy, which could not be imported ({_cupy_import_error}); "
            "install CuPy for your CUDA version") from _cupy_import_error
    return _cupy


if _cupy is not None:
    class OutOfMemoryError(_spill.OutOfMemoryError, _cupy.cuda.memory.OutOfMemoryError):
        """spill's out-of-memory error as CuPy's: both ``except cupy.cuda.memory.OutOfMemoryError``
        and ``except spill.OutOfMemoryError`` catch it; the message is spill's."""

        def __init__(self, message: str, code: int = 0, size: int = 0) -> None:
            MemoryError.__init__(self, message)  # not CuPy's __init__: it writes its own text
            self.code = code
            self._size, self._total, self._limit = size, -1, 0  # read by CuPy's own methods

        def __reduce__(self) -> Any:
            return (type(self), (str(self), self.code, self._size))
else:
    OutOfMemoryError = _spill.OutOfMemoryError  # type: ignore[misc]


class _StreamKeeper:
    """Keeps every CuPy stream spill has seen alive until spill has forgotten it.

    spill may still record events on a stream after the blocks used on it were freed (it marks
    streams lazily), so a stream must not be destroyed before spill_stream_destroyed. CuPy
    destroys a Stream when its last reference goes, and says nothing; so spill.cupy holds a
    reference to each stream it passed to spill, and at the next allocation releases those that
    only it still holds: spill forgets the stream (waiting for its work), then CuPy may destroy
    it. The default streams (handles 0, 1, 2) live forever and are not kept.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: Dict[Tuple[int, int], Any] = {}
        self._probe: Dict[Tuple[int, int], Any] = {(0, 0): object()}

    def keep(self, device: int, stream: Any) -> None:
        if stream.ptr in (0, 1, 2):
            return
        with self._lock:
            self._kept.setdefault((device, stream.ptr), stream)

    @staticmethod
    def _references(table: Dict[Tuple[int, int], Any], key: Tuple[int, int]) -> int:
        held = table[key]
        return sys.getrefcount(held)

    def release_unused(self) -> None:
        with self._lock:
            # An object held only by its table shows the same count as the probe, which is held
            # the same way (so the count does not depend on how the interpreter counts).
            alone = self._references(self._probe, (0, 0))
            unused = [k for k in self._kept if self._references(self._kept, k) <= alone]
            for device, handle in unused:
                try:
                    _spill.stream_destroyed(handle, device)
                except _spill.Error as e:  # shut down meanwhile, or a stream spill never kept
                    _log.debug("spill.cupy: stream %#x on device %d: %s", handle, device, e)
                del self._kept[(device, handle)]

    def __len__(self) -> int:
        return len(self._kept)


_streams = _StreamKeeper()


class _Block:
    """The owner CuPy keeps alive with the memory; returns the block to spill, on the stream it
    was allocated on, when CuPy drops it. Holding the CuPy stream object keeps that stream alive
    until then (RMM's buffers hold theirs the same way)."""

    __slots__ = ("ptr", "device", "stream")

    def __init__(self, ptr: int, device: int, stream: Any) -> None:
        self.ptr, self.device, self.stream = ptr, device, stream

    def __del__(self) -> None:
        try:
            _spill.free(self.ptr, self.device, self.stream.ptr)
        except _spill.Error as e:  # a destructor cannot raise; say what was not freed
            if e.code == _spill.Status.SHUT_DOWN:  # the block went with spill.shutdown()
                _log.debug("spill.cupy: %#x was freed by spill.shutdown()", self.ptr)
            else:
                _log.warning("spill.cupy: could not free %#x on device %d: %s", self.ptr,
                             self.device, e)


def allocator(nbytes: int) -> Any:
    """Allocates ``nbytes`` bytes for CuPy on its current device and stream.

    The signature CuPy's ``cupy.cuda.set_allocator`` expects: returns a
    ``cupy.cuda.MemoryPointer``. Raises :class:`OutOfMemoryError` (a
    ``cupy.cuda.memory.OutOfMemoryError`` and a ``spill.OutOfMemoryError``) when the budget
    cannot hold the request, with spill's account of where every byte is.
    """
    cupy = _require_cupy()
    device = cupy.cuda.Device().id
    if nbytes == 0:  # CuPy allocates empty arrays; they own no memory
        mem = cupy.cuda.UnownedMemory(0, 0, None, device_id=device)
        return cupy.cuda.MemoryPointer(mem, 0)
    stream = cupy.cuda.get_current_stream()
    _streams.release_unused()
    try:
        ptr = _spill.malloc(nbytes, device, stream.ptr)
    except _spill.OutOfMemoryError as e:
        raise OutOfMemoryError(str(e), e.code, nbytes) from None
    _streams.keep(device, stream)
    block = _Block(ptr, device, stream)
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, block, device_id=device)
    return cupy.cuda.MemoryPointer(mem, 0)


def set_allocator() -> None:
    """Makes spill CuPy's allocator for every device: ``cupy.cuda.set_allocator(allocator)``."""
    _require_cupy().cuda.set_allocator(allocator)

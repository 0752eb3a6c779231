"""spill as CuPy's allocator: ``cupy.cuda.set_allocator(spill.cupy.allocator)``.

CuPy asks for bytes without a stream; spill serves each request on CuPy's current stream and
device, and returns the block on that same stream when CuPy drops its last reference (RMM's CuPy
allocator works the same way). Streams spill has seen are kept alive until spill has forgotten
them (see _StreamKeeper). Blocks allocated for CuPy are not swappable (CuPy has no hook that
could pin them before use), so spill acts as a budgeted caching allocator for CuPy; its stats,
snapshots and traces cover CuPy's memory.

Not served: CuPy's per-thread default stream (``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``,
``cupy.cuda.Stream.ptds``), which is one handle for every thread's own stream, so that spill
cannot order reuse between two threads' work on it (an allocation there raises
``spill.InvalidArgumentError`` saying so). Arrays are usable on their own device only (spill
maps its memory for its own device; peer access is not granted).

This module imports without CuPy; using it without CuPy raises ModuleNotFoundError.
"""
from __future__ import annotations

import gc
import logging
import sys
import threading
from typing import Any, Dict, Optional, Tuple

import spill as _spill
from spill import _runtime

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
    it. The default streams (handles 0 and 1) live forever and are not kept.

    One object stands for a handle: several CuPy objects may wrap one stream
    (``Stream.from_external``, ``ExternalStream``: a new wrapper each step is common), so the
    first one seen is kept and every block allocated on the handle holds that one (beside its
    own, which keeps its stream alive: a handle reused by a new stream); the handle
    is forgotten once nothing but spill.cupy holds that object (another wrapper still in use
    makes spill learn the handle again at its next allocation). An ``ExternalStream``'s
    object does not own its stream: its owner must call ``spill.stream_destroyed(handle,
    device)`` before destroying it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: Dict[Tuple[int, int], Any] = {}
        self._probe: Dict[Tuple[int, int], Any] = {(0, 0): object()}

    def keep(self, device: int, stream: Any) -> Any:
        """The object that stands for ``stream``'s handle on ``device`` (kept from now on):
        what a block allocated on it holds."""
        if stream.ptr in (0, 1):
            return stream
        with self._lock:
            return self._kept.setdefault((device, stream.ptr), stream)

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


#: Why a free finds nothing to free, and is no news (logged at debug level only).
_QUIET_FREES = {_spill.Status.SHUT_DOWN: "was freed by spill.shutdown()",
                _spill.Status.FORKED_CHILD: "belongs to the parent process (forked child)"}


class _Block:
    """The owner CuPy keeps alive with the memory; returns the block to spill, on the stream it
    was allocated on, when CuPy drops it. Holding the CuPy stream object keeps that stream alive
    until then (RMM's buffers hold theirs the same way); it also holds the object that stands
    for the stream's handle in _streams (the first one seen), which tells the keeper the
    handle is still used. A block from before a spill.shutdown() went with it, and its address
    may hold a block of the next session (configure again): its late free frees nothing (CuPy
    drops an array whenever its last view goes: a test's traceback, a cached FFT plan's work
    area)."""

    __slots__ = ("ptr", "device", "stream", "kept", "session")

    def __init__(self, ptr: int, device: int, stream: Any, kept: Any) -> None:
        self.ptr, self.device, self.stream, self.kept = ptr, device, stream, kept
        self.session = _runtime.shutdowns

    def __del__(self) -> None:
        if self.session != _runtime.shutdowns:
            _log.debug("spill.cupy: %#x %s", self.ptr, _QUIET_FREES[_spill.Status.SHUT_DOWN])
            return
        try:
            _spill.free(self.ptr, self.device, self.stream.ptr)
        except _spill.Error as e:  # a destructor cannot raise; say what was not freed
            quiet = _QUIET_FREES.get(e.code)
            if quiet:
                _log.debug("spill.cupy: %#x %s", self.ptr, quiet)
            else:
                _log.warning("spill.cupy: could not free %#x on device %d: %s", self.ptr,
                             self.device, e)


_PER_THREAD = 2  # cudaStreamPerThread


def _refuse_per_thread_stream(stream: Any) -> None:
    if stream.ptr == _PER_THREAD:
        raise _spill.InvalidArgumentError(
            "spill.cupy: CuPy's current stream is its per-thread default stream "
            "(CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1, or cupy.cuda.Stream.ptds), one handle for "
            "every thread's own stream, so spill cannot order reuse between threads on it; "
            "use cupy.cuda.Stream objects (or the legacy default stream)",
            _spill.Status.INVALID_ARGUMENT)


def allocator(nbytes: int) -> Any:
    """Allocates ``nbytes`` bytes for CuPy on its current device and stream.

    The signature CuPy's ``cupy.cuda.set_allocator`` expects: returns a
    ``cupy.cuda.MemoryPointer``. Raises :class:`OutOfMemoryError` (a
    ``cupy.cuda.memory.OutOfMemoryError`` and a ``spill.OutOfMemoryError``) when the budget
    cannot hold the request, with spill's account of where every byte is.
    """
    cupy = _require_cupy()
    device = cupy.cuda.get_device_id()
    if nbytes == 0:  # CuPy allocates empty arrays; they own no memory
        mem = cupy.cuda.UnownedMemory(0, 0, None, device_id=device)
        return cupy.cuda.MemoryPointer(mem, 0)
    stream = cupy.cuda.get_current_stream()
    _refuse_per_thread_stream(stream)
    _streams.release_unused()
    try:
        ptr = _spill.malloc(nbytes, device, stream.ptr)
    except _spill.OutOfMemoryError:
        # As CuPy's own pool does before it gives up: arrays held only by reference cycles
        # are freed by the cyclic collector alone.
        gc.collect()
        try:
            ptr = _spill.malloc(nbytes, device, stream.ptr)
        except _spill.OutOfMemoryError as e:
            raise OutOfMemoryError(str(e), e.code, nbytes) from None
    block = _Block(ptr, device, stream, _streams.keep(device, stream))
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, block, device_id=device)
    return cupy.cuda.MemoryPointer(mem, 0)


def set_allocator() -> None:
    """Makes spill CuPy's allocator for every device: ``cupy.cuda.set_allocator(allocator)``,
    and gives the memory CuPy's default pool caches (free, from before) back to the device,
    where spill's budget can use it. Refused (``spill.InvalidArgumentError``) while the current
    stream is CuPy's per-thread default stream."""
    cupy = _require_cupy()
    _refuse_per_thread_stream(cupy.cuda.get_current_stream())
    cupy.cuda.set_allocator(allocator)
    cupy.get_default_memory_pool().free_all_blocks()

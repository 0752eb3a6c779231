"""Streams, memory and residency: thin wrappers over spill_malloc, spill_free, spill_pin, ...

Pointers and stream handles are integers. Stream semantics are CUDA's and spill never
synchronises the caller's streams unless a function says so (see spill/spill.h).
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple

from . import _args
from ._capi import BlockInfoStruct, PinToken
from ._errors import InvalidArgumentTypeError
from ._lib import call

_RESIDENCE = ("resident", "swapping_out", "on_host", "swapping_in")


def stream_create(device: int = 0) -> int:
    """A new stream on ``device`` (a cudaStream_t on a GPU; on the simulated device the only
    streams there are, besides the default one, ``None``). Destroy it with
    :func:`stream_destroy`."""
    handle = ctypes.c_void_p()
    call("spill_stream_create", _args.device(device), ctypes.byref(handle))
    return handle.value or 0


def stream_destroy(stream: _args.StreamLike, device: int = 0) -> None:
    """Waits for the stream's work, forgets it and destroys it (streams from
    :func:`stream_create` only)."""
    call("spill_stream_destroy", _args.device(device), _args.stream(stream))


def stream_synchronize(stream: _args.StreamLike = None, device: int = 0) -> None:
    """Waits on the host until the work queued on ``stream`` is done."""
    call("spill_stream_synchronize", _args.device(device), _args.stream(stream))


def stream_destroyed(stream: _args.StreamLike, device: int = 0) -> None:
    """Call before destroying a stream of your own that spill has seen: waits for it, then
    forgets it as a user of blocks."""
    call("spill_stream_destroyed", _args.device(device), _args.stream(stream))


def malloc(size: int, device: int = 0, stream: _args.StreamLike = None) -> int:
    """Allocates ``size`` bytes on ``device`` for use on ``stream`` and returns the address
    (512-byte aligned; 0 for size 0). The block is not swappable until
    :func:`set_swappable` declares it. Raises :class:`spill.OutOfMemoryError` whose message
    says where every byte is."""
    out = ctypes.c_void_p()
    call("spill_malloc", ctypes.byref(out), _args.size(size), _args.device(device),
         _args.stream(stream))
    return out.value or 0


def free(ptr: int, device: int = 0, stream: _args.StreamLike = None) -> None:
    """Frees a block from :func:`malloc`, stream-ordered on ``stream``: work on ``stream`` may
    reuse the bytes at once, other streams once ``stream`` has passed the free. 0 is fine.
    Raises :class:`spill.InvalidArgumentError` naming the pointer for an unknown pointer, an
    interior pointer, a double free or a block of another device (nothing changes)."""
    call("spill_free", _args.pointer(ptr), _args.device(device), _args.stream(stream))


def record_stream(ptr: int, stream: _args.StreamLike) -> None:
    """The block containing ``ptr`` is also used by work on ``stream``: it is reused or swapped
    out only once that work is done."""
    call("spill_record_stream", _args.pointer(ptr), _args.stream(stream))


def set_swappable(ptr: int, swappable: bool = True) -> None:
    """Declares whether the block containing ``ptr`` may be swapped out to host memory
    (``swappable``: True or False, or the C API's 1 or 0; anything else raises
    :class:`spill.InvalidArgumentError`, rather than counting by its truth value).

    Declaring it swappable promises that every later use is bracketed by :func:`pin` /
    :func:`unpin` (or :func:`pin_for_host`). Declaring it not swappable brings it back first
    and returns once the host may touch it. Blocks below ``swap_threshold`` never move."""
    call("spill_set_swappable", _args.pointer(ptr), _args.flag(swappable, "swappable"))


def pin(ptr: int, stream: _args.StreamLike = None) -> PinToken:
    """Work about to be enqueued on ``stream`` uses the block containing ``ptr``: it stays on
    the device until :func:`unpin` of the returned token; if it was on the host it is copied
    back and ``stream`` waits for the copy (the host does not). Blocks that never move give an
    empty token."""
    token = PinToken()
    call("spill_pin", _args.pointer(ptr), _args.stream(stream), ctypes.byref(token))
    return token


def pin_for_host(ptr: int) -> PinToken:
    """The pin for host code: returns once the block is resident and no copy of spill's
    touches it, so the host may read and write it (on the simulated device its bytes are host
    memory). Unpin with :func:`unpin`."""
    token = PinToken()
    call("spill_pin_for_host", _args.pointer(ptr), ctypes.byref(token))
    return token


def unpin(token: PinToken, stream: _args.StreamLike = None, wrote: bool = True) -> None:
    """The work that used the pinned block is enqueued on ``stream`` (a swap-out waits for
    it). ``wrote=False`` promises the block was only read, so a current host copy stays current
    and its next eviction copies nothing. A token whose block was freed meanwhile does
    nothing; unpinning a token twice raises :class:`spill.InvalidArgumentError`."""
    if not isinstance(token, PinToken):
        raise InvalidArgumentTypeError(
            f"spill: unpin takes a PinToken from pin(), got {token!r}")
    call("spill_unpin", ctypes.byref(token), _args.stream(stream), _args.flag(wrote, "wrote"))


def prefetch(ptr: int) -> None:
    """Hint: start bringing the block containing ``ptr`` back now, into free budget only."""
    call("spill_prefetch", _args.pointer(ptr))


def evict(ptr: int) -> None:
    """Hint: start moving the block containing ``ptr`` to the host now (nothing happens for a
    pinned, unswappable or fresh block). Nothing waits: :func:`residence` reads
    ``"swapping_out"`` until the copy has finished, then ``"on_host"`` (its device memory is
    given back then). Raises :class:`spill.OutOfMemoryError` (code ``Status.HOST_CAP``) when
    ``host_cap`` leaves no room for the block's bytes; the block then stays on the device."""
    call("spill_evict", _args.pointer(ptr))


def discard(ptr: int, nbytes: int) -> None:
    """The ``nbytes`` bytes at ``ptr`` are about to be overwritten whole. When they are all of
    a block's allocation (``ptr`` the address :func:`malloc` returned, ``nbytes`` its size) and
    the block is on the host, its next pin maps it back without copying them (its bytes are
    undefined until written). Over a part of a block the rest is live: nothing is discarded.
    Raises :class:`spill.InvalidArgumentError` for an unknown pointer, ``nbytes`` 0, or a range
    past the end of the block's allocation (nothing changes)."""
    call("spill_discard", _args.pointer(ptr), _args.size(nbytes, "nbytes"))


def generation(ptr: int) -> int:
    """The generation of the block containing ``ptr`` (a :class:`PinToken`'s ``generation``):
    a number unique in the process for each block's life (not a count per address), read
    without pinning it; 0 for a block that never moves. A caller that keeps an address across
    frees tells a new block there from the one it knew."""
    value = ctypes.c_uint64(0)
    call("spill_get_generation", _args.pointer(ptr), ctypes.byref(value))
    return value.value


class BlockInfo(NamedTuple):
    """What :func:`block_info` says of a block now."""

    base: int         # the allocation's address
    size: int         # the bytes it asked for
    movable: bool     # the swapper may move it (not under swap_threshold); else all below reads
    residence: str    # as residence() says: "resident", "swapping_out", "on_host", "swapping_in"
    swappable: bool   # declared swappable now
    pins: int         # open pins (spill's own brief holds while it copies the block count too)
    generation: int   # as generation() says; 0 for a block that never moves


def block_info(ptr: int) -> BlockInfo:
    """What spill knows of the block containing ``ptr`` now, read without pinning it (no use
    of the block, nothing a step records): its allocation's address and size, whether it can
    move, where its bytes are, whether it is declared swappable, its open pins and its
    generation. For tools and checks: a block that is swappable with no pin open may move at
    any moment, so a use of it then is a missing pin (``spill.torch.check_pins()`` looks for
    those). Raises :class:`spill.InvalidArgumentError` naming ``ptr`` when no block of
    spill's contains it."""
    info = BlockInfoStruct()
    call("spill_get_block_info", _args.pointer(ptr), ctypes.byref(info))
    return BlockInfo(info.base, info.size, bool(info.movable), _RESIDENCE[info.residence],
                     bool(info.swappable), info.pins, info.generation)


def residence(ptr: int) -> str:
    """Where the bytes of the block containing ``ptr`` are: ``"resident"``,
    ``"swapping_out"``, ``"on_host"`` or ``"swapping_in"``."""
    value = ctypes.c_int(0)
    call("spill_get_residence", _args.pointer(ptr), ctypes.byref(value))
    return _RESIDENCE[value.value]

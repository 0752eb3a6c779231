"""Pins and declarations for tensors that live in spill's memory, on the installed target's
terms: on CUDA a pin on the current stream (no host wait; the unpin records on that stream),
on the CPU bridge a host-waiting pin (spill_pin_for_host: CPU kernels run on the host).

Tensors spill does not hold (created before enable(), by another allocator, on another
device) and tensors whose storage is below spill's swap threshold (they never move) are left
alone without a call into spill. Calls go straight to the C functions (plain ints and bools:
the argument types declared in spill._capi convert them): these run for every tensor a hook
sees."""
from __future__ import annotations

import ctypes
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.utils._pytree import tree_flatten

import spill
from spill import OutOfMemoryError
from spill._capi import BlockInfoStruct, PinToken, Status, raise_status
from spill._lib import library

from ._state import state

_INVALID_ARGUMENT = 1
_ON_HOST = 2  # spill_residence
_Tensor = torch.Tensor
_STRIDED = torch.strided
# The tensor's untyped storage (bytes and base pointer), as an unbound method: the hooks call
# it for every tensor they see.
_storage = _Tensor.untyped_storage if hasattr(_Tensor, "untyped_storage") else _Tensor._storage
_CL, _CL3D = torch.channels_last, torch.channels_last_3d


def whole_storage(t: torch.Tensor) -> bool:
    """Whether writing all of ``t`` writes every byte of its storage (so that a storage's old
    bytes are dead once ``t`` is zeroed: no copy back from the host is needed)."""
    if t.layout != _STRIDED or t.storage_offset() != 0 \
            or t.numel() * t.element_size() != _storage(t).nbytes():
        return False
    # Dense over its storage in some order: row-major, or a convolution's channels-last
    # gradient (an expanded or strided view has fewer distinct elements than it counts).
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=_CL)) \
        or (t.dim() == 5 and t.is_contiguous(memory_format=_CL3D))


class TorchOutOfMemoryError(OutOfMemoryError, torch.cuda.OutOfMemoryError):
    """Out of memory in a pin or a declaration made by spill.torch's hooks (a swapped-out
    tensor that cannot come back): PyTorch's class, which a training loop catches to retry
    with a smaller batch as it does for an allocation, and spill's (``code``)."""


def _raise(lib: Any, status: int) -> None:
    """raise_status, with out of memory as TorchOutOfMemoryError."""
    try:
        raise_status(lib, status)
    except OutOfMemoryError as e:
        state.last_oom = (str(e), e.code)
        raise TorchOutOfMemoryError(str(e), e.code) from None


def out_of_memory_in(error: BaseException) -> Optional[BaseException]:
    """The out-of-memory error raised inside what raised ``error``, when ``error`` is a plain
    RuntimeError carrying its message (torch 1.13's autograd engine hands on an exception of
    a saved-tensor or gradient hook so: ``RuntimeError("TorchOutOfMemoryError: ...")``);
    else None. Either a hook's own (state.last_oom), or an allocation's inside a hook of
    someone else's: non-reentrant checkpointing recomputes its region in its unpack hook, and
    an allocation there that finds no room raised ``RuntimeError("OutOfMemoryError: spill:
    cannot allocate ...")``, which ``except torch.cuda.OutOfMemoryError`` missed (audit 43u
    F2). That one is recognised by the shim's words and the allocator's latest account (the
    breakdown), both in its message, so no other RuntimeError is taken for it."""
    if type(error) is not RuntimeError:
        return None
    text = str(error)
    oom = state.last_oom
    if oom is not None and oom[0] in text:
        return TorchOutOfMemoryError(*oom)
    if text.startswith(_ALLOCATION_OOM):
        account = spill.last_oom_message(state.device)
        if account and account in text:
            # (without the engine's "At:" trace of the hook's frames: the cause keeps it)
            message = text[len("OutOfMemoryError: "):].split("\n\nAt:\n", 1)[0]
            return TorchOutOfMemoryError(message, Status.OUT_OF_MEMORY)
    return None


# How torch 1.13's engine words the shim's out-of-memory error (c10::OutOfMemoryError, whose
# Python class is torch.cuda.OutOfMemoryError) raised inside a Python hook.
_ALLOCATION_OOM = "OutOfMemoryError: spill: cannot allocate "


def raise_out_of_memory_in(error: BaseException) -> None:
    """Raises the out-of-memory error ``error`` carries (out_of_memory_in) from it, if any:
    the class the guide promises, so one ``except`` serves."""
    oom = out_of_memory_in(error)
    if oom is not None:
        raise oom from error


def call_raising_out_of_memory(func: Any, args: Any, kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` (a backward, ``autograd.grad``), raising an out-of-memory
    error the engine handed on as a plain RuntimeError as itself."""
    state.last_oom = None  # (a message of an earlier error is not this one's)
    try:
        return func(*args, **kwargs)
    except RuntimeError as e:
        raise_out_of_memory_in(e)
        raise


_COMPRESSED = {getattr(torch, name): (rows, cols) for name, rows, cols in (
    ("sparse_csr", "crow_indices", "col_indices"), ("sparse_bsr", "crow_indices", "col_indices"),
    ("sparse_csc", "ccol_indices", "row_indices"), ("sparse_bsc", "ccol_indices", "row_indices"))
    if hasattr(torch, name)}


def components(t: Any) -> Tuple[torch.Tensor, ...]:
    """The strided tensors that hold a sparse tensor's data (a COO tensor's indices and values:
    the gradient of ``nn.Embedding(sparse=True)``, SGD's momentum over it), else (). A sparse
    tensor has no storage of its own: an op that reads it reads these, which may have been
    declared swappable when an op made them (an embedding's backward makes the values strided,
    then wraps them), so a pin of the sparse tensor is a pin of each of them."""
    if not isinstance(t, _Tensor):
        return ()
    layout = t.layout
    if layout == _STRIDED:
        return ()
    if layout == torch.sparse_coo:
        return (t._indices(), t._values())
    names = _COMPRESSED.get(layout)
    if names is not None:
        return (getattr(t, names[0])(), getattr(t, names[1])(), t.values())
    return ()


def storage(t: torch.Tensor) -> Any:
    """The tensor's untyped storage (bytes and base pointer)."""
    return _storage(t)


def leaves(value: Any) -> Sequence[Any]:
    """tree_flatten(value)'s leaves, without its cost for a tensor or a flat tuple of them (a
    module's usual arguments and output, most aten ops' results)."""
    if isinstance(value, _Tensor):
        return (value,)
    if type(value) is tuple:
        for v in value:
            if not isinstance(v, _Tensor):
                return tree_flatten(value)[0]
        return value
    return tree_flatten(value)[0]


def movable_rules(device: int) -> Tuple[int, int]:
    """(the smallest request whose block can move, the mapping granule) on ``device``'s
    runtime, as spill applies them: past the small pool (requests up to min(swap_threshold,
    1 MiB) share segments that never move) and at least swap_threshold; each movable block is
    mapped on its own, rounded up to the granule (the simulated device's sim_granularity, a
    GPU's cuMemGetAllocationGranularity). Read from the runtime, not from a configuration
    string: enable() with no string (SPILL_CONF, or the defaults) and pool() apply the same."""
    s = spill.stats(device)
    return int(s["min_movable_bytes"]), int(s["granularity_bytes"])


class Saved:
    """What the pack hook keeps instead of the tensor: the tensor itself (same address), or,
    for a tensor autograd made, a detached alias of it (the same storage, no grad_fn: the
    unpacked tensor gets its grad_fn from autograd's saved metadata, not from this one).
    Holding the tensor itself would make a reference cycle through autograd's C++ objects
    when a node saves its own output (ReLU, sigmoid, softmax): output -> grad_fn -> saved
    variable -> this -> output. A backward runs each node and drops its saved variables, so a
    completed step never sees the cycle; a backward that raised (out of memory) leaves the
    nodes it did not reach, and with them the whole graph, allocated for good after the caller
    has dropped every reference, since Python's collector does not see C++ references."""
    __slots__ = ("tensor", "ptr")

    def __init__(self, tensor: torch.Tensor, ptr: int) -> None:
        self.tensor = acyclic(tensor)
        self.ptr = ptr


def acyclic(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is a leaf, else a detached alias (see Saved)."""
    return t if t.is_leaf else t.detach()


class Pinner:
    """Pin/unpin/declare for tensors on the installed target (see the module docstring)."""

    def __init__(self) -> None:
        lib = library()
        self._lib = lib
        self._pin = lib.spill_pin
        self._pin_for_host = lib.spill_pin_for_host
        self._unpin = lib.spill_unpin
        self._set_swappable = lib.spill_set_swappable
        self.cpu = state.target == "cpu"
        self.device_type = "cpu" if self.cpu else "cuda"
        self.threshold, self.granule = movable_rules(state.device)

    # ---------------------------------------------------------------- which tensors

    def _storage(self, t: Any) -> Any:
        """``t``'s storage when ``t`` is a strided tensor on the target's device, else None."""
        if not isinstance(t, _Tensor) or t.layout != _STRIDED or t.is_cuda == self.cpu \
                or t.is_meta:
            return None
        return _storage(t)

    def movable(self, t: Any) -> int:
        """The data pointer of ``t``'s storage when it is spill's and large enough to move,
        else 0 (nothing to pin)."""
        s = self._storage(t)
        return s.data_ptr() if s is not None and s.nbytes() >= self.threshold else 0

    def movables(self, t: Any) -> List[int]:
        """The blocks that hold ``t``'s data and can move: its storage's (movable), or a
        sparse tensor's indices' and values' (components)."""
        ptr = self.movable(t)
        if ptr:
            return [ptr]
        return [p for p in map(self.movable, components(t)) if p]

    def block(self, t: Any) -> Tuple[int, int]:
        """(data pointer, bytes it takes in the budget when resident) of ``t``'s storage when
        it is spill's and large enough to move, else (0, 0). The bytes are the storage's
        rounded up to the mapping granule (see :func:`movable_rules`): at a GPU's 2 MiB, a 160 KiB
        weight takes 2 MiB."""
        s = self._storage(t)
        if s is None:
            return 0, 0
        nbytes = s.nbytes()
        if nbytes < self.threshold:
            return 0, 0
        g = self.granule
        return s.data_ptr(), -(-nbytes // g) * g

    # ---------------------------------------------------------------- calls

    def stream(self) -> Optional[int]:
        """The stream pins and unpins use now: the current CUDA stream (None on the CPU)."""
        if self.cpu:
            return None
        return torch.cuda.current_stream().cuda_stream

    def pin(self, ptr: int, stream: Optional[int]) -> Optional[PinToken]:
        """Pins the block at ``ptr`` (from :meth:`movable`); None when there is nothing to
        unpin (a block that never moves, or memory spill does not hold)."""
        token = PinToken()  # passed by reference (the argument type is a pointer to it)
        if self.cpu:
            status = self._pin_for_host(ptr, token)
        else:
            status = self._pin(ptr, stream, token)
        if status == 0:
            return token if token.block else None
        if status == _INVALID_ARGUMENT:
            return None  # not spill's memory
        _raise(self._lib, status)

    def unpin(self, token: PinToken, stream: Optional[int], wrote: bool) -> None:
        status = self._unpin(token, stream, wrote)
        if status != 0:
            _raise(self._lib, status)

    def on_host(self, ptr: int) -> bool:
        """Whether the block at ``ptr`` has its bytes only on the host now."""
        residence = ctypes.c_int(0)
        status = self._lib.spill_get_residence(ctypes.c_void_p(ptr), ctypes.byref(residence))
        return status == 0 and residence.value == _ON_HOST

    def swappable(self, ptr: int) -> bool:
        """Whether the block at ``ptr`` is declared swappable now (by any handle), read
        without a pin; False when spill does not hold it."""
        info = BlockInfoStruct()
        return self._lib.spill_get_block_info(ctypes.c_void_p(ptr), ctypes.byref(info)) == 0 \
            and bool(info.swappable)

    def discard(self, ptr: int, nbytes: int) -> None:
        """The ``nbytes`` bytes at ``ptr`` are about to be overwritten whole: when they are all
        of a block's allocation and it is on the host, its next pin maps it back without
        copying them (over a part of a block, nothing is discarded)."""
        status = self._lib.spill_discard(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes))
        if status != 0:
            _raise(self._lib, status)

    def generation(self, ptr: int) -> int:
        """Which life of its address the block at ``ptr`` is in (a pin token's generation),
        read without a pin, so that the step records no use of it; 0 when the block never
        moves or spill does not hold ``ptr``."""
        value = ctypes.c_uint64(0)
        status = self._lib.spill_get_generation(ctypes.c_void_p(ptr), ctypes.byref(value))
        if status == _INVALID_ARGUMENT:
            return 0
        if status != 0:
            _raise(self._lib, status)
        return value.value

    def declare(self, ptr: int, swappable: bool = True) -> bool:
        """Declares the block at ``ptr`` (not) swappable; False when spill does not hold it."""
        status = self._set_swappable(ptr, swappable)
        if status == 0:
            return True
        if status == _INVALID_ARGUMENT:
            return False
        _raise(self._lib, status)

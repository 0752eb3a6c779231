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
import re
from typing import Any, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten

from spill._capi import PinToken, raise_status
from spill._lib import library

from ._state import state

_INVALID_ARGUMENT = 1
_ON_HOST = 2  # spill_residence
_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}

if hasattr(torch.Tensor, "untyped_storage"):
    def storage(t: torch.Tensor) -> Any:
        """The tensor's untyped storage (bytes and base pointer)."""
        return t.untyped_storage()
else:  # torch 1.13
    def storage(t: torch.Tensor) -> Any:
        """The tensor's untyped storage (bytes and base pointer)."""
        return t._storage()


def leaves(value: Any) -> List[Any]:
    """tree_flatten(value)'s leaves, without its cost for a tensor or a flat tuple of them (a
    module's usual arguments and output, most aten ops' results)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if type(value) is tuple and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return tree_flatten(value)[0]


def swap_threshold(conf: Optional[str]) -> int:
    """spill's swap_threshold from a configuration string (1 MiB when absent)."""
    for item in (conf or "").split(","):
        key, _, value = item.partition(":")
        if key.strip() == "swap_threshold":
            m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
            if m:
                return int(float(m.group(1)) * _UNITS.get(m.group(2).lower() or "b", 1))
    return 1 << 20


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
        self.threshold = swap_threshold(state.conf)

    # ---------------------------------------------------------------- which tensors

    def movable(self, t: Any) -> int:
        """The data pointer of ``t`` when its storage is spill's and large enough to move, else
        0 (nothing to pin)."""
        return self.block(t)[0]

    def block(self, t: Any) -> Tuple[int, int]:
        """(data pointer, bytes) of ``t``'s storage when it is spill's and large enough to
        move, else (0, 0)."""
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return 0, 0
        if t.is_cuda == self.cpu or t.is_meta:
            return 0, 0
        s = storage(t)
        nbytes = s.nbytes()
        if nbytes < self.threshold:
            return 0, 0
        return s.data_ptr(), nbytes

    # ---------------------------------------------------------------- calls

    def stream(self) -> Optional[int]:
        """The stream pins and unpins use now: the current CUDA stream (None on the CPU)."""
        if self.cpu:
            return None
        return torch.cuda.current_stream().cuda_stream

    def pin(self, ptr: int, stream: Optional[int]) -> Optional[PinToken]:
        """Pins the block at ``ptr`` (from :meth:`movable`); None when there is nothing to
        unpin (a block that never moves, or memory spill does not hold)."""
        token = PinToken()
        if self.cpu:
            status = self._pin_for_host(ptr, ctypes.byref(token))
        else:
            status = self._pin(ptr, stream, ctypes.byref(token))
        if status == 0:
            return token if token.block else None
        if status == _INVALID_ARGUMENT:
            return None  # not spill's memory
        raise_status(self._lib, status)

    def unpin(self, token: PinToken, stream: Optional[int], wrote: bool) -> None:
        status = self._unpin(ctypes.byref(token), stream, wrote)
        if status != 0:
            raise_status(self._lib, status)

    def on_host(self, ptr: int) -> bool:
        """Whether the block at ``ptr`` has its bytes only on the host now."""
        residence = ctypes.c_int(0)
        status = self._lib.spill_get_residence(ctypes.c_void_p(ptr), ctypes.byref(residence))
        return status == 0 and residence.value == _ON_HOST

    def declare(self, ptr: int, swappable: bool = True) -> bool:
        """Declares the block at ``ptr`` (not) swappable; False when spill does not hold it."""
        status = self._set_swappable(ptr, swappable)
        if status == 0:
            return True
        if status == _INVALID_ARGUMENT:
            return False
        raise_status(self._lib, status)

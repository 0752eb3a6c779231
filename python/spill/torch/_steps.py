"""Training-step boundaries for the hooks: a step of one scope (a model) begins at its first
pin after the previous step ended and ends when the optimizer's step() returns. Pins belong
to the calling thread's current scope, so a thread that joins the step (PyTorch's CUDA
backward runs on its own thread) names the scope once per step with spill_begin_op."""
from __future__ import annotations

import ctypes
import functools
import threading
import types
from typing import Any, Callable, Optional

from spill._capi import raise_status
from spill._lib import library

from ._state import state


class StepBoundaries:
    """Begins and ends the steps of ``scope`` on spill's device (see the module docstring)."""

    def __init__(self, scope: int, manage: bool) -> None:
        self.scope = scope & 0xFFFFFFFFFFFFFFFF
        self.manage = manage        # False: the caller brackets steps (with spill.step())
        self.in_step = False
        self.count = 0              # steps ended so far
        self._threads: set = set()  # threads that named the scope in this step
        self._lib = library()
        self._device = state.device

    def _call(self, name: str, *args: Any) -> None:
        status = getattr(self._lib, name)(*args)
        if status != 0:
            raise_status(self._lib, status)

    def ensure(self) -> None:
        """Called by every hook before its pins: begins a step if none is open and makes the
        scope current on this thread."""
        if not self.manage:
            return
        ident = threading.get_ident()
        if not self.in_step:
            self._call("spill_begin_step", self._device, ctypes.c_uint64(self.scope))
            self.in_step = True
            self._threads = {ident}
        elif ident not in self._threads:
            self._call("spill_begin_op", self._device, ctypes.c_uint64(self.scope), None)
            self._threads.add(ident)

    def end(self) -> None:
        if self.manage and self.in_step:
            self.in_step = False
            self.count += 1
            self._call("spill_end_step", self._device, ctypes.c_uint64(self.scope))


def wrap_method(obj: Any, name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]],
                saved: dict) -> None:
    """Replaces ``obj.name`` by ``wrapper(original)`` on the instance; ``saved`` keeps what to
    put back (see :func:`unwrap_methods`)."""
    original = getattr(obj, name)
    wrapped = wrapper(original)
    on = [True]  # False once unwrapped: the method then calls the original

    # A bound method, as the original was: code that wraps it in turn (an LR scheduler's step
    # counter takes method.__self__ and method.__func__) keeps working.
    @functools.wraps(original)
    def method(_self: Any, *args: Any, **kwargs: Any) -> Any:
        return (wrapped if on[0] else original)(*args, **kwargs)
    ours = types.MethodType(method, obj)
    saved[(id(obj), name)] = (obj, name, obj.__dict__.get(name), ours, on)
    setattr(obj, name, ours)


def unwrap_methods(saved: dict) -> None:
    """Puts back what :func:`wrap_method` replaced. Where other code has wrapped our method
    since (an LR scheduler created afterwards), its wrapper stays and ours only passes calls
    through to the original."""
    for obj, name, previous, ours, on in saved.values():
        on[0] = False
        if obj.__dict__.get(name) is not ours:
            continue
        if previous is None:
            obj.__dict__.pop(name, None)
        else:
            setattr(obj, name, previous)
    saved.clear()


def optional_scope(scope: Optional[int], default: Any) -> int:
    return id(default) if scope is None else int(scope)

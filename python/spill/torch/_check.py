"""spill.torch.check_pins(): finds the uses of tensors that spill may move under them.

offload()'s hooks and guard() pin every use of a swappable block they know of; a use they do
not see (a gradient or optimizer state read inside a forward, another module's plain tensor
attribute, a tensor reached through a container: docs/pytorch.md) reads a block that may be
on the host. On a GPU that is an illegal memory access, which ends the CUDA context without
naming the tensor, and only when the block happened to be on the host: the same code passes
while it is resident. Under check_pins every aten op of the calling thread first asks spill
about the blocks of its tensor arguments (spill_get_block_info, no pin, nothing the step
records) and raises :class:`UnpinnedUseError` naming the op, the tensor and its block when one
is declared swappable and no pin holds it, resident or not: a missing pin is found the first
time the code runs, on a GPU or on the CPU bridge, before any fault. On the CPU bridge a
function mode checks the host reads that use no aten op there (``.tolist()``, ``.numpy()``,
printing) the same way.

The check's dispatch mode stays at the bottom of the thread's mode stack, below the modes
offload and guard put there (_window._insert_bottom), so it sees each op after their pins."""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any, List, Optional, Set, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from spill import Error, block_name
from spill._capi import BlockInfoStruct
from spill._errors import InvalidArgumentError, InvalidArgumentTypeError

from ._guard import call_detaching, reads_no_bytes
from ._pins import Pinner, leaves
from ._state import state
from ._window import (_PinnedArray, _dispatch_stack, _function_stack, _insert_bottom, _remove,
                      _unpin_quietly)

# Ops that take a tensor for its shape, dtype and device only (no kernel reads its bytes):
# they make a new tensor, or answer a question about the tensor, or (set_ from a tensor) make
# an alias of its storage. Overload packets: an op is checked against its own (before, the set
# held packets and was asked about overloads, so it never matched: audit 38a F3).
_SHAPE_ONLY = frozenset(
    getattr(torch.ops.aten, name) for name in (
        "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
        "randint_like", "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full",
        "is_pinned", "is_same_size", "is_set_to", "set_")
    if hasattr(torch.ops.aten, name))
_RESIDENCES = ("resident", "swapping_out", "on_host", "swapping_in")


class UnpinnedUseError(Error, RuntimeError):
    """An aten op under :func:`check_pins` used a tensor whose block spill may move at any
    moment: declared swappable, with no pin open. The message names the op, the argument, the
    tensor, its block (with spill's name for it: offload names parameters, gradients and
    optimizer state) and where its bytes are now."""


class _CheckPins(TorchDispatchMode):
    """The dispatch mode behind check_pins (see the module docstring)."""

    stays_at_bottom = True  # (_window._insert_bottom keeps it under the modes it inserts)

    def __init__(self, pinner: Pinner, collect: bool) -> None:
        super().__init__()
        self.pinner = pinner
        self.collect = collect
        self.found: List[str] = []
        self._seen: Set[Tuple[Any, Any, Any]] = set()
        self._get = pinner._lib.spill_get_block_info
        # (a CUDA backward runs ops on autograd's device thread and the caller's at once,
        # under this one mode: each check fills a block info of its own, and the findings
        # are noted under a lock)
        self._lock = threading.Lock()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        unpinned: List[int] = []
        packet = getattr(func, "overloadpacket", func)
        if state.active and not state.forked_child and packet not in _SHAPE_ONLY \
                and not reads_no_bytes(func, args, kwargs):
            unpinned = self._check(func, args, kwargs)
        if not unpinned:
            return call_detaching(func, args, kwargs)
        # Collecting: the use was noted; the op runs with the blocks it found unpinned pinned
        # (mapped back first when on the host), so that the run goes on to report it rather
        # than fault on it. Marked written: the op may write them.
        pinner = self.pinner
        stream = pinner.stream()
        tokens = []
        try:
            for ptr in unpinned:
                tokens.append(pinner.pin(ptr, stream))
            return call_detaching(func, args, kwargs)
        finally:
            for token in reversed(tokens):
                if token is not None:
                    pinner.unpin(token, stream, True)

    def _check(self, func: Any, args: Any, kwargs: Any) -> List[int]:
        """Raises for the first use of a swappable block with no pin; collecting, notes each
        and returns their blocks."""
        movables = self.pinner.movables
        unpinned: List[int] = []
        for where, value in [*enumerate(args), *kwargs.items()]:
            if not isinstance(value, (torch.Tensor, list, tuple)):
                continue
            for t in leaves(value):
                for ptr in movables(t):
                    info = BlockInfoStruct()
                    missing = self._unpinned(ptr, info)
                    if missing is not None:
                        self._report(func, where, t, missing, info)
                        unpinned.append(ptr)
        return unpinned

    def _unpinned(self, ptr: int, info: BlockInfoStruct) -> Optional[str]:
        """The block's residence when it is swappable with no pin open, else None (``info``
        filled with what spill says of it)."""
        if self._get(ptr, info) != 0:  # (not spill's memory: nothing can move it)
            return None
        if info.swappable and info.pins == 0:
            return _RESIDENCES[info.residence]
        return None

    def _report(self, func: Any, where: Any, t: torch.Tensor, residence: str,
                info: BlockInfoStruct) -> None:
        try:
            name = block_name(info.base)
        except Error:
            name = ""
        argument = f"argument {where}" if isinstance(where, int) else f"argument '{where}'"
        block = f"block {info.base:#x} ({info.size / 2**20:.2f} MiB" + (
            f", '{name}')" if name else ")")
        now = {"resident": "resident now, so the op would read it this time",
               "on_host": "on the host now: the op would fault",
               "swapping_out": "being copied to the host now",
               "swapping_in": "being copied back now"}[residence]
        message = (
            f"spill.torch.check_pins: {func} uses, as its {argument}, a tensor "
            f"({str(t.dtype).replace('torch.', '')} {list(t.shape)}) in {block} that spill "
            f"may move at any moment: it is declared swappable and no pin holds it ({now}). "
            "No hook of offload() or guard() pins this use: run the code under `with "
            "spill.torch.pin_reads():`, or pass the tensor to the module as an argument "
            "(docs/pytorch.md, Swapping: offload or guard, \"Not pinned inside a forward\")")
        if self.collect:
            # Once per op, argument and block name (a block's address changes from step to
            # step; its name, the parameter's, does not).
            seen = (func, where, name or info.base)
            with self._lock:
                if seen not in self._seen:
                    self._seen.add(seen)
                    self.found.append(message)
            return
        raise UnpinnedUseError(message)


class _CheckHostReads(TorchFunctionMode):
    """check_pins on the CPU bridge, where host code reads a tensor's memory without an aten op
    (``.tolist()``, ``.numpy()``, printing): each such call is checked as an op is, by the
    check's dispatch mode. At the bottom of the thread's function-mode stack, so it sees the
    call inside the pins spill's own host-read modes put around it (the window's, a first
    step's or an evaluation forward's). Collecting, the call runs with the blocks it found
    pinned (``.numpy()``: while the array lives, as the window does). Before, check_pins did
    not see these reads, which fault on the bridge when the block is on the host (audits 36b
    F4, 36f F1)."""

    stays_at_bottom = True

    def __init__(self, ops: _CheckPins) -> None:
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = _HOST_READS.get(func)
        if name is None or not args or not isinstance(args[0], torch.Tensor) \
                or not state.active or state.forked_child:
            return func(*args, **kwargs)
        unpinned = self.ops._check(name, (args[0],), {})
        if not unpinned:
            return func(*args, **kwargs)
        pinner = self.ops.pinner
        stream = pinner.stream()
        tokens: List[Any] = []
        kept = None  # the pin a .numpy() array keeps while it lives
        try:
            for ptr in unpinned:
                token = pinner.pin(ptr, stream)
                if token is not None:
                    tokens.append(token)
            out = func(*args, **kwargs)
            if name.endswith(("numpy()", "__array__()")) and tokens:
                import numpy
                array = numpy.asarray(_PinnedArray(out, pinner, tokens[0]))
                kept = tokens[0]
                return array
            return out
        finally:
            for token in tokens:
                if token is not kept:
                    _unpin_quietly(pinner, token)


# The host reads _CheckHostReads checks, by the name its messages give them.
_HOST_READS = {getattr(torch.Tensor, n): f"Tensor.{n}()" for n in
               ("tolist", "numpy", "__array__", "__repr__", "__str__", "__format__")}


class check_pins:
    """``with spill.torch.check_pins(): ...`` makes every aten op of the calling thread check,
    before it runs, that spill may not move the blocks of its tensor arguments under it: a
    block declared swappable (by offload's hooks, guard, or spill.set_swappable) with no pin
    open raises :class:`UnpinnedUseError` naming the op, the tensor and its block, whether its
    bytes are on the host now (the op would fault: on a GPU an illegal memory access that ends
    the CUDA context) or still resident (this time). A debugging aid: wrap one or two
    training steps in it to find the uses offload does not pin, then fix them with
    ``pin_reads()``. ``collect=True`` raises nothing and lists each distinct finding's message
    in ``found`` (the ``as`` target)::

        with spill.torch.check_pins(collect=True) as check:
            train_one_step()
        assert not check.found, check.found

    Views (``detach``, slices, ``t()``) and ops that take a tensor for its shape only
    (``empty_like``) read no bytes and are not checked. On the CPU bridge, host code that
    reads memory without an aten op (``.numpy()``, ``.tolist()``, printing) is checked as an
    op is. Only the calling
    thread's ops (PyTorch's modes are per thread). Costs a call into spill per movable tensor
    argument of every op. Requires spill.torch.enable() first; nests."""

    def __init__(self, collect: bool = False) -> None:
        if not isinstance(collect, bool):
            raise InvalidArgumentTypeError(
                f"spill.torch.check_pins: collect must be a bool, got {type(collect).__name__}")
        self.collect = collect
        self.found: List[str] = []
        self._mode: Optional[_CheckPins] = None
        self._reads: Optional[_CheckHostReads] = None  # (the CPU bridge's)

    def __enter__(self) -> "check_pins":
        if not state.active:
            raise Error("spill.torch.check_pins: spill is not PyTorch's allocator in this "
                        "process; call spill.torch.enable() first")
        mode = _CheckPins(Pinner(), self.collect)
        mode.found = self.found
        _insert_bottom(mode, *_dispatch_stack())
        self._mode = mode
        if mode.pinner.cpu:
            self._reads = _CheckHostReads(mode)
            _insert_bottom(self._reads, *_function_stack())
        return self

    def __exit__(self, *exc: Any) -> Optional[bool]:
        mode, self._mode = self._mode, None
        if mode is not None:
            _remove(mode, *_dispatch_stack())
        reads, self._reads = self._reads, None
        if reads is not None:
            _remove(reads, *_function_stack())
        return None


ENVIRONMENT = "SPILL_TORCH_CHECK_PINS"


def environment_mode() -> Optional[str]:
    """``SPILL_TORCH_CHECK_PINS``'s mode: None (unset, empty, ``0`` or ``off``), ``"raise"``
    (``raise`` or ``1``) or ``"report"``; any other value raises
    :class:`spill.InvalidArgumentError` naming the variable (enable() asks before it changes
    anything)."""
    given = os.environ.get(ENVIRONMENT, "")
    value = given.strip().lower()
    if value in ("", "0", "off"):
        return None
    if value in ("1", "raise"):
        return "raise"
    if value == "report":
        return value
    raise InvalidArgumentError(
        f"spill.torch.enable: {ENVIRONMENT}={given!r} is not a mode of the check: use raise "
        "(or 1: an op that uses a tensor spill may move raises), report (the findings are "
        "printed on stderr at exit) or off (or 0, or unset)")


def check_from_environment(mode: Optional[str]) -> None:
    """enable()'s, with :func:`environment_mode`'s answer: a check_pins for the rest of the
    process on the thread that called enable() (the one that trains, in most scripts), which
    raises, or collects and prints its findings on stderr at exit."""
    if mode is None:
        return
    check = check_pins(collect=mode == "report")
    check.__enter__()
    if mode == "report":
        atexit.register(_report, check)


def _report(check: check_pins) -> None:
    found = check.found
    if not found:
        print(f"spill.torch.check_pins ({ENVIRONMENT}=report): every use of a tensor spill "
              "may move was pinned", file=sys.stderr)
        return
    print(f"spill.torch.check_pins ({ENVIRONMENT}=report): {len(found)} use"
          f"{'s' if len(found) > 1 else ''} of tensors spill may move had no pin:",
          file=sys.stderr)
    for message in found:
        print(f"- {message}", file=sys.stderr)


__all__ = ["UnpinnedUseError", "check_pins"]

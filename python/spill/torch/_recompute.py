"""Forwards that run inside a backward: activation checkpointing's recomputation
(``torch.utils.checkpoint.checkpoint`` with ``use_reentrant`` True or False,
``checkpoint_sequential``), or any module a backward calls.

Such a forward is not a step's forward: it must not begin a step, become an entry, or push
offload's saved-tensor hooks. With ``use_reentrant=False`` checkpointing has pushed its own
hooks for the recomputation (they stash what the recomputed ops save, for the original graph's
nodes to read): hooks pushed above them would take those tensors away, and PyTorch raises
"Attempt to retrieve a tensor saved by autograd multiple times". So the recomputed modules
only pin: each outermost recomputed module (the one the checkpointed function calls) opens a
hold with its tensor arguments; it and every module inside it add their parameters and buffers
(and those they use outside their owners). The original graph's nodes (non-reentrant) or the
inner backward (reentrant) read those tensors after the recomputation has returned, so the
hold lasts until autograd has made the gradient of one of the outermost module's arguments
that is no parameter (one autograd made, or a leaf reentrant checkpointing detached: the
region's backward is then over), or, when none is such, until the backward ends. A hold is released with every hold opened after it (backward runs regions last
to first).

The checkpointed function's own code outside those modules (``F.relu(F.linear(h, l.weight,
l.bias))``, no module at all; ``l(F.gelu(h))``, ``h + l(F.layer_norm(h, ...))``: ops before the
first module call) runs in a backward the window runs with no dispatch mode, so no hook saw
its reads: the region's input (the batch, declared swappable at the entry; an activation
offload's hooks saved) was read on the host (a segmentation fault on the CPU bridge, audit 39a
F2). The window's backward therefore runs, in an armed step, under a function mode
(_window._RecomputedOps) which, for a call made with grad enabled inside non-reentrant
checkpointing's recomputation (region_frame: the frame of torch.utils.checkpoint's ``unpack``
in torch 1.13, ``recompute_fn`` in torch 2) and outside every recomputed module, pins the
call's tensor arguments that may move (declared swappable) into the hold of that
recomputation (begin_region: opened with the checkpointed function's arguments, released as
begin's are). Held, not pinned around the call:
the original graph's nodes read what the recomputation saved (its input, a weight's
transpose) after it has returned.

A forward is taken to run inside a backward when a Python frame of ``torch.autograd.backward``
or ``torch.autograd.grad`` is below it, or when it runs on a thread other than the training
loop's while that thread is inside one (PyTorch's CUDA backward runs on its own thread, whose
frames begin at the node, while the loop's thread waits in ``backward``). A forward on another
thread otherwise is a training forward there (offload's _follow_thread)."""
from __future__ import annotations

import sys
import threading
from types import CodeType, FrameType
from typing import Any, Callable, List, Optional, Set, Tuple

import torch

from ._pins import Pinner, leaves

Token = Any
Hold = List[Tuple[Token, bool]]

_AUTOGRAD = {torch.autograd.backward.__code__, torch.autograd.grad.__code__}
_CALL_IMPL = torch.nn.Module._call_impl.__code__


def _recompute_codes() -> frozenset:
    """The code of the functions in which non-reentrant checkpointing recomputes a region:
    torch 1.13's ``unpack`` (nested in _checkpoint_without_reentrant), torch 2's
    ``recompute_fn``; each has the checkpointed function's positional arguments as ``args``."""
    import torch.utils.checkpoint as checkpoint
    found = set()

    def visit(code: CodeType, depth: int) -> None:
        for c in code.co_consts:
            if isinstance(c, CodeType) and depth < 4:
                if c.co_name in ("unpack", "recompute_fn") and "args" in (
                        c.co_varnames + c.co_freevars + c.co_cellvars):
                    found.add(c)
                visit(c, depth + 1)

    for value in vars(checkpoint).values():
        functions = [value] if callable(value) else []
        if isinstance(value, type):
            functions = list(vars(value).values())
        for f in functions:
            code = getattr(f, "__code__", None)
            if isinstance(code, CodeType) and code.co_filename == checkpoint.__file__:
                visit(code, 0)
    return frozenset(found)


try:
    _RECOMPUTE = _recompute_codes()
except Exception:  # (a torch whose checkpoint module is not laid out so: nothing found)
    _RECOMPUTE = frozenset()


def region_frame() -> Optional[FrameType]:
    """The frame of non-reentrant checkpointing's recomputation that the caller's caller runs
    in (see _recompute_codes), or None (none below it before a frame of torch.autograd's
    backward or grad)."""
    if not _RECOMPUTE:
        return None
    f: Optional[FrameType] = sys._getframe(2)
    while f is not None:
        code = f.f_code
        if code in _RECOMPUTE:
            return f
        if code in _AUTOGRAD:
            return None
        f = f.f_back
    return None


def call_frame() -> Optional[FrameType]:
    """The frame of ``Module._call_impl`` running the hook that calls this."""
    f = sys._getframe(2)
    while f is not None and f.f_code is not _CALL_IMPL:
        f = f.f_back
    return f


class ModuleCall:
    """A module call, as far as telling whether it still runs: its ``Module._call_impl`` frame
    and the thread it runs on. A forward that raised has no post hook: when its caller
    catches the exception, nothing says the call is over but the stack."""
    __slots__ = ("frame", "thread")

    def __init__(self) -> None:
        self.frame = call_frame()
        self.thread = threading.get_ident()

    def running(self) -> bool:
        """Whether the call is still on its thread's stack (asked from another thread, or
        with no frame found: taken as running)."""
        target = self.frame
        if target is None or threading.get_ident() != self.thread:
            return True
        f: Optional[FrameType] = sys._getframe(1)
        while f is not None:
            if f is target:
                return True
            f = f.f_back
        return False


def in_backward(frame: FrameType, window: Any) -> bool:
    """Whether the module call at ``frame`` runs inside a backward (see the module docstring)
    of the thread that trains (``window``'s)."""
    if _below(frame):
        return True
    if window.here():
        return False
    thread = window.thread_object
    if not thread.is_alive():
        return False
    top = sys._current_frames().get(thread.ident)
    return top is not None and _below(top)


def _below(frame: Optional[FrameType]) -> bool:
    """Whether a frame of torch.autograd.backward or grad is at or below ``frame``."""
    f = frame
    while f is not None:
        if f.f_code in _AUTOGRAD:
            return True
        f = f.f_back
    return False


def _within(f: Optional[FrameType], target: FrameType) -> bool:
    """Whether ``target`` is ``f`` or a caller of it, below the backward's frame."""
    while f is not None:
        if f is target:
            return True
        if f.f_code in _AUTOGRAD:
            return False
        f = f.f_back
    return False


class Recomputation:
    """The holds of the forwards a backward recomputes, for one offload handle (it keeps
    the handle's pinner, not the handle: the hooks it leaves on tensors must not keep the
    model alive)."""

    def __init__(self, pinner: Pinner) -> None:
        self._pinner = pinner
        self.frame: Optional[FrameType] = None   # the outermost module's call, while it runs
        self.module: Optional[torch.nn.Module] = None
        self.holds: List[Hold] = []
        # The recomputation whose function's own ops pin into region_hold (begin_region), and
        # the blocks pinned there so far.
        self.region: Optional[FrameType] = None
        self.region_hold: Optional[Hold] = None
        self.region_pinned: Set[int] = set()

    def nested(self, frame: FrameType) -> bool:
        """Whether the module call at ``frame`` runs inside the outermost recomputed module."""
        return self.frame is not None and _within(frame.f_back, self.frame)

    def begin(self, frame: FrameType, module: torch.nn.Module, args: Any) -> Hold:
        """An outermost recomputed module begins: a new hold, returned for its pins. It goes
        when autograd has made the gradient of one of the module's arguments (else at the
        backward's end). The hooks go on now, not when the module returns: torch 2's
        non-reentrant checkpointing stops a recomputation by raising once it has what it
        needs, and the module's forward hook then never runs."""
        hold = self._open(args)
        self.frame, self.module = frame, module
        return hold

    def begin_region(self, frame: FrameType, args: Any) -> Hold:
        """A recomputation's function runs an op outside every recomputed module (see the
        module docstring): a new hold for the pins of its own ops, released as begin's; its
        arguments (``args``) are pinned into it by the caller."""
        hold = self._open(args)
        self.region, self.region_hold, self.region_pinned = frame, hold, set()
        return hold

    def _open(self, args: Any) -> Hold:
        hold: Hold = []
        self.holds.append(hold)
        for t in leaves(args):
            # Not on a parameter passed to the checkpointed function: its gradient comes when
            # the backward has used every path to it. Such a hold goes with another
            # argument's gradient, else at the backward's end. A leaf that is no parameter is
            # what reentrant checkpointing recomputes from (the inputs it detached): without
            # a hook on it, every region's hold lasted until the whole backward ended (out of
            # memory at a third with every block checkpointed so in the forward).
            if (isinstance(t, torch.Tensor) and t.requires_grad
                    and not isinstance(t, torch.nn.Parameter)):
                handle: List[Any] = []
                release = self._release_from(hold, handle)
                # On the node that makes the argument as it is now, not through
                # t.register_hook: torch 1.13 keeps a tensor's hooks on the node it had at its
                # first hook, and a block's output is often its last child's, modified in place
                # (``out += x; return relu_(out)``: torchvision's ResNet blocks), which offload
                # hooked as the child returned (a safe point). The hold then went when the
                # child's node ran, after the recomputation of the stage before had opened its
                # own, which went with it: that stage's backward read its weights unpinned
                # (audit 43u F0, a segmentation fault on the CPU bridge). Either hook runs
                # before its node, when every gradient of the argument is in.
                node = t.grad_fn
                handle.append(node.register_prehook(release) if node is not None
                              else t.register_hook(release))
        return hold

    def current(self) -> Hold:
        return self.holds[-1]

    def is_end(self, module: torch.nn.Module) -> bool:
        return module is self.module and call_frame() is self.frame

    def end(self) -> None:
        """The outermost recomputed module returned (its hold stays: see begin)."""
        self.frame = self.module = None

    def running(self) -> bool:
        """Whether the outermost recomputed module's call is on the calling thread's stack
        (below the backward's frame): not when it raised, as torch 2's checkpointing makes it
        stop a recomputation."""
        return self.frame is not None and _within(sys._getframe(2), self.frame)

    def _release_from(self, hold: Hold, handle: List[Any]) -> Callable[[Any], None]:
        def hook(grad: Any) -> None:  # (a tensor's hook: its gradient; a node's: all of them)
            if handle:  # (once: a leaf the caller keeps gets no more each step)
                handle.pop().remove()
            for i, h in enumerate(self.holds):
                if h is hold:
                    self.release(i)
                    return
        return hook

    def release(self, start: int = 0) -> None:
        """Releases the holds from ``start`` on (all by default: the backward is over)."""
        if start == 0:
            self.frame = self.module = None
        released, self.holds[start:] = self.holds[start:], []
        if self.region_hold is not None and any(h is self.region_hold for h in released):
            self.region = self.region_hold = None
            self.region_pinned = set()
        stream = self._pinner.stream()
        for hold in reversed(released):
            for token, wrote in hold:
                self._pinner.unpin(token, stream, bool(wrote))  # (see _offload_pins._Read)
            # Emptied: the hook begin() left on an argument keeps its hold, and a hold's
            # _Read keeps its tensor, whose graph reaches that argument's hook: a cycle
            # through autograd's C++ nodes that the collector cannot see. With
            # checkpointing (use_reentrant=False) in the model's forward, that kept each
            # step's recomputed arguments and, after remove(), the model (0.75 MiB more
            # every step of 4 checkpointed blocks at a batch of 128).
            hold.clear()

"""functorch's transforms (``vmap``, ``grad``, ``jacrev``, ``hessian``; ``torch.func`` in
torch 2) beside offload(). Each runs inside ``torch.autograd.graph.disable_saved_tensors_hooks``,
which raises when saved-tensor hooks are pushed, and offload's window keeps its own pushed
while a handle lives (_window.py), as does an offloaded model's training forward: every
transform failed with "functorch transforms don't yet support saved tensor hooks". While the
outermost transform runs on the thread that trains, spill's hooks are popped and pushed back
after it: the window's, and those of the one handle whose forward runs (a transform inside
the model's forward).
In the training loop's code the window's dispatch mode stays, so the transform's ops (which
reach it unbatched) pin what they read. Inside a forward, where that mode is off, the
transform runs under a mode of its own that pins every op (_TransformReads); in grad mode,
what its ops read that was made before it (weights, activations) stays pinned until the step
ends: the graph the forward records through the transform saves them without the hooks, and
the backward reads them unpinned otherwise. What a transform's own graph saves is not packed:
a transform that computes gradients uses its graph before it returns, with every op pinned.
Hooks of the caller's pushed above spill's (``save_on_cpu``) make the transform raise as in
plain PyTorch; they are not popped (spill's hooks are taken to be the top of the stack:
torch 1.13 does not say which are). Forwards of several offloaded models nested in one
another are not covered (the transform raises).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import threading
from typing import Any, Dict, Iterator, Set, Tuple

import torch
import torch.autograd.graph as _graph
from torch.utils._pytree import tree_flatten

from ._guard import PinEveryOp
from ._state import state

_original = _graph.disable_saved_tensors_hooks
_running = threading.local()   # .depth: transforms running on this thread


def _hooks_on_top() -> Tuple[Any, Any]:
    """(the calling thread's window, when its saved-tensor hooks are pushed, the handle
    whose forward has pushed its own above them), each None when absent; (None, None) when
    several handles' forwards have (nested models: their order is not known here)."""
    from ._window import current
    w = current()
    if w is None or state.forked_child:
        return None, None
    pushed = [h for h in list(w.handles) if getattr(h, "_saved_hooks_pushed", False)]
    if len(pushed) > 1:
        return None, None
    return (w if w._hooks else None), (pushed[0] if pushed else None)


class _TransformReads(PinEveryOp):
    """A transform's ops inside an offloaded model's forward, where the window's dispatch mode
    is off: every op pinned, nothing declared (the model's own hooks do nothing in a
    transform), and the tensors made before the transform that its ops read (the module's
    weights, the activations it was given) noted."""

    declares = False

    def __init__(self, pinner: Any) -> None:
        super().__init__(pinner)
        self.read: Dict[int, torch.Tensor] = {}
        self.made: Set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        movable = self.pinner.movable
        for t in tree_flatten((args, kwargs or {}))[0]:
            ptr = movable(t)
            if ptr and ptr not in self.made and ptr not in self.read:
                self.read[ptr] = t
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for t in tree_flatten(out)[0]:
            ptr = movable(t)
            if ptr and ptr not in self.read:
                self.made.add(ptr)
        return out


@contextlib.contextmanager
def disable_saved_tensors_hooks(error_message: str) -> Iterator[None]:
    """``torch.autograd.graph.disable_saved_tensors_hooks`` with spill's hooks taken off the
    stack for the block (see the module docstring)."""
    depth = getattr(_running, "depth", 0)
    w, handle = _hooks_on_top() if depth == 0 else (None, None)
    reads = None
    if handle is not None:
        handle._pop_saved_hooks()
        reads = _TransformReads(handle.pinner)
    if w is not None:
        torch._C._autograd._pop_saved_tensors_default_hooks()
    grad = torch.is_grad_enabled()
    _running.depth = depth + 1
    try:
        if reads is not None:
            with reads, _original(error_message):
                yield
        else:
            with _original(error_message):
                yield
    finally:
        _running.depth = depth
        if w is not None:
            torch._C._autograd._push_saved_tensors_default_hooks(w._pack, w._unpack)
        if handle is not None:
            handle._push_saved_hooks(handle._quiet)
            if grad:
                handle._hold_until_step_ends(list(reads.read.values()))


def _vmap_module() -> Any:
    """The module whose ``_flat_vmap`` runs every vmap: torch 2's torch._functorch.vmap;
    torch 1.13's functorch._src.vmap when functorch has been imported (its vmap reaches
    disable_saved_tensors_hooks anyway), else None."""
    try:
        module = importlib.import_module("torch._functorch.vmap")
    except ImportError:
        module = sys.modules.get("functorch._src.vmap")
    return module if callable(getattr(module, "_flat_vmap", None)) else None


class _VmapReads(PinEveryOp):
    """torch 2's vmap inside an offloaded model's forward: every op pinned, nothing declared
    (the model's hooks do nothing inside it; the saved-tensor hooks stay and pin what the
    backward unpacks, as for any activation)."""

    declares = False


def _vmap(original: Any) -> Any:
    """``_flat_vmap`` run as a transform: torch 2's vmap no longer takes saved-tensor hooks
    off (only grad, vjp, jacrev and hessian do), so it never reaches
    disable_saved_tensors_hooks. spill's saved-tensor hooks stay on (autograd saves the
    unbatched tensors: the window's and the forward's hooks pin them when the backward, after
    the vmap, unpacks them); the model's module hooks do nothing inside (in_transform), its
    ops are pinned by the window's mode, or inside a forward by a mode of its own. torch
    1.13's vmap still calls disable_saved_tensors_hooks inside, which takes the hooks off."""
    @functools.wraps(original)
    def flat_vmap(*args: Any, **kwargs: Any) -> Any:
        vmaps = getattr(_running, "vmaps", 0)
        _, handle = _hooks_on_top() if vmaps == 0 else (None, None)
        _running.vmaps = vmaps + 1
        try:
            if handle is None:
                return original(*args, **kwargs)
            with _VmapReads(handle.pinner):
                return original(*args, **kwargs)
        finally:
            _running.vmaps = vmaps
    flat_vmap._spill_vmap = True  # type: ignore[attr-defined]
    return flat_vmap


def in_transform() -> bool:
    """Whether a transform runs on this thread. An offloaded model's hooks then do nothing:
    its modules run as a copy's would (``make_functional``'s), their ops pinned by the
    window's dispatch mode, their tensors functorch's wrappers, which have no storage."""
    return getattr(_running, "depth", 0) > 0 or getattr(_running, "vmaps", 0) > 0


def install() -> None:
    """Puts :func:`disable_saved_tensors_hooks` in place of torch's (functorch looks it up
    at each call) and wraps vmap's ``_flat_vmap`` (looked up in its module at each call);
    once per process."""
    if _graph.disable_saved_tensors_hooks is _original:
        _graph.disable_saved_tensors_hooks = disable_saved_tensors_hooks
    module = _vmap_module()
    if module is not None and not getattr(module._flat_vmap, "_spill_vmap", False):
        module._flat_vmap = _vmap(module._flat_vmap)

"""functorch's transforms (``vmap``, ``grad``, ``jacrev``, ``hessian``; ``torch.func`` in
torch 2) beside offload(). Each runs inside ``torch.autograd.graph.disable_saved_tensors_hooks``,
which raises when saved-tensor hooks are pushed, and offload's window keeps its own pushed
while a handle lives (_window.py): every transform in the training loop's code failed with
"functorch transforms don't yet support saved tensor hooks". While the outermost transform
runs on the thread that trains, with no forward of an offloaded model running (its hooks would
be above the window's), the window's hooks are popped and pushed back after it; the window's
dispatch mode stays, so the transform's ops (which reach it unbatched) pin what they read.
What a transform's graph saves is not packed: a transform that computes gradients uses its
graph before it returns, with every op pinned.
Hooks of the caller's pushed above the window's (``save_on_cpu``) make the transform raise as
in plain PyTorch; they are not popped.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
import torch.autograd.graph as _graph

from ._state import state

_original = _graph.disable_saved_tensors_hooks
_running = threading.local()   # .depth: transforms running on this thread


def _window_hooks_on_top() -> Any:
    """The window whose saved-tensor hooks are the top of this thread's stack, else None."""
    from ._window import _windows
    w = _windows.get(0)
    if (w is None or not w._hooks or state.forked_child
            or threading.get_ident() != w.thread):
        return None
    if any(getattr(h, "_saved_hooks_pushed", False) for h in list(w.handles)):
        return None  # (a forward of an offloaded model runs: its hooks are above)
    return w


@contextlib.contextmanager
def disable_saved_tensors_hooks(error_message: str) -> Iterator[None]:
    """``torch.autograd.graph.disable_saved_tensors_hooks`` with the window's hooks taken off
    the stack for the block (see the module docstring)."""
    depth = getattr(_running, "depth", 0)
    w = _window_hooks_on_top() if depth == 0 else None
    if w is not None:
        torch._C._autograd._pop_saved_tensors_default_hooks()
    _running.depth = depth + 1
    try:
        with _original(error_message):
            yield
    finally:
        _running.depth = depth
        if w is not None:
            torch._C._autograd._push_saved_tensors_default_hooks(w._pack, w._unpack)


def in_transform() -> bool:
    """Whether a transform runs on this thread. An offloaded model's hooks then do nothing:
    its modules run as a copy's would (``make_functional``'s), their ops pinned by the
    window's dispatch mode, their tensors functorch's wrappers, which have no storage."""
    return getattr(_running, "depth", 0) > 0


def install() -> None:
    """Puts :func:`disable_saved_tensors_hooks` in place of torch's (functorch looks it up
    at each call); once per process."""
    if _graph.disable_saved_tensors_hooks is _original:
        _graph.disable_saved_tensors_hooks = disable_saved_tensors_hooks

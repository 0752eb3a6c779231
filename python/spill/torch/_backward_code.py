"""The caller's code that the autograd engine runs inside a backward, where no module hook pins
what it reads, beside offload():
- a hook on a tensor autograd made (``y.register_hook(fn)`` on an activation in a forward, or
  on a loss in the loop's code) whose ``fn`` reads another tensor than its gradient (a
  weight, an activation the forward kept): registered while a handle lives, it runs with
  every op pinned (nothing declared), as a module's backward hooks do (_offload_grads.py). Hooks on
  a leaf (a parameter) too, registered while a handle lives (offload also wraps a
  parameter's hooks at each step's first forward: _offload_grads.py, _pin_hooks); those
  spill.torch registers itself are left as they are.
- a custom ``torch.autograd.Function`` whose ``backward`` reads a tensor the forward kept on
  ``ctx`` as an attribute (``ctx.w = w``) rather than through ``save_for_backward`` (whose
  tensors the saved-tensor hooks pin when they are unpacked), or reaches one otherwise (a
  module on the ctx, a closure): a Function written outside torch runs its ``backward`` with
  every op pinned; for torch's own, the tensors among the ctx's attributes (or in a list or
  tuple there) that can move are pinned around its ``backward``.
Both used to read a weight swapped out to the host: a segmentation fault on the CPU bridge.
Installed once per process (the window's construction); they pass through while no handle
lives. Cost: one Python call per registration, a dispatch mode per wrapped hook call, and a
look at the ctx's attributes per custom Function's backward."""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch.autograd.function import BackwardCFunction

from ._guard import PinEveryOp
from ._pins import Pinner
from ._state import state
from ._transforms import in_transform

_OWN = __name__.rpartition(".")[0]  # spill.torch: its own hooks pin what they need
_register_hook = torch.Tensor.register_hook
_backward_apply = BackwardCFunction.apply


class _PinOps(PinEveryOp):
    declares = False


def _live_pinner() -> Any:
    """A window's pinner while some offload handle lives (on any thread), else None."""
    from ._window import live_pinner
    return None if state.forked_child else live_pinner()


def _pinned(hook: Any, pinner: Pinner) -> Any:
    def pinned(*args: Any, **kwargs: Any) -> Any:
        if state.forked_child:
            return hook(*args, **kwargs)
        with _PinOps(pinner):
            return hook(*args, **kwargs)
    pinned._spill_original = hook  # type: ignore[attr-defined]  # (_offload_grads._pin_hooks)
    return pinned


def register_hook(self: torch.Tensor, hook: Any) -> Any:
    """``Tensor.register_hook`` with the hook run pinned (see the module docstring) when an
    offload handle lives. On a leaf too: offload wraps a parameter's hooks at each step's
    first forward, but one registered between a forward and its backward (reading another
    weight: ``w.register_hook(lambda g: g + 1e-3 * other.weight)``) ran unwrapped before
    then (a segmentation fault on the CPU bridge)."""
    if not in_transform() and not str(getattr(hook, "__module__", "")).startswith(_OWN):
        pinner = _live_pinner()
        if pinner is not None:
            hook = _pinned(hook, pinner)
    return _register_hook(self, hook)


def _ctx_tensors(ctx: Any) -> List[torch.Tensor]:
    found: List[torch.Tensor] = []
    for value in getattr(ctx, "__dict__", {}).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _callers(ctx: Any) -> bool:
    """Whether the Function of this backward is one written outside torch (and spill)."""
    module = str(getattr(getattr(ctx, "_forward_cls", None), "__module__", ""))
    return not module.startswith(("torch.", _OWN))


def backward_apply(self: Any, *args: Any) -> Any:
    """``BackwardCFunction.apply`` (the engine's call of a custom Function's backward) with the
    tensors kept on the ctx as attributes pinned around it, and, for a Function written
    outside torch, every op of its backward pinned: it may reach a weight through a module
    kept on the ctx (``ctx.mod.weight``) or a closure, which no attribute shows (before: read
    on the host, a segmentation fault on the CPU bridge). torch's own Functions (reentrant
    checkpointing's, which recomputes a forward there) run as they are."""
    pinner = _live_pinner()
    if pinner is not None and _callers(self):
        with _PinOps(pinner):
            return _backward_apply(self, *args)
    tensors = _ctx_tensors(self) if pinner is not None else ()
    if not tensors:
        return _backward_apply(self, *args)
    stream = pinner.stream()
    held: List[Tuple[Any, torch.Tensor, int]] = []
    seen = set()
    try:
        for t in tensors:
            ptr = pinner.movable(t)
            if ptr and ptr not in seen:
                seen.add(ptr)
                token = pinner.pin(ptr, stream)
                if token is not None:
                    held.append((token, t, t._version))
        return _backward_apply(self, *args)
    finally:
        for token, t, version in held:
            pinner.unpin(token, stream, t._version != version)


def install() -> None:
    """Puts :func:`register_hook` and :func:`backward_apply` in place; once per process."""
    if torch.Tensor.register_hook is _register_hook:
        torch.Tensor.register_hook = register_hook  # type: ignore[assignment]
    if BackwardCFunction.apply is _backward_apply:
        BackwardCFunction.apply = backward_apply  # type: ignore[assignment]

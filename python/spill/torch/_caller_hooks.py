"""The saved-tensor hooks the caller entered (``torch.autograd.graph.saved_tensors_hooks``,
``save_on_cpu``), per thread, so that offload's own, pushed above them for a forward, can pass
what autograd saves through them: PyTorch calls only the top pair of its stack. Before,
offload's hooks hid the caller's from the first armed step on (activation compression with a
lossy pack: losses left plain torch's; ``save_on_cpu()`` around an offloaded forward did
nothing). Only hooks entered through that class (its subclasses included) are seen; the
raw ``torch._C._autograd._push_saved_tensors_default_hooks`` is not. Installed once per
process; costs a list append and pop per ``with``.

A pair entered while offload's own hooks are pushed on the thread (inside an offloaded
model's forward: around each block in the parent's forward, in a module's own forward) is
pushed chained with offload's pair (:func:`chained`, as offload chains an outer pair), so
that both run. Before, it sat above offload's and replaced it for everything saved while it
was on: offload's pack never saw a Linear's saved ``weight.t()``, the backward's unpack
pinned nothing, and ``mm`` read the parameter on the host (a segmentation fault on the CPU
bridge, an illegal memory access on a GPU; audit 39a F1)."""
from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_map

Hooks = Tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]

_local = threading.local()
_enter = saved_tensors_hooks.__enter__
_exit = saved_tensors_hooks.__exit__


def _stack() -> List[Hooks]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _entered(self: saved_tensors_hooks) -> Any:
    pair = (self.pack_hook, self.unpack_hook)
    ours = getattr(_local, "ours", None)
    if ours:
        # offload's hooks are pushed on this thread (a forward runs): the pair goes above
        # them chained with them, through torch's own __enter__ (whatever it does), and the
        # one pop of __exit__ takes it off. The innermost pair alone runs with offload's, as
        # plain torch runs only the innermost.
        self.pack_hook, self.unpack_hook = chained(*ours[-1], pair)
        try:
            result = _enter(self)
        finally:
            self.pack_hook, self.unpack_hook = pair
    else:
        result = _enter(self)
    _stack().append(pair)
    return result


def _exited(self: saved_tensors_hooks, *exc: Any) -> Any:
    stack = _stack()
    if stack and stack[-1] == (self.pack_hook, self.unpack_hook):
        stack.pop()
    return _exit(self, *exc)


def pushed(hooks: Hooks) -> None:
    """offload pushed its own pair (``hooks``, before any chaining) on this thread."""
    ours = getattr(_local, "ours", None)
    if ours is None:
        ours = _local.ours = []
    ours.append(hooks)


def popped(hooks: Hooks) -> None:
    """offload popped the pair it pushed on this thread (:func:`pushed`)."""
    ours = getattr(_local, "ours", None)
    if ours:
        for i in range(len(ours) - 1, -1, -1):
            if ours[i] == hooks:
                del ours[i]
                break


def top() -> Optional[Hooks]:
    """The innermost pair the caller entered on this thread and has not left, or None."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def chained(pack: Callable[[torch.Tensor], Any], unpack: Callable[[Any], torch.Tensor],
            caller: Hooks) -> Hooks:
    """Hooks that run the caller's pack first and ``pack`` on each tensor in what it returns
    (a compressed copy; the tensor itself; ``save_on_cpu``'s ``(device, tensor.cpu())``, which
    on the CPU bridge is the tensor itself: kept raw, a weight was read on the host in the
    backward); unpack in the opposite order (``unpack`` gives back what ``pack`` did not
    make)."""
    caller_pack, caller_unpack = caller

    def pack_tensor(v: Any) -> Any:
        return pack(v) if isinstance(v, torch.Tensor) else v

    def pack_both(t: torch.Tensor) -> Any:
        return tree_map(pack_tensor, caller_pack(t))

    def unpack_both(packed: Any) -> torch.Tensor:
        return caller_unpack(tree_map(unpack, packed))
    return pack_both, unpack_both


def install() -> None:
    """Puts the tracking ``__enter__``/``__exit__`` in place; once per process."""
    if saved_tensors_hooks.__enter__ is _enter:
        saved_tensors_hooks.__enter__ = _entered  # type: ignore[assignment]
        saved_tensors_hooks.__exit__ = _exited  # type: ignore[assignment]

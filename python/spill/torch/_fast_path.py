"""PyTorch's fused evaluation path for nn.TransformerEncoderLayer, nn.TransformerEncoder and
nn.MultiheadAttention under guard() and pin_reads(), whose host-reads function mode would
otherwise turn it off.

PyTorch takes that path (one op that reads the children's parameters) only while no function
mode is on (torch.overrides.has_torch_function), and the slower path's numbers differ from it
(by up to 7e-7 on an AVX-512 machine, 2026-12-07, audit 43u F1). While a guard or a pin_reads
block is entered somewhere, the three classes' ``__call__`` takes those modes off the calling
thread's function stack around an evaluation call that runs only PyTorch's code (see
``only_torch``) and puts them back in the same order when it returns or raises. What the
fused op reads stays pinned: guard's and pin_reads' dispatch modes pin every tensor argument of
every op (the mode off is the host reads': ``.numpy()``, ``.tolist()``, printing, torch.save,
which PyTorch's code there does not call). offload has its own exemption for its evaluation
forwards (OffloadHandle._fast_path_enter)."""
from __future__ import annotations

import os
import threading
from typing import Any, List, Optional

import torch
from torch.nn.modules import module as _module

# PyTorch's modules whose evaluation forward takes a fused fast path only while no function
# mode is on.
FAST_PATH_MODULES = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerEncoder,
                     torch.nn.MultiheadAttention)

_SPILL = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_lock = threading.Lock()
_entered = 0  # guard and pin_reads blocks entered, all threads


def steps_aside(mode: Any) -> Any:
    """Marks ``mode`` (a host-reads function mode of guard's or pin_reads') as one the three
    classes' evaluation calls take off the stack; returns it."""
    mode.spill_steps_aside = True
    return mode


def entered() -> None:
    """A guard or pin_reads block was entered: the three classes' ``__call__`` is spill's
    (installed by the first)."""
    global _entered
    with _lock:
        _entered += 1
        if _entered == 1:
            for cls in FAST_PATH_MODULES:
                cls.__call__ = _call  # type: ignore[assignment]


def left() -> None:
    """A guard or pin_reads block was left: the last one gives the classes back their own
    ``__call__`` (nn.Module's)."""
    global _entered
    with _lock:
        _entered -= 1
        if _entered == 0:
            for cls in FAST_PATH_MODULES:
                if cls.__dict__.get("__call__") is _call:
                    del cls.__call__


def _call(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    # nn.Module.__call__ looked up at each call: torch.fx's tracer replaces it while it traces.
    if (self.training or torch.is_grad_enabled() or type(self) not in FAST_PATH_MODULES
            or not torch._C._len_torch_function_stack() or not _plain_tensors(args, kwargs)
            or not only_torch(self)):
        return torch.nn.Module.__call__(self, *args, **kwargs)
    aside = _take_aside()
    if aside is None:
        return torch.nn.Module.__call__(self, *args, **kwargs)
    try:  # (a signal meanwhile waits until this returns: _interrupts counts it spill's)
        return torch.nn.Module.__call__(self, *args, **kwargs)
    finally:
        _put_back(aside)


def _take_aside() -> Optional[List[Any]]:
    """Takes every mode off the calling thread's function stack when all of them step aside,
    and returns them bottom first; else None, the stack as it was (a mode of the caller's, or
    another of spill's such as offload's window, keeps the slower path)."""
    from torch import overrides
    length = torch._C._len_torch_function_stack
    taken: List[Any] = []
    while length() > 0:
        mode = overrides._pop_mode()
        taken.append(mode)
        if not getattr(mode, "spill_steps_aside", False):
            for m in reversed(taken):
                overrides._push_mode(m)
            return None
    taken.reverse()
    return taken


def _put_back(taken: List[Any]) -> None:
    """Puts the modes _take_aside took back under whatever the call left on the stack."""
    from torch import overrides
    above = [overrides._pop_mode() for _ in range(torch._C._len_torch_function_stack())]
    for m in taken:
        overrides._push_mode(m)
    for m in reversed(above):
        overrides._push_mode(m)


def _plain_tensors(args: Any, kwargs: Any) -> bool:
    """Whether the call's tensor arguments are plain tensors: a subclass's __torch_function__
    is the caller's code, which may read a tensor on the host."""
    return all(type(v) in (torch.Tensor, torch.nn.Parameter)
               for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))


def _torchs(fn: Any) -> bool:
    """Whether callable ``fn`` is PyTorch's (``F.relu``, ``F.gelu``, ``torch.tanh``)."""
    where = getattr(fn, "__module__", None) or ""
    return where == "torch" or where.startswith("torch.")


def only_torch(module: torch.nn.Module) -> bool:
    """Whether the call runs PyTorch's code only, which reads no tensor on the host: the module
    and every module under it are torch.nn's own classes (with a child of the caller's class
    the call keeps the slower path), the functions they keep are PyTorch's (a layer's
    ``activation=`` of the caller's may read a tensor on the host: review 43r F2), with no
    hook but spill's (one of the caller's may read an output on the host), and no global
    module hook is set."""
    if any(getattr(_module, name, None) for name in _GLOBAL_HOOKS):
        return False
    for m in module.modules():
        if not type(m).__module__.startswith("torch.nn."):
            return False
        for value in vars(m).values():
            if (callable(value) and not isinstance(value, (torch.nn.Module, torch.Tensor, type))
                    and not _torchs(value)):
                return False
        for name in _HOOKS:
            for hook in getattr(m, name, _NONE).values():
                if not _spills(hook):
                    return False
    return True


# nn.Module's hook dictionaries, global and per module (the backward pre-hooks: torch 2).
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")
_NONE: dict = {}


def _spills(hook: Any) -> bool:
    code = getattr(getattr(hook, "__func__", hook), "__code__", None)
    return code is not None and code.co_filename.startswith(_SPILL)

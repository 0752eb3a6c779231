"""spill.torch.pin_reads(): the supported way for a thread other than the one that trains (an
asynchronous checkpoint, logging or EMA thread) to use an offloaded model's tensors.

offload()'s hooks and window pin only on the thread that trains (PyTorch's mode stacks and
saved-tensor hooks are per thread), so another thread that reads a parameter the swapper has
moved to the host touches unmapped memory: a SIGSEGV on the CPU bridge, an illegal address
that ends the CUDA context on a GPU. Neither can be turned into an exception cheaply (the read
is a kernel's; nothing of spill's runs in it). Under pin_reads the calling thread runs the
window's modes (_window.py): every spill tensor an aten op reads or writes is pinned around
the op, nothing is made swappable, and on the CPU bridge ``.numpy()``, ``.tolist()``,
printing and torch.save's storages are pinned as in the window. Its pins belong to the
thread's own step scope (0 unless it named one), which has no steps: they neither enter nor
disturb the training scope's recording and plan (the swapper's rule)."""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from spill import Error

from . import _fast_path as fast_path
from ._pins import Pinner, call_raising_out_of_memory
from ._state import state, torch_version
from ._window import _HostUses, _PinReads


class _Reads:
    """What the window's modes use of their window outside a backward: the pinner, a count of
    their own calls running, and the handles (one that never goes: these modes pin until the
    block ends)."""

    def __init__(self) -> None:
        self.pinner = Pinner()
        self.busy = 0
        self.handles = (self,)


def host_reads(guards_backward: bool = False) -> Optional[Any]:
    """The window's function mode with only its host reads (``.numpy()``, ``.tolist()``,
    printing, torch.save's storages), not yet entered, for guard() and offload's forwards on
    the CPU bridge, where host code reads tensor memory directly; None on a GPU, where those
    read through a copy op that the dispatch modes pin. Before, under guard, ``.tolist()`` or
    ``torch.save`` of an optimizer's state tensor on the host (no op before it to bring it
    back) was a segmentation fault on the CPU bridge.
    guards_backward (guard's): with torch 1.x (then also on a GPU), ``Tensor.backward`` and
    ``torch.autograd.grad`` raise an out-of-memory error that the engine handed on as a
    plain RuntimeError as the torch.cuda.OutOfMemoryError it was: a non-reentrant
    checkpoint's recomputation runs in checkpoint's unpack hook, where torch 1.13's engine
    wraps a pin's or an allocation's error so (audit 43u F2, still so under guard alone until
    2026-12-07; offload's window did it already)."""
    reads = _Reads()
    engine_wraps = guards_backward and torch_version() < (2, 0, 0)
    if not reads.pinner.cpu and not engine_wraps:
        return None
    functions = _HostUses(reads)  # type: ignore[arg-type]
    functions.special.pop(torch.Tensor.data.__set__, None)  # (the window's)
    for func in (torch.Tensor.backward, torch.autograd.grad):
        # (their ops are the dispatch modes' to pin)
        if engine_wraps:
            functions.special[func] = call_raising_out_of_memory
        else:
            functions.special.pop(func, None)
    return functions


class pin_reads:
    """``with spill.torch.pin_reads(): ...`` runs the block with every spill tensor of every
    aten op pinned around the op, on the calling thread, and makes nothing swappable: what an
    asynchronous checkpoint, logging or EMA thread needs to read (or write) the tensors of a
    model that ``offload`` or ``guard`` trains on another thread. Use it in that thread around
    every use of the model's tensors::

        def checkpoint():
            with spill.torch.pin_reads():
                torch.save(model.state_dict(), path)

    The reads give plain torch's values and leave the training's recorded step and plan as
    they were (they bring swapped tensors back, so they add copies). A view (``detach``, a
    slice) pins nothing: its later ops do. On the CPU bridge, ``.numpy()`` keeps the block
    pinned while the array lives, ``.tolist()`` and printing pin around the call and
    ``torch.save`` writes copies taken pinned. Not covered: raw pointers (``data_ptr()``) and
    arrays or tensors that escape the block without a copy (``.numpy()`` excepted), then used
    after it. The training thread needs none of this between its hooked regions (offload's
    window pins there). Requires spill.torch.enable() first; nests; costs a dispatch-mode call
    per op of the block.
    """

    def __init__(self) -> None:
        self._modes: List[Any] = []

    def __enter__(self) -> "pin_reads":
        if not state.active:
            if state.forked_child:
                return self  # a forked child never touches the parent's runtime
            raise Error("spill.torch.pin_reads: spill is not PyTorch's allocator in this "
                        "process; call spill.torch.enable() first")
        reads = _Reads()
        functions = _HostUses(reads)  # type: ignore[arg-type]
        functions.special.pop(torch.Tensor.backward, None)  # a backward here: its ops pinned
        pins = _PinReads(reads)  # type: ignore[arg-type]
        functions.__enter__()
        try:
            pins.__enter__()
        except BaseException:
            functions.__exit__(None, None, None)
            raise
        self._modes = [fast_path.steps_aside(functions), pins]
        fast_path.entered()
        return self

    def __exit__(self, *exc: Any) -> Optional[bool]:
        modes, self._modes = self._modes, []
        if modes:
            fast_path.left()
        for mode in reversed(modes):
            mode.__exit__(*exc)
        return None

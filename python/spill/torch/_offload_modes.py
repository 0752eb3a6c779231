"""The dispatch and function modes offload pushes (the first step's discovery, an evaluation
forward's, a busy module's), and the first step's measure of what each module's frame would
hold (_busy). Mixed into OffloadHandle; the design is in _offload.py's docstring."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from spill import OutOfMemoryError

from ._guard import PinEveryOp
from ._offload_pins import _STRIDED, _evaluation_oom
from ._pins import Pinner, leaves, storage
from ._recompute import ModuleCall
from ._state import state
from ._window import _dispatch_stack, _function_stack, _remove

if TYPE_CHECKING:  # (for annotations only: _offload imports this module)
    from ._offload import OffloadHandle


class _Held:
    """The first step's count of what a module's frame would hold (OffloadHandle._count_held):
    the blocks counted (address -> generation, bytes) and the bytes counted since their last
    check."""
    __slots__ = ("blocks", "unchecked")

    def __init__(self) -> None:
        self.blocks: Dict[int, Tuple[int, int]] = {}
        self.unchecked = 0


class _PinOps(PinEveryOp):
    """A busy module's mode with children (see OffloadHandle._pre_module): pins every op,
    declares nothing."""

    declares = False


class _EvalOps(_PinOps):
    """An evaluation forward's mode (see OffloadHandle._begin_forward): pins every op (so the
    forward pins neither its arguments nor its modules' outputs for longer), and, as the
    window's mode between the hooked regions, notes the large tensors its ops make: an op that
    runs out of memory runs again once those made since the last training region, and still
    alive, are declared swappable (Window.declare_made), until that region begins. A KV cache
    grown by ``torch.cat`` in the forward and handed back by the caller at each token moves so
    between tokens and layers; before, every layer's cache stayed resident, and pinned for the
    whole forward by the root's pre-hook (out of memory at half a generation's footprint)."""

    def __init__(self, pinner: Pinner, window: Any) -> None:
        super().__init__(pinner)
        self.window = window

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        try:
            try:
                out = super().__torch_dispatch__(func, types, args, kwargs)
            except (torch.cuda.OutOfMemoryError, OutOfMemoryError):
                if state.forked_child or not self.window.declare_made():
                    raise
                out = super().__torch_dispatch__(func, types, args, kwargs)
        except (torch.cuda.OutOfMemoryError, OutOfMemoryError) as e:
            raise _evaluation_oom(e) from e
        if not state.forked_child:
            self.window.note_made(args, kwargs, out)
        return out


class _NewStorage(TorchFunctionMode):
    """A busy module's function mode (beside its ops mode): ``p.data = new`` in its code, for a
    parameter or buffer of a module that is not running (MoCo's EMA of the key encoder,
    ``pk.data = pk.data * m + pq.data * (1 - m)``, in the forward of the module that holds
    both encoders) makes the modules that own it look at it at once, as the window does, so
    the new storage is declared as it is made; before, every new weight stayed resident and
    undeclared until the forward ended. Each module's pre-hook pins what it holds then. A
    ``.data =`` elsewhere in a forward is looked at when the entry's forward ends."""

    def __init__(self, handle: OffloadHandle) -> None:
        super().__init__()
        self.handle = handle

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func != _SET_DATA or state.forked_child:
            return func(*args, **kwargs)
        h = self.handle
        t = args[0]
        ptr = storage(t).data_ptr() if isinstance(t, torch.Tensor) and not t.is_meta else 0
        owners = set(h._owners.get(ptr, ())) if ptr in h._persistent else set()
        result = func(*args, **kwargs)
        if owners and not any(f.module in owners for f in h._frames):
            h._refresh(owners)
        return result


_SET_DATA = torch.Tensor.data.__set__  # (a new method-wrapper at each access: compared by ==)


class _BusyLeafOps(PinEveryOp):
    """A busy module without children (OffloadHandle._busy): its ops pin what they use and
    declare what they make while its call runs. If the call raises and its caller catches
    the exception, the mode stays on the stack until the next hook unwinds the frame; the
    caller's code that runs under it meanwhile, whose outputs the caller's frame may read
    without pins, is pinned op by op but declares nothing. Under DDP it declares only what
    its ops make (see _Discovery)."""

    def __init__(self, pinner: Pinner, acts: Any, call: ModuleCall, ddp: bool) -> None:
        super().__init__(pinner, None, acts)
        self.call = call
        self.declares_arguments = not ddp

    @property  # type: ignore[override]
    def declares(self) -> bool:
        return self.call.running()


class _Discovery(PinEveryOp):
    """The first step's mode: pins every op (as guard) and notes parameters used while no
    module that owns them is running. Under DDP it declares what its ops make, not what they
    were given: a tensor made before (DDP's gradient buckets, which its reducer writes in the
    backward with aten ops and hands to the communication library) stays put. Elsewhere what
    its ops are given is declared too, as guard does: a sparse embedding's first step needs
    it (test_sparse_embedding_gradients_are_pinned_through_their_indices_and_values runs out
    of memory without)."""

    def __init__(self, handle: OffloadHandle) -> None:
        super().__init__(handle.pinner, handle.steps, handle._acts)
        self.handle = handle
        self.declares_arguments = not handle._ddp

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        try:
            return self._dispatch(func, types, args, kwargs)
        except (torch.cuda.OutOfMemoryError, OutOfMemoryError):
            # As an evaluation forward's ops (_EvalOps): what the window's ops made since the
            # last training region (a KV cache preallocated before the first forward) can
            # move, since every op here is pinned too.
            if state.forked_child or not self.handle._window.declare_made():
                raise
            return self._dispatch(func, types, args, kwargs)

    def _dispatch(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        h = self.handle
        if h._discovery is not self:  # left in a backward, still on the stack (_take_off)
            return func(*args, **(kwargs or {}))
        top = h._discovered_top()
        if top is not None:
            running = h._stack_set
            for t in tree_flatten((args, kwargs or {}))[0]:
                if isinstance(t, torch.Tensor) and not t.is_meta and t.layout == _STRIDED:
                    owners = h._owners.get(storage(t).data_ptr())
                    if owners and not (owners & running):
                        extra = h._extra.setdefault(top, {})
                        if id(t) not in extra:
                            extra[id(t)] = t
                            h._count_held(top, (t,), persistent=True)
            out = super().__torch_dispatch__(func, types, args, kwargs)
            h._count_held(top, out)  # what its own code makes
            return out
        elif torch.is_grad_enabled() and not h._window.graphs and not h._window.pins_ops():
            # Forward code outside every module of the model (a parent's forward reading a
            # child's weight: a tied LM head): no hook pins what it reads. Backward and the
            # optimizer step run without grad mode and have their own pins; so does a
            # backward that makes a graph (autograd.grad with create_graph: its saved tensors
            # are pinned when a later backward unpacks them); and the loop's own code (a loss
            # term reading a weight, MAML's adapted weights ``p - lr * g``), which the
            # window's mode pins op by op. Before, that code's reads had those parameters
            # pinned through every later step (4 MiB of second-order MAML's at a half).
            for t in tree_flatten((args, kwargs or {}))[0]:
                if isinstance(t, torch.Tensor) and not t.is_meta and t.layout == _STRIDED:
                    ptr = storage(t).data_ptr()
                    if ptr in h._owners:
                        h._outside[ptr] = t
        return super().__torch_dispatch__(func, types, args, kwargs)


class _Modes:
    """OffloadHandle's modes: leaving them, the first step's module stack, busy modules."""

    def _leave_eval_ops(self) -> None:
        # A mode of one handle may be left while another handle's is above it (MoCo's key
        # encoder, one forward a step, enters its first-step mode after the query encoder's
        # and leaves it a step later): the mode itself comes off the stack, not the top one.
        if self._eval_ops is not None:
            _remove(self._eval_ops, *_dispatch_stack())
            self._eval_ops = None
            self._policy.evaluation(False)
        reads, self._forward_reads = self._forward_reads, None
        self._fast_path_module = None
        if reads is not None:
            _remove(reads, *_function_stack())

    def _leave_discovery(self) -> None:
        if self._discovery is not None:
            self._take_off(self._discovery)
            self._acts.update(self._discovery.declared)
            self._discovery = None
            self._discovered = True
            self._stack.clear()
            self._stack_calls.clear()
            self._stack_set.clear()
            self._counted.clear()
            for m, direct in self._direct.items():
                pins = list(direct) + [(t, False) for t in self._extra.get(m, {}).values()]
                if pins:
                    self._quiet_pins[m] = pins

    def _take_off(self, mode: Any) -> None:
        """Takes one of this handle's dispatch modes off this thread's stack. In a backward
        that changes only the autograd engine's copy of the thread's state, which the engine
        puts back when the backward returns: a step that ends there (optimizers stepped by
        gradient hooks, the "optimizer in backward" pattern) left the first step's mode on
        the loop's stack, where, its step over, it took every parameter its modules read as
        read outside them and pinned for every later step (a third of an MLP's footprint ran
        out of memory; it trained at 0.71). The mode passes every op through once left, and
        comes off again at the handle's next forward or backward's end (_sweep_modes)."""
        _remove(mode, *_dispatch_stack())
        self._taken_off.append(mode)

    def _sweep_modes(self) -> None:
        """Takes off the modes _take_off took off that are on this thread's stack again;
        each is forgotten once it is found gone."""
        if self._taken_off:
            self._taken_off = [m for m in self._taken_off if _remove(m, *_dispatch_stack())]

    # ------------------------------------------------------------------ discovery stack

    def _discover_enter(self, module: torch.nn.Module) -> None:
        self._discovered_top()
        self._stack.append(module)
        self._stack_calls.append(ModuleCall())
        self._stack_set.add(module)

    def _discover_leave(self) -> None:
        self._stack_calls.pop()
        module = self._stack.pop()
        if module not in self._stack:  # a module may run inside its own call
            self._stack_set.discard(module)

    def _discovered_top(self) -> Optional[torch.nn.Module]:
        """The module whose own code runs now in the first step (None outside the model's
        modules), after dropping calls that raised and were caught: what such a caller's
        code makes is its own, not the failed child's."""
        stack, calls = self._stack, self._stack_calls
        while calls and not calls[-1].running():
            self._discover_leave()
        return stack[-1] if stack else None

    # ------------------------------------------------------------------ busy modules

    def _busy(self, module: torch.nn.Module) -> bool:
        """Whether ``module``'s frame would hold more than a quarter of the budget in an armed
        step: what its own code makes and what its children return, kept pinned until its
        forward ends, since its code may read them (a forward written in one module, a loop
        over blocks in the root's forward, nn.LSTM's one call over every layer and time
        step). Its own code then runs with every op pinned (a dispatch mode, on while its
        children run too), and its frame holds none of that, nor its parameters and buffers:
        what autograd saves is declared (with no children, what its ops make too). Measured
        in the first step: the most its blocks held at once (_count_held); evaluation forwards
        pin every op anyway."""
        would = self._would_hold.get(module)
        return bool(would and would > self._hold_line and self._eval_ops is None)

    def _count_held(self, module: torch.nn.Module, out: Any, persistent: bool = False) -> None:
        """The first step: the blocks in ``out`` (made by ``module``'s own code, or returned by
        a child to it; with ``persistent``, parameters and buffers of other modules its own code
        reads, which its pre-hook would pin: MoCo's EMA of the key encoder in the forward of the
        module that holds both encoders) count towards what its frame would hold (_busy): the
        largest sum of its counted blocks still alive (the same block at its address, by
        generation; one freed since counts no more), checked as below. Each address counted once for
        the whole step made that depend on the allocator's address reuse: a temporary freed in
        the forward and the next one counted once at a reused address, twice at a new one (the
        CPU bridge's MoE root, 8.06 or 11.06 MiB against a line of 10.93 MiB, busy or not by
        the order kept address ranges were taken; 6.56 MiB held at most; docs/BENCHMARKS.md)."""
        held = self._counted.get(module)
        if held is None:
            held = self._counted[module] = _Held()
        block = self.pinner.block
        generation = self.pinner.generation
        for t in leaves(out):
            ptr, nbytes = block(t)
            if ptr and (persistent or ptr not in self._persistent):
                g = generation(ptr)
                if held.blocks.get(ptr, (None,))[0] != g:
                    held.blocks[ptr] = (g, nbytes)
                    held.unchecked += nbytes
        would = self._would_hold.get(module, 0)
        if held.unchecked > would // 16:
            # Which counted blocks still live: a check per block, so only once the bytes
            # counted since the last check pass a sixteenth of the most held yet (a loop making
            # thousands of saved outputs checked them all at every op: 1500 of them took its
            # first step from 2.2 to 5.9 s); a peak between checks may be missed by that much.
            live = 0
            for ptr, (g, nbytes) in list(held.blocks.items()):
                if generation(ptr) == g:
                    live += nbytes
                else:
                    del held.blocks[ptr]
            held.unchecked = 0
            self._would_hold[module] = max(would, live)

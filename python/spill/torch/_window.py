"""offload()'s window: the training loop's own code between the hooked regions (a model's
forward, its backward, the optimizer's step and zero_grad), where no hook pins what it reads.
Checkpoints (state_dict() and torch.save, load_state_dict), logging (``p.norm()``,
``.item()``, ``.numpy()``), clip_grad_norm_ between backward and step, an EMA of the weights,
a loss term reading a weight, an evaluation pass: all read swappable tensors there.

While no handle's region runs, the thread that trains (the one whose hooks opened the
window) runs under two modes of its own, at the bottom of PyTorch's mode stacks (a mode the
caller pushes stays above them and keeps its order):
- a dispatch mode that pins every spill tensor an aten op reads or writes around the op and
  makes nothing swappable while memory suffices (the op's outputs stay as spill made them:
  unswappable until a hook declares them). Nothing stays resident
  otherwise: torch.save's copies, clip_grad_norm_'s norms and an EMA read one tensor per op.
  An op that runs out of memory runs once more after the large tensors the window's ops made
  since a region last began were declared (declare_made: a temporary of the loop's code,
  global pruning's flattened scores); the next region makes them unswappable again
  (release_made). An op is taken to fail before it writes anything (its outputs are new; an
  in-place op's allocations come before its writes).
- a function mode that runs ``Tensor.backward`` without the dispatch mode (backward has its
  hooks), and, on the CPU bridge only, where host code reads tensor memory directly instead
  of through a copy op as on a GPU: ``.numpy()`` (the block stays pinned while the array
  lives), ``.tolist()`` and printing (pinned around the call), and the storages pickling takes
  (torch.save): a copy outside spill's memory, made with the block pinned, so the writer, which
  reads after pickling everything, never reads spill's memory (torch 1.13's pickling calls
  ``Tensor.storage()``; a newer torch's does not, and its bridge saves are not covered; on a
  GPU torch.save copies each storage to the host with an op, which the dispatch mode pins).
And saved-tensor hooks, under those a handle pushes for its forward (while some handle has a
parameter or buffer that can move): a tensor that can move and that autograd saves outside
every forward (a regularizer ``c * model.fc.weight.square().sum()``, what a gradient
penalty's ``autograd.grad(..., create_graph=True)`` saves) is pinned when the backward
unpacks it, until the engine is next between nodes (a handle's gradient hook or partial
gradient hook) or that backward ends. ``autograd.grad`` with ``create_graph`` runs under the
dispatch mode (every op pinned; each node of the graph it runs gets a post hook, a point
between nodes: between_nodes); when it returns in an armed step, what its graph saved is
declared swappable (only unpacks use it now) and the handles look for the gradients a later
backward makes in parts (_partials.py). They also see what other code saves (the first
step's forward, a model without offload): a Python call per saved tensor there.
Costs nothing inside the regions (the modes are off there); in the window, the pins of the
few ops a training loop runs (a dispatch mode's call per op).
"""
from __future__ import annotations

import ctypes
import inspect
import sys
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from spill import OutOfMemoryError
from spill._capi import Status

from . import _backward_code, _caller_hooks, _interrupts, _transforms
from ._guard import PinEveryOp, detached_number, number_detached, reads_no_bytes
from ._pins import (Pinner, Saved, TorchOutOfMemoryError, acyclic, call_raising_out_of_memory,
                    leaves, raise_out_of_memory_in, storage)
from ._state import state

Token = Any


# What torch 2's TorchDispatchMode.__enter__ saves of its "in a dispatch mode" flags, a deque
# each, which its __exit__ pops back (torch/utils/_python_dispatch.py; none on torch 1.13).
_SAVED_FLAGS = ("old_dispatch_mode_flags", "old_non_infra_dispatch_mode_flags",
                "old_without_ignore_compile_internals_dispatch_mode_flags")


def _remove(mode: Any, length: Callable[[], int], push: Callable[[Any], None],
            pop: Callable[[], Any], exit: bool = False) -> bool:
    """Takes ``mode`` out of a mode stack wherever it is; the modes above keep their order.
    With ``exit``, by the mode's own ``__exit__`` (see _leave). False when it is not on the
    stack."""
    above: List[Any] = []
    found = False
    while length() > 0:
        top = pop()
        if top is mode:
            found = True
            break
        above.append(top)
    if found and exit:
        # torch 2's __exit__ restores the flags its __enter__ saved, and a mode entered above
        # this one saved them as set (this one was on), so exiting this one first left them
        # set once both were off (audit 39b N1). Not on top: the nearest entered mode above
        # takes over the flags this one saved (its exit restores them), and this one goes
        # without its __exit__ (already off the stack). On top, or none entered above: its
        # own __exit__ (on top of the stack again for it).
        # (a mode entered more than once above this one saved once per entry: the nearest
        # entry is its count-th from its deques' end, review 39c)
        upper = next((m for m in reversed(above) if getattr(m, _SAVED_FLAGS[0], None)), None)
        if upper is not None and getattr(mode, _SAVED_FLAGS[0], None):
            nearest = sum(1 for m in above if m is upper)
            for name in _SAVED_FLAGS:
                mine, theirs = getattr(mode, name, None), getattr(upper, name, None)
                if mine and theirs and len(theirs) >= nearest:
                    theirs[-nearest] = mine.pop()
        else:
            push(mode)
            mode.__exit__(None, None, None)
    for m in reversed(above):
        push(m)
    return found


def _leave(mode: Any, length: Callable[[], int], push: Callable[[Any], None],
           pop: Callable[[], Any]) -> bool:
    """Takes ``mode``, entered with its ``__enter__``, off a mode stack wherever it is, by its
    own ``__exit__`` (on top of the stack again for it); the modes above keep their order.
    torch 2's ``__enter__`` of a dispatch mode sets its "in a dispatch mode" flags, which only
    ``__exit__`` restores: taken off by a pop alone (_remove), a busy module's mode, remove()'s
    pins-only mode or a guard's mode not on top at its exit left them set for the rest of the
    process, and torch.compile, which skips frames while they are set, ran eager from then on
    (audit 37a F4, read in torch's source). False when it is not on the stack."""
    return _remove(mode, length, push, pop, exit=True)


def _insert_bottom(mode: Any, length: Callable[[], int], push: Callable[[Any], None],
                   pop: Callable[[], Any]) -> None:
    """Puts ``mode`` under the modes of a stack, above those that stay at the bottom
    (check_pins's, which must see each op after every pin)."""
    above = [pop() for _ in range(length())]
    while above and getattr(above[-1], "stays_at_bottom", False):
        push(above.pop())
    push(mode)
    for m in reversed(above):
        push(m)


def _dispatch_stack() -> Tuple[Callable[[], int], Callable[[Any], None], Callable[[], Any]]:
    from torch.utils import _python_dispatch as pd
    return torch._C._len_torch_dispatch_stack, pd._push_mode, pd._pop_mode


def _function_stack() -> Tuple[Callable[[], int], Callable[[Any], None], Callable[[], Any]]:
    from torch import overrides
    return torch._C._len_torch_function_stack, overrides._push_mode, overrides._pop_mode


class _PinReads(PinEveryOp):
    """The window's dispatch mode (see the module docstring). A view (a slice, ``detach``,
    ``t()``: _guard.reads_no_bytes) reads no bytes: it runs without pins."""

    declares = False

    def __init__(self, window: "Window") -> None:
        super().__init__(window.pinner)
        self.window = window

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        window = self.window
        window.busy += 1  # (PyTorch has taken this mode off its stack until it returns)
        try:
            if not window.handles:  # every handle was collected: passes through until popped
                return func(*args, **(kwargs or {}))
            return self._pin_reads(func, types, args, kwargs)
        finally:
            window.busy -= 1

    def _pin_reads(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if reads_no_bytes(func, args, kwargs):
            number = detached_number(func, args)
            if number is not None:
                return number
            out = func(*args, **(kwargs or {}))
            # (autograd.grad with create_graph saves ``x * 0.5``'s factor as a wrapped number)
            alias = number_detached(args, out)
            return out if alias is None else alias
        made = getattr(self.window, "made", None)
        if made is None:  # (pin_reads: another thread's)
            return super().__torch_dispatch__(func, types, args, kwargs)
        try:
            out = super().__torch_dispatch__(func, types, args, kwargs)
        except (torch.cuda.OutOfMemoryError, OutOfMemoryError) as e:
            if not self.window.declare_made():
                unknown = _unknown_optimizer(self.window)
                if unknown is not None:
                    raise TorchOutOfMemoryError(
                        f"{e}\nspill.torch: this happened in a method of an optimizer "
                        f"({type(unknown).__name__}) that no offload() handle knows: the "
                        "state it makes and loads stays resident, never declared "
                        "swappable. Give offload() every optimizer of the model "
                        "(handle.add_optimizer(new_optimizer) before loading a state into "
                        "it).", Status.OUT_OF_MEMORY) from e
                raise
            out = super().__torch_dispatch__(func, types, args, kwargs)
        self.window.note_made(args, kwargs, out)
        return out


def _stray_optimizer(window: "Window") -> Any:
    """A live optimizer over a parameter of a live handle's model that no handle knows (one
    made in the loop to replace the optimizer offload() was given), or None. Looked for only
    on running out of memory: it walks every object the collector tracks."""
    import gc
    handles = list(window.handles)
    known = {id(o) for h in handles for o in (*h.optimizers, *h._inner)}
    params = {id(p) for h in handles for p in h.model.parameters()}
    for obj in gc.get_objects():
        if (isinstance(obj, torch.optim.Optimizer) and id(obj) not in known
                and any(id(p) in params for g in obj.param_groups for p in g["params"])):
            return obj
    return None


def stray_optimizer_error(window: "Window", error: BaseException) -> Optional[BaseException]:
    """For an out-of-memory ``error`` while a live optimizer over the model no handle knows
    holds resident state (see _stray_optimizer): the error, saying so and what to do; else
    None."""
    if not isinstance(error, (torch.cuda.OutOfMemoryError, OutOfMemoryError)):
        return None
    stray = _stray_optimizer(window)
    if stray is None:
        return None
    return TorchOutOfMemoryError(
        f"{error}\nspill.torch: an optimizer over this model's parameters "
        f"({type(stray).__name__}) is one no offload() handle knows (made after offload(), to "
        "replace the one it was given?): the state it makes stays resident, never declared "
        "swappable, and the handle keeps the optimizer it was given alive. To change "
        "optimizers, call handle.add_optimizer(new_optimizer, replaces=old_optimizer) (and "
        "old_optimizer.state.clear() to let its state go).", Status.OUT_OF_MEMORY)


def _unknown_optimizer(window: "Window") -> Any:
    """An optimizer no live handle knows whose method (step, load_state_dict) runs the failed
    op of the window, or None."""
    known = {id(o) for h in list(window.handles) for o in (*h.optimizers, *h._inner)}
    frame = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return None
        owner = frame.f_locals.get("self") if frame.f_code.co_varnames[:1] == ("self",) \
            else None
        if isinstance(owner, torch.optim.Optimizer) and id(owner) not in known:
            return owner
        frame = frame.f_back
    return None


class _PinnedArray:
    """What a ``.numpy()`` array made in the window views: the array's memory, with its block
    pinned until every array over it is gone."""

    def __init__(self, array: Any, pinner: Pinner, token: Token) -> None:
        self.__array_interface__ = array.__array_interface__
        self._array = array
        self._finalizer = weakref.finalize(self, _unpin_quietly, pinner, token)


def _unpin_quietly(pinner: Pinner, token: Token) -> None:
    try:
        pinner.unpin(token, pinner.stream(), True)
    except Exception:  # spill shut down first: nothing left to unpin
        pass


_REDUCE = getattr(torch.Tensor, "_reduce_ex_internal", None)
_REDUCE_CODE = getattr(_REDUCE, "__code__", None)


def _pickling() -> bool:
    """Whether the caller's caller chain is a tensor being pickled (torch.save)."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        if frame.f_code is _REDUCE_CODE:
            return True
        frame = frame.f_back
    return False


class _HostUses(TorchFunctionMode):
    """The window's function mode (see the module docstring)."""

    def __init__(self, window: "Window") -> None:
        super().__init__()
        self.window = window
        self.special: Dict[Any, Callable[..., Any]] = {torch.Tensor.backward: self._backward,
                                                        torch.autograd.grad: self._grad,
                                                        torch.Tensor.data.__set__: self._set_data}
        if window.pinner.cpu:
            for name in ("numpy", "__array__"):
                self.special[getattr(torch.Tensor, name)] = self._numpy
            for name in ("tolist", "__repr__", "__str__", "__format__"):
                self.special[getattr(torch.Tensor, name)] = self._pinned_call
            self.special[torch.Tensor.storage] = self._storage

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        window = self.window
        window.busy += 1  # (PyTorch has taken this mode off its stack until it returns)
        try:
            special = self.special.get(func)
            if special is None or state.forked_child or not window.handles:
                return func(*args, **kwargs)
            return special(func, args, kwargs)
        finally:
            window.busy -= 1

    def _backward(self, func: Any, args: Any, kwargs: Any) -> Any:
        window = self.window
        for handle in list(window.handles):
            handle._backward_begins(args[0] if args else kwargs.get("self"))
        try:
            window.suspend()
        except BaseException:
            for handle in list(window.handles):
                handle._backward_failed()
            raise
        state.last_oom = None
        handles = [h for h in list(window.handles) if h._recomputes_calls()]
        recomputed = _RecomputedOps(handles[0]) if handles else None
        try:
            if recomputed is None:
                result = func(*args, **kwargs)
            else:
                # Tensor.backward's body (torch.autograd.backward) with the mode pushed: the mode
                # that handled Tensor.backward itself would be off PyTorch's stack until it
                # returned, and so would see none of the recomputation's calls. Only the modes
                # below the window's (check_pins') would have seen the call; they stay on.
                bound = _BACKWARD_SIGNATURE.bind(*args, **kwargs)
                bound.apply_defaults()
                a = bound.arguments
                with recomputed:
                    result = torch.autograd.backward(
                        a["self"], a["gradient"], a["retain_graph"], a["create_graph"],
                        inputs=a["inputs"])
        except BaseException as e:
            for handle in list(window.handles):
                handle._backward_failed()
            raise_out_of_memory_in(e)
            raise
        finally:
            window.resume()
            window.release_kept()
        for handle in list(window.handles):
            handle._backward_done()
        return result

    def _grad(self, func: Any, args: Any, kwargs: Any) -> Any:
        # Its ops stay under the dispatch mode (every op pinned). With create_graph (a
        # gradient penalty) it makes a graph whose saved tensors a later backward reads:
        # Window.graph_made.
        # When it returns, an out-of-memory message no longer says that a backward runs.
        create = kwargs.get("create_graph", args[4] if len(args) > 4 else False)
        window = self.window
        if create:
            window.graphs.append([])
        outputs = kwargs.get("outputs", args[0] if args else None)
        window.between_nodes(outputs)
        try:
            result = call_raising_out_of_memory(func, args, kwargs)
        finally:
            saved = window.graphs.pop() if create else []
            for handle in list(window.handles):
                handle._grad_returned()
        if create:
            window.graph_made(saved, result)
        return result

    def _set_data(self, func: Any, args: Any, kwargs: Any) -> Any:
        # ``param.data = new`` (an EMA written as MoCo and BYOL write it,
        # ``pk.data = pk.data * m + pq.data * (1 - m)``): the modules that own the parameter
        # look at it at once (the new storage, made here with nothing declared, is declared).
        # Before, the model's next forward did, when every weight had been replaced: all
        # resident together, undeclared.
        t = args[0]
        ptr = storage(t).data_ptr() if isinstance(t, torch.Tensor) and not t.is_meta else 0
        owners = [(h, set(h._owners[ptr])) for h in list(self.window.handles)
                  if ptr in h._persistent and ptr in h._owners]
        result = func(*args, **kwargs)
        for handle, modules in owners:
            handle._refresh(modules)
        return result

    def _pin(self, t: Any) -> Optional[Token]:
        pinner = self.window.pinner
        ptr = pinner.movable(t)
        return pinner.pin(ptr, pinner.stream()) if ptr else None

    def _numpy(self, func: Any, args: Any, kwargs: Any) -> Any:
        token = self._pin(args[0])
        if token is None:
            return func(*args, **kwargs)
        try:
            array = func(*args, **kwargs)
        except BaseException:
            _unpin_quietly(self.window.pinner, token)
            raise
        import numpy
        return numpy.asarray(_PinnedArray(array, self.window.pinner, token))

    def _pinned_call(self, func: Any, args: Any, kwargs: Any) -> Any:
        token = self._pin(args[0])
        try:
            return func(*args, **kwargs)
        finally:
            if token is not None:
                self.window.pinner.unpin(token, self.window.pinner.stream(), False)

    def _storage(self, func: Any, args: Any, kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        t = args[0]
        pinner = self.window.pinner
        ptr, nbytes = pinner.block(t)
        if not ptr or not _pickling():
            return result
        import numpy
        nbytes = result.nbytes()
        copy = numpy.empty(nbytes, dtype=numpy.uint8)
        token = pinner.pin(ptr, pinner.stream())
        try:
            ctypes.memmove(copy.ctypes.data, ptr, nbytes)
        finally:
            if token is not None:
                pinner.unpin(token, pinner.stream(), False)
        return torch.TypedStorage(wrap_storage=torch.from_numpy(copy).storage().untyped(),
                                  dtype=t.dtype)


_BACKWARD_SIGNATURE = inspect.signature(torch.Tensor.backward)


class _RecomputedOps(TorchFunctionMode):
    """Around a backward the window runs (in an armed step of a handle): each call goes to the
    handle, which pins its tensor arguments when it is non-reentrant checkpointing's
    function's own code (_recompute.py: ops before its first module call, a function that
    calls none), grad enabled or not (a statistic taken under ``torch.no_grad()`` before the
    first module: review 39d). Other calls (offload's and the caller's hooks) find no
    recomputation frame below them in a few frames and pass through. One handle's (the first
    armed one's): a pin is a pin whichever handle holds it, and each handle releases its holds
    when the backward ends."""

    def __init__(self, handle: Any) -> None:
        super().__init__()
        self.handle = handle

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.handle._recomputed_call(args, kwargs)
        return func(*args, **kwargs)


class Window:
    """The window of one thread (the one that trains; see the module docstring): open while
    offload handles exist and none of them is inside a hooked region."""

    def __init__(self) -> None:
        self.pinner = Pinner()
        self.handles: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.inside: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.persistent: Set[int] = set()   # parameters and buffers of every handle
        self.kept: List[Tuple[Token, bool]] = []
        # Its thread: the modes and saved-tensor hooks it pushes are that thread's (PyTorch
        # keeps them per thread), so only calls on it change them (here()). Known by a
        # thread-local mark, not the ident alone, which Linux gives the next thread once this
        # one ends.
        self.thread = threading.get_ident()
        self.thread_object = threading.current_thread()
        self._home = threading.local()
        self._home.here = True
        self._pins = _PinReads(self)
        self._functions = _HostUses(self)
        self._on = False          # both modes pushed
        self._hooks = False       # the saved-tensor hooks pushed
        self._suspended = 0       # backward calls running with the dispatch mode off
        self.busy = 0             # the window's own code running (a mode's, _update)
        # Handles running a forward a backward recomputes (weak: one collected mid-way goes).
        self.recomputing: "weakref.WeakSet[Any]" = weakref.WeakSet()
        # Per autograd.grad(create_graph=True) running: what its graph saves (weakly).
        self.graphs: List[List[Any]] = []
        # The window's large outputs since a region last began (weakly), and those of them
        # made swappable on running out of memory (block -> generation): declare_made.
        self.made: List[Any] = []
        self._made_live = 0  # how many of ``made`` were alive when it was last pruned
        self._keep_made = False  # (enter: a region that pins every op begins)
        self.declared_made: Dict[int, int] = {}
        # What graph_made declared (block -> generation), made unswappable again once no
        # handle is left (release_graphs); pruned of freed blocks when it has doubled.
        self.declared_graphs: Dict[int, int] = {}
        self._graphs_line = 64
        _transforms.install()  # (functorch's transforms take the saved-tensor hooks off)
        _caller_hooks.install()  # (the caller's saved-tensor hooks: offload's pass through them)
        _backward_code.install()  # (the caller's hooks and ctx reads in a backward)

    # ---------------------------------------------------------------- handles

    def here(self) -> bool:
        """Whether the calling thread is this window's."""
        return getattr(self._home, "here", False)

    def add(self, handle: Any) -> None:
        self.handles.add(handle)
        self.persistent |= handle._persistent
        self._update()
        self._update_hooks()
        _interrupts.update()

    def discard(self, handle: Any) -> None:
        self.handles.discard(handle)
        self.inside.discard(handle)
        self.persistent = set().union(*(h._persistent for h in self.handles))
        self.release_kept()
        self._update()
        self._update_hooks()
        if not any(True for _ in self.handles):
            self.release_graphs()
        _interrupts.update()

    def collected(self) -> None:
        """A handle was garbage-collected without remove() (its model and optimizer are
        gone). When it was the last one, the modes go at once where that is safe: on the
        thread that trains, with none of the window's code running (a collection can begin in
        any allocation, e.g. inside the dispatch mode, which PyTorch has taken off its stack
        while it runs and pushes back after). Else they pass every call through until the
        next handle's add, region or remove updates them. The saved-tensor hooks stay pushed
        until then (what a caller pushed above them is unknown here); they only detach."""
        live = list(self.handles)  # (the collected one may still count in len() here)
        self.persistent = set().union(*(h._persistent for h in live))
        if not live and self._on and not self.busy and not self._suspended and self.here():
            self._update()
        if not live and not self.busy and not self._suspended and self.here():
            self.release_graphs()
        if not live:
            _interrupts.update()

    def release_graphs(self) -> None:
        """No handle is left to pin what graph_made declared (its modes are off): what still
        lives becomes unswappable again. A graph's saved tensors may be another model's: a
        second-order graph over a model no handle knows saves its weights (through views that
        are not leaves, as functional_call's), and after the last handle's remove() or
        collection that model's code read them unpinned (found by check_pins). One that
        cannot come back for lack of room stays swappable, for the next remove() to try."""
        declared, self.declared_graphs = self.declared_graphs, {}
        generation = self.pinner.generation
        for ptr, g in declared.items():
            if generation(ptr) != g:
                continue
            try:
                self.pinner.declare(ptr, False)
            except OutOfMemoryError:
                self.declared_graphs[ptr] = g

    def _update_hooks(self) -> None:
        """The saved-tensor hooks are pushed while some handle's parameters or buffers can
        move (none can when all are under the swap threshold: then nothing calls them)."""
        if not self.here():
            return  # (another thread's stack: this thread's next add or remove updates them)
        want = bool(self.persistent)
        if want and not self._hooks:
            torch._C._autograd._push_saved_tensors_default_hooks(self._pack, self._unpack)
        elif self._hooks and not want:
            torch._C._autograd._pop_saved_tensors_default_hooks()
        self._hooks = want

    # ---------------------------------------------------------------- saved tensors

    def _pack(self, t: torch.Tensor) -> Any:
        # Outside every forward of a model (a handle's forward pushes its own hooks above
        # these): a tensor that can move (a regularizer's weight, an activation a loss term
        # or a penalty's graph saves) is pinned when backward uses it; what a penalty's graph
        # saves is declared when it is made (graph_made). Else kept as it is (never a
        # reference cycle). Not in a region (the first step's forward pushes no hooks of its
        # own), nor in a forward a backward recomputes (its hold pins them: _recompute.py).
        if self._on and not self.recomputing and self.handles:
            ptr = self.pinner.movable(t)
            if ptr and not state.forked_child:
                saved = Saved(t, ptr)
                if self.graphs and ptr not in self.persistent:
                    self.graphs[-1].append(weakref.ref(saved.tensor))
                return saved
        return acyclic(t)

    def graph_made(self, saved: List[Any], results: Any) -> None:
        """autograd.grad(..., create_graph=True) returned ``results`` (a gradient penalty).
        What its graph saved (gradients of activations, the forward's activations) is held
        only by that graph now, and every later use unpacks it (pinned): in an armed step it
        is declared swappable (a quiet step declares no activation). Each handle then looks
        for the gradients the later backward makes in parts (_partials.py)."""
        if state.forked_child:
            return
        handles = list(self.handles)
        if any(not h.step_is_quiet for h in handles):
            for ref in saved:
                t = ref()
                ptr = self.pinner.movable(t) if t is not None else 0
                if ptr and ptr not in self.persistent:
                    self.pinner.declare(ptr)
                    self.declared_made.pop(ptr, None)
                    self.declared_graphs[ptr] = self.pinner.generation(ptr)
            if len(self.declared_graphs) > self._graphs_line:
                generation = self.pinner.generation
                self.declared_graphs = {p: g for p, g in self.declared_graphs.items()
                                        if generation(p) == g}
                self._graphs_line = 2 * len(self.declared_graphs) + 64
        for h in handles:
            h._graph_built(results)

    def _unpack(self, saved: Any) -> torch.Tensor:
        if type(saved) is not Saved:
            return saved
        if not state.forked_child:
            try:
                token = self.pinner.pin(saved.ptr, self.pinner.stream())
            except OutOfMemoryError:  # (autograd.grad in the window: see declare_made)
                if not self._on or self._suspended or not self.declare_made():
                    raise
                token = self.pinner.pin(saved.ptr, self.pinner.stream())
            if token is not None:
                self.kept.append((token, False))
        return saved.tensor

    def enter(self, handle: Any, keep_made: bool = False) -> None:
        """``handle``'s hooked region begins (its hooks pin what it uses). Regions inside a
        backward the window runs (a forward recomputed by checkpointing) change nothing.
        When it raises (release_made out of memory), the region has not begun: the window
        is on as before. Before, the handle stayed inside and the modes off, and the loop's
        code after a caught error read swapped-out tensors unpinned. ``keep_made``: the
        region pins every op (an evaluation forward), so what declare_made declared stays
        swappable through it, to the next region that does not."""
        if self.here() and not self._suspended:
            self.inside.add(handle)
            if self._on:
                self._keep_made = keep_made
                try:
                    self._update()
                except BaseException as e:
                    self.inside.discard(handle)
                    self._update()
                    named = stray_optimizer_error(self, e)
                    if named is not None:
                        raise named from e
                    raise
                finally:
                    self._keep_made = False

    def leave(self, handle: Any) -> None:
        """``handle``'s hooked region ended (normally or by an exception)."""
        if self.here() and not self._suspended:
            self.inside.discard(handle)
            if not self._on:
                self._update()

    # ---------------------------------------------------------------- modes

    def _update(self) -> None:
        if not self.here():
            # A handle removed (or collected, or gone to train on another thread) from
            # another thread: the modes stay on this window's thread, passing every call
            # through once no handle is left, until that thread's next add or remove.
            return
        want = any(True for _ in self.handles) and not self.inside  # live ones only
        if want == self._on:
            return
        self.busy += 1
        try:
            self._switch(want)
        finally:
            self.busy -= 1

    def _switch(self, want: bool) -> None:
        if want:
            _insert_bottom(self._functions, *_function_stack())
            if not self._suspended:
                _insert_bottom(self._pins, *_dispatch_stack())
        else:
            _remove(self._functions, *_function_stack())
            if not self._suspended:
                _remove(self._pins, *_dispatch_stack())
        self._on = want
        if not want and not self._keep_made:
            self.release_made()

    def held_by_handles(self) -> Set[int]:
        """The blocks some live handle holds as a model's parameters and buffers now."""
        return set().union(*(h._persistent for h in list(self.handles)))

    def pins_ops(self) -> bool:
        """Whether the window's dispatch mode sees the ops that run now (on, no backward of
        the window running without it), on this thread."""
        return self._on and not self._suspended and self.here()

    def suspend(self) -> None:
        """A backward begins in the window: its ops run without the dispatch mode. When it
        raises (release_made out of memory), the window is as before."""
        if self._suspended == 0 and self._on:
            _remove(self._pins, *_dispatch_stack())
            try:
                self.release_made()
            except BaseException:
                _insert_bottom(self._pins, *_dispatch_stack())
                raise
        self._suspended += 1

    def resume(self) -> None:
        self._suspended -= 1
        if self._suspended == 0 and self._on:
            _insert_bottom(self._pins, *_dispatch_stack())

    # ---------------------------------------------------------------- what the window makes

    def note_made(self, args: Any, kwargs: Any, out: Any) -> None:
        """An op in the window returned ``out``: its large new tensors are noted (weakly)."""
        movable = self.pinner.movable
        fresh = [t for t in leaves(out) if movable(t)]
        if not fresh:
            return
        given = {movable(t) for t in tree_flatten((args, kwargs or {}))[0]}
        made = self.made
        made.extend(weakref.ref(t) for t in fresh if movable(t) not in given)
        if len(made) > 2 * self._made_live + 1024:
            # Long runs without a training region (generation: every layer's ops at every
            # token) would grow it for good: the dead are dropped as it doubles.
            made[:] = [ref for ref in made if ref() is not None]
            self._made_live = len(made)

    def declare_made(self) -> bool:
        """An op in the window ran out of memory: the large tensors the window's ops made since
        a region last ended and still alive (a temporary of the loop's code: global pruning's
        flattened scores and masks, gradients autograd.grad returns) become swappable until the
        next region begins (release_made); every op of the window pins what it uses, so they
        may move meanwhile. True when it declared one (the op is then run again)."""
        made, self.made = self.made, []
        declared = False
        for ref in made:
            t = ref()
            ptr = self.pinner.movable(t) if t is not None else 0
            # (A block a handle holds is declared again, harmlessly: release_made leaves those
            # alone. A buffer an evaluation forward replaced, ``self.kv = torch.cat(...)``, is
            # one at its next forward, and may reuse the address of the one it replaced.)
            if not ptr or self.pinner.on_host(ptr):  # (declared by a hook since: not the window's)
                continue
            # Read without a pin, which the step would record as a use of the block. A new
            # block at the address of one declared before (freed since) is declared too.
            generation = self.pinner.generation(ptr)
            if not generation or self.declared_made.get(ptr) == generation:
                continue
            if self.pinner.declare(ptr):
                self.declared_made[ptr] = generation
                declared = True
        return declared

    def release_made(self) -> None:
        """A region begins (or a backward the window runs): what declare_made made swappable and
        is still the same block becomes unswappable again (brought back if on the host), as the
        window's outputs always were before: code there (an autograd node given a tensor the
        loop made, a collective) may read it without a pin. Parameters and buffers a hook has
        taken since (``p.data = new``) stay swappable, and so do those a handle's model holds
        now that its hooks will take at their next look at it (_refresh: what pruning's
        ``l1_unstructured`` in the loop's code made, its masks and computed weights). Out of
        memory leaves the rest swappable, to be released by the next region (the window's
        ops pin what they read meanwhile)."""
        self.made = []
        if not self.declared_made:
            return
        persistent = self.held_by_handles()
        for handle in list(self.handles):
            persistent |= handle._held_now()
        for ptr, generation in list(self.declared_made.items()):
            # Read without a pin: release_made pinned each address, and so whatever block
            # held it by then, a use in the step's recording; which addresses the allocator
            # reused depends on how far the swap-outs had got, so steps alike recorded
            # different uses and left their plans (a parameter HVP's fourth step, about one
            # run in 30 under load).
            if ptr not in persistent and self.pinner.generation(ptr) == generation:
                self.pinner.declare(ptr, False)
            del self.declared_made[ptr]

    def between_nodes(self, outputs: Any) -> None:
        """``autograd.grad`` in the window will run the graph behind ``outputs``: each of its
        nodes gets a post hook, a point between nodes where what the backward unpacked so far
        has been used (the window's saved-tensor pins, each handle's: _safe_point). Without
        it, nothing said so inside that call: a module output's gradient hook is the handles'
        only such point, and autograd.grad over the parameters reaches none in the first
        step, nor any inside the graphs an earlier autograd.grad made; every tensor it
        unpacked stayed pinned until it returned (18 MiB of a 20 MiB budget in the
        parameter HVP's first autograd.grad)."""
        roots = [t.grad_fn for t in leaves(outputs)
                 if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        seen: Set[int] = set()
        nodes: List[Any] = []
        while roots:
            node = roots.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            # Hooked once: a loop of autograd.grad over one retained graph (a Jacobian row by
            # row) would add a hook per call to each node. The node's metadata lives with
            # the C++ node (its Python object may be made afresh); what a hooked node
            # reaches was hooked with it.
            meta = node.metadata
            if meta.get("spill_between"):
                continue
            meta["spill_between"] = True
            nodes.append(node)  # (holds it: a collected node's id may be reused)
            roots.extend(n for n, _ in node.next_functions if n is not None)
        hook = self._between
        for node in nodes:
            node.register_hook(hook)

    def _between(self, grad_inputs: Any, grad_outputs: Any) -> None:
        if self.kept:
            self.release_kept()
        for handle in list(self.handles):
            handle._safe_point(None)

    def release_kept(self) -> None:
        """Drops the pins a backward took of what the window's saved-tensor hooks saved."""
        kept, self.kept = self.kept, []
        if kept:
            stream = self.pinner.stream()
            for token, wrote in kept:
                self.pinner.unpin(token, stream, wrote)


# One window per thread that trains (each offloaded model trains on one thread; two models may
# train on two threads, one after the other or at once), found by a thread-local: a thread
# that ends takes its window with it, once no handle refers to it.
_local = threading.local()
_windows: "weakref.WeakSet[Window]" = weakref.WeakSet()


def window() -> Window:
    """The calling thread's window (made on first use)."""
    w = getattr(_local, "window", None)
    if w is None:
        w = _local.window = Window()
        _windows.add(w)
    return w


def current() -> Optional[Window]:
    """The calling thread's window, None when it has none."""
    return getattr(_local, "window", None)


def all_handles() -> List[Any]:
    """The live offload handles of every thread."""
    return [h for w in list(_windows) for h in list(w.handles)]


def live_pinner() -> Optional[Pinner]:
    """A window's pinner while some offload handle lives (on any thread), else None."""
    for w in list(_windows):
        if any(True for _ in w.handles):
            return w.pinner
    return None

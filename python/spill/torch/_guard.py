"""spill.torch.guard(): a TorchDispatchMode that pins every tensor argument of every aten op
around the op and declares what it sees swappable, for code the offload hooks do not cover.
Every use of a tensor by an aten op inside the mode is bracketed by a pin, so every tensor the
mode has seen may move between ops; when the mode exits, the blocks it declared and that are
still alive are brought back and declared unswappable again, so code after it may touch any
tensor. Cost: a few microseconds of Python per op (docs/BENCHMARKS.md)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._python_dispatch import (
    _get_current_dispatch_mode_stack as _current_dispatch_modes)

from spill import Error, OutOfMemoryError, _args
from spill import budget as spill_budget

from . import _fast_path as fast_path
from . import _interrupts
from ._foreach import chunks, joined, listwise
from ._pins import Pinner, TorchOutOfMemoryError, components, leaves
from ._state import state
from ._steps import (OptimizerRound, StepBoundaries, default_scope, key_of_shapes,
                     optimizers_of, optional_scope, shape_of, unwrap_methods, wrap_method)

_written_args: Dict[Any, Tuple[frozenset, frozenset]] = {}
_DETACH = torch.ops.aten.detach.default
_ITEM = torch.ops.aten._local_scalar_dense.default  # Tensor.item()
# A wrapped number's dtype (the 0-dim tensor autograd makes of a Python scalar operand).
_NUMBER_DTYPES = {bool: torch.bool, int: torch.int64, float: torch.float64,
                  complex: torch.complex128}


def detached_number(func: Any, args: Any) -> Optional[torch.Tensor]:
    """detach() of a wrapped number (``x * 0.125`` saves 0.125 as one) reaches a dispatch
    mode as the Python number, and the op then refuses it ("Expected a value of type
    'Tensor'"): non-reentrant checkpointing detaches every tensor its recomputation saves.
    Returns the detached tensor (a 0-dim CPU tensor of the number, as autograd made it), or
    None when the call is not that."""
    if func is _DETACH and args and not isinstance(args[0], torch.Tensor):
        dtype = _NUMBER_DTYPES.get(type(args[0]))
        if dtype is not None:
            return torch.tensor(args[0], dtype=dtype)
    return None


def number_detached(args: Any, out: Any) -> Optional[torch.Tensor]:
    """detach() of a wrapped number (a Python scalar autograd made a tensor of) comes back from
    the op as the number (``out``), but detach's caller (a saved tensor unpacked under
    saved-tensor hooks) needs the tensor, which is its own detached alias (no grad, no
    history): returns that tensor, or None when ``out`` is not such a number."""
    if type(out) is not torch.Tensor and isinstance(out, (bool, int, float, complex)):
        return args[0]
    return None


def call_detaching(func: Any, args: Any, kwargs: Dict[str, Any]) -> Any:
    """``func(*args, **kwargs)`` for a mode that pins nothing around it, with detach() of a
    wrapped number as autograd expects it (detached_number, number_detached)."""
    if func is _DETACH:
        number = detached_number(func, args)
        if number is not None:
            return number
    out = func(*args, **kwargs)
    if func is _DETACH:
        alias = number_detached(args, out)
        if alias is not None:
            return alias
    return out


_reads_no_bytes: Dict[Any, bool] = {}
_STRIDED = torch.strided
try:
    _has_kernel_for = torch._C._dispatch_has_kernel_for_dispatch_key
except AttributeError:  # (then every op pins)
    _has_kernel_for = None
# The key as the binding's enum (torch 1.13 and 2 take it; a string is converted by the binding,
# which a later torch may stop doing: audit 37a).
_COMPOSITE = getattr(getattr(torch._C, "DispatchKey", None), "CompositeImplicitAutograd",
                     "CompositeImplicitAutograd")


def reads_no_bytes(func: Any, args: Any = (), kwargs: Any = None) -> bool:
    """Whether ``func`` called with ``args`` and ``kwargs`` only makes views of its arguments
    (``t``, ``view``, ``transpose``, ``select``, ``slice``, ``detach``, ``expand``,
    ``as_strided``...): its outputs alias its inputs (its schema) and no kernel of it reads or
    writes their bytes, so it needs no pins. Not with a sparse (or other non-strided) tensor
    argument: their kernels of such ops make new indices and values from the argument's
    (``unsqueeze``, ``_sparse_broadcast_to`` of a sparse COO tensor: review 44r, a swapped-out
    sparse tensor broadcast under guard faulted).
    An op of its own, not a composite one: a composite that may alias reaches a dispatch
    mode when autograd is off (``torch.inference_mode()``: ``to(dtype)``, ``contiguous()``,
    ``reshape()``, ``flatten()`` of a tensor they must copy, ``narrow`` with a tensor start,
    which reads it), and copies then; before, the window took those for views and ran them
    unpinned (an offloaded weight on the host read by ``w.to(torch.float64)`` under
    inference_mode faulted)."""
    found = _reads_no_bytes.get(func)
    if found is None:
        schema = func._schema
        returns = schema.returns
        found = (bool(returns) and _has_kernel_for is not None
                 and schema.name != "aten::_make_dual"  # (may copy its tangent)
                 and all(r.alias_info is not None and not r.alias_info.is_write
                         for r in returns)
                 and not any(a.alias_info is not None and a.alias_info.is_write
                             for a in schema.arguments))
        if found:
            try:
                found = not _has_kernel_for(func.name(), _COMPOSITE)
            except (RuntimeError, AttributeError, TypeError):
                found = False
        _reads_no_bytes[func] = found
    if not found:
        return False
    for t in args:
        if isinstance(t, torch.Tensor) and t.layout != _STRIDED:
            return False
    if kwargs:
        for t in kwargs.values():
            if isinstance(t, torch.Tensor) and t.layout != _STRIDED:
                return False
    return True


def _writes(func: Any) -> Tuple[frozenset, frozenset]:
    """(positional indices, keyword names) of the arguments ``func`` writes (its schema). A
    collective (an op of c10d: ``all_reduce``, ``broadcast``, ``all_gather``...) writes tensors
    its schema does not mark as written: all of its arguments count as written."""
    found = _written_args.get(func)
    if found is None:
        positions, names = [], []
        collective = _is_collective(func)
        for i, arg in enumerate(func._schema.arguments):
            if collective or (arg.alias_info is not None and arg.alias_info.is_write):
                names.append(arg.name)
                if not arg.kwarg_only:
                    positions.append(i)
        found = (frozenset(positions), frozenset(names))
        _written_args[func] = found
    return found


def _is_collective(func: Any) -> bool:
    """Whether ``func`` is an op of c10d (a collective, a barrier, a send or a receive)."""
    return getattr(func, "namespace", "") == "c10d"


# c10d's point-to-point ops: a second wait on gloo's work of one waits for a completion that
# never comes (it waits for the next one, up to the process group's timeout: 30 minutes), and
# an isend/irecv exchange waited at its issue deadlocks (review 43r F1). Not waited for.
_POINT_TO_POINT = ("send", "recv_", "recv_any_source_")


def _waits_for(func: Any) -> bool:
    """Whether the pins of c10d op ``func``'s tensors last until its work is done."""
    return _is_collective(func) and func.__name__.split(".")[0] not in _POINT_TO_POINT


def _wait_for_collective(out: Any) -> None:
    """Waits for the work a collective returned (a ``Work`` beside its tensors): the library
    (gloo's thread, NCCL's stream) goes on using the tensors after the op returns, until its
    work is waited for, and the pins that hold them resident must last until then. On a GPU
    the wait makes the current stream wait for NCCL's, where the unpins then record; with
    gloo it waits on the host. A collective's work waited for again returns at once (gloo and
    NCCL); a send's or a receive's does not (_POINT_TO_POINT)."""
    for value in out if isinstance(out, (tuple, list)) else (out,):
        wait = None if isinstance(value, (torch.Tensor, list, tuple)) else getattr(
            value, "wait", None)
        if callable(wait):
            wait()


class PinEveryOp(TorchDispatchMode):
    """The dispatch mode behind :func:`guard` (and the offload hooks' optimizer step). A
    subclass with ``declares = False`` only pins: it makes nothing swappable (offload's
    window between its hooked regions, _window.py)."""

    declares = True
    # Whether the arguments it pins become swappable too (guard: what a training loop under it
    # uses). A tensor made before the mode may be used outside aten ops (DDP's gradient
    # buckets, which its reducer hands to the communication library): offload's own modes
    # declare only what their ops make.
    declares_arguments = True
    # Whether the steps it begins are keyed, by the shapes its ops see before each step's first
    # pin (guard's own steps; offload keys its steps at the model's forward).
    keys_steps = False

    def __init__(self, pinner: Pinner, steps: Optional[StepBoundaries] = None,
                 outputs: Optional[Set[int]] = None, evaluations_outside: bool = False) -> None:
        super().__init__()
        self.pinner = pinner
        self.steps = steps
        # guard()'s own steps: an op outside grad mode between two steps (an evaluation pass
        # after the optimizer's step) begins no step, and its pins go to none (see
        # StepBoundaries.deferred), nor does a ``loss.item()`` logged after the step; inside
        # a step such ops are the step's as any other.
        self.evaluations_outside = evaluations_outside
        self.declared: Dict[int, int] = {}   # block base -> generation this mode declared
        self._declared_line = 1024  # its length that prunes it (_prune_declared)
        self.outputs = outputs               # if given: where the outputs it declared go
        self.ops = 0
        self._key_pending = False  # keys_steps: the step began, no op of it has pinned yet
        self._key_shapes: List[Tuple[Any, ...]] = []  # the shapes seen since (shape_of)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # Runs for every aten op (the optimizer step under pressure: about 440 a GPT step), so
        # it stays lean: no per-op lists of all arguments, pytree only for unusual outputs.
        kwargs = kwargs or {}
        if state.forked_child:
            return func(*args, **kwargs)
        if func is _DETACH:
            number = detached_number(func, args)
            if number is not None:
                return number
        pinner = self.pinner
        split = listwise(func)
        if split is not None:
            # A foreach, fused-optimizer or unscale op over more than a quarter of the budget
            # runs in chunks that fit (_foreach.py), so it never needs all its lists resident.
            parts = chunks(split, args, kwargs, pinner.block, spill_budget(state.device) // 4)
            if parts is not None:
                return joined(split, [self.__torch_dispatch__(func, types, a, k)
                                      for a, k in parts])
        view = reads_no_bytes(func, args, kwargs)
        steps = self.steps
        if steps is not None:
            if self.evaluations_outside:
                steps.deferred = func is _ITEM or not torch.is_grad_enabled()
            began = not steps.in_step
            steps.ensure()
            if self.keys_steps and steps.in_step and (began or self._key_pending):
                # The step's variant (guard's steps; see StepBoundaries.key), given before its
                # first pin (after it, a key switches no plan): the shapes of the tensors of
                # the ops before that pin (making the batch, under the guard: ops of small
                # tensors, none pinned) and of the first pinning op's arguments. The pinning op
                # alone may hold no batch (zero_grad's zero_ of a gradient, torch 1.13's
                # default, before the forward); under guard a view pins nothing, so a
                # Linear's transpose of its weight is not that op.
                if began:
                    self._key_shapes = []
                tensors = [t for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                self._key_pending = view or not any(
                    pinner.movable(t) for t in tensors)
                if getattr(func, "namespace", "") != "profiler":
                    self._key_shapes.extend(shape_of(t) for t in tensors if t.numel() > 1)
                if not self._key_pending:
                    steps.key(key_of_shapes(self._key_shapes))
                    self._key_shapes = []
        if view:
            # A view (a Linear's ``t()`` of its weight, ``view``, ``detach``): nothing to pin
            # and nothing new to declare (its output is its argument's block). Pinned before,
            # it was a third of a training step's pins, and a guarded step whose batch came
            # from no op under the guard took the weight's transpose, its first op, for the
            # step's first pinning op: its key held no batch. Offload's modes (subclasses)
            # pinned them until the swapper's recordings stopped depending on where the cache
            # put a block (without those pins a GRU's steps under offload left their plan at
            # every step: swapper/step.cpp, on_pin_locked).
            self.ops += 1
            return call_detaching(func, args, kwargs)
        stream = pinner.stream()
        positions, names = _writes(func)
        held: List[Tuple[Any, bool]] = []
        seen = set()
        try:
            # (an argument that cannot come back raises out of memory: those pinned before it
            # are let go; before, they stayed pinned for good)
            for where, value in enumerate(args):
                if isinstance(value, (torch.Tensor, list, tuple)):
                    self._pin_value(value, where in positions, stream, held, seen)
            for name, value in kwargs.items():
                if isinstance(value, (torch.Tensor, list, tuple)):
                    self._pin_value(value, name in names, stream, held, seen)
            self.ops += 1
            out = func(*args, **kwargs)
            if _waits_for(func):
                # (``async_op=True``: the collective is done when it returns under a mode of
                # spill's; the caller's wait later returns at once)
                _wait_for_collective(out)
        finally:
            unpin = pinner.unpin
            for token, wrote in held:
                unpin(token, stream, wrote)
        if self._key_pending and getattr(func, "namespace", "") != "profiler":
            # What the batch's ops made (see the step's key above). Neither a profiler range's
            # handle nor a scalar (zero_grad's record_function makes one, from the second step
            # on: the first step has none) says anything of the batch.
            self._key_shapes.extend(shape_of(t) for t in leaves(out)
                                    if isinstance(t, torch.Tensor) and t.numel() > 1)
        if func is _DETACH:
            alias = number_detached(args, out)
            if alias is not None:
                return alias
        if not self.declares:
            return out
        movable = pinner.movable
        for t in leaves(out):
            ptr = movable(t)
            if ptr and ptr not in seen:
                seen.add(ptr)
                pinner.declare(ptr)  # fresh: its later uses are pinned by this mode
                if self.outputs is not None:
                    self.outputs.add(ptr)
                else:
                    # What its release() brings back: before, an output no later op inside
                    # took as an argument (``y = model(x)`` under a guard, read after it)
                    # stayed swappable after the exit, and a swap-out then unmapped it.
                    self._note_declared(ptr, pinner.generation(ptr))
        return out

    def _pin_value(self, value: Any, wrote: bool, stream: Optional[int],
                   held: List[Tuple[Any, bool]], seen: Set[int]) -> None:
        """Pins the movable tensors of one argument (a tensor or a list of them)."""
        pinner = self.pinner
        for t in (value,) if isinstance(value, torch.Tensor) else value:
            ptr = pinner.movable(t)
            if not ptr:
                parts = components(t)  # a sparse tensor: its indices and values
                if parts:
                    self._pin_value(list(parts), wrote, stream, held, seen)
                continue
            seen.add(ptr)
            token = pinner.pin(ptr, stream)
            if token is None:
                continue
            held.append((token, wrote))
            if self.declares and self.declares_arguments \
                    and self.declared.get(token.block) != token.generation:
                pinner.declare(ptr)
                self._note_declared(token.block, token.generation)

    def _note_declared(self, block: int, generation: int) -> None:
        """Notes the block at ``block``, in its life ``generation``, as one this mode declared
        swappable (release() declares it unswappable again)."""
        self.declared[block] = generation
        if len(self.declared) > self._declared_line:
            self._prune_declared()

    def _prune_declared(self) -> None:
        """Drops the blocks freed since this mode declared them (or whose address holds
        another block now), which release() would skip: over a long run with ever new
        addresses (batches of changing lengths) ``declared`` grew for good (audit 35a: 2,197
        entries after 1,500 steps, 98% of them dead). Pruned as it doubles."""
        generation = self.pinner.generation
        self.declared = {base: g for base, g in self.declared.items() if generation(base) == g}
        self._declared_line = max(1024, 2 * len(self.declared))

    def release(self) -> Optional[OutOfMemoryError]:
        """Declares the blocks this mode declared, and that are still the same blocks,
        unswappable again (bringing them back if they are on the host), but those a live
        offload handle holds as its model's (weights, buffers, gradients: offload declared
        them swappable, and its hooks pin their uses; before, a guard around an offloaded
        model's inference made them all unswappable for good at its exit). Every block is
        tried: those that find no room stay swappable and stay in ``declared`` (a later
        release tries them again); returns the first out-of-memory error then, else None."""
        pinner = self.pinner
        declared, self.declared = self.declared, {}
        failed: Optional[OutOfMemoryError] = None
        offloaded = _held_by_offload() if declared else set()
        for base, generation in declared.items():
            # Read without a pin: a pin of the address was a use of whatever block held it by
            # then, which a step records (see Window.release_made).
            if pinner.generation(base) != generation or base in offloaded:
                continue
            try:
                pinner.declare(base, False)
            except OutOfMemoryError as e:
                self.declared[base] = generation
                failed = failed or e
        return failed


# DistributedDataParallel's __init__, wrapped once per process (watch_ddp): whether one was
# made since, or found made before (_warn_of_ddp looks once), the checks each new one runs
# first (offload's), and whether guard warned.
_ddp: Dict[str, Any] = {"watching": False, "seen": False, "scanned": False, "warned": False,
                        "checks": []}


def watch_ddp(check: Any = None) -> bool:
    """Wraps DistributedDataParallel.__init__, once per process, so that each new DDP runs
    the registered checks on the module it wraps (``check``, if given, joins them: offload's
    refusal of an offloaded model) and is noted; returns whether a DDP was noted (made since
    the wrapper, or found by _warn_of_ddp's look)."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # a torch built without distributed support
        return False
    if check is not None and check not in _ddp["checks"]:
        _ddp["checks"].append(check)
    if not _ddp["watching"]:
        _ddp["watching"] = True
        original = DistributedDataParallel.__init__

        def __init__(self: Any, module: Any, *args: Any, **kwargs: Any) -> None:
            for checked in list(_ddp["checks"]):
                checked(module)
            _ddp["seen"] = True
            original(self, module, *args, **kwargs)
        DistributedDataParallel.__init__ = __init__  # type: ignore[assignment]
    return bool(_ddp["seen"])


def _warn_of_ddp() -> None:
    """Warns, once per process, when a guard is entered while a DistributedDataParallel has
    been made (in a process whose default process group is up): guard declares what its ops
    are given, DDP's buckets among them, which its reducer and the communication library
    read and write where no pin is; with one of them on the host, gloo aborted the rank with
    ``writev: Bad address`` and nothing said why (audit 36e F3). Not refused: a guard around
    code that runs no DDP step is fine. The first call looks among the collector's objects
    for one made before DDP's __init__ was wrapped (watch_ddp hears of later ones)."""
    if _ddp["warned"]:
        return
    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        return
    if not dist.is_available() or not dist.is_initialized():
        return
    seen = watch_ddp()
    if not _ddp["scanned"]:
        _ddp["scanned"] = True
        import gc
        # (type(), not isinstance: isinstance reads an object's __class__, and
        # torch.distributed's deprecated ``reduce_op`` warns at any attribute read)
        seen = seen or any(issubclass(type(obj), DistributedDataParallel)
                           for obj in gc.get_objects())
        _ddp["seen"] = seen
    if seen:
        import warnings
        _ddp["warned"] = True
        warnings.warn(
            "spill.torch.guard: a DistributedDataParallel lives in this process. Do not run "
            "its training steps under guard(): guard makes the tensors its ops are given "
            "swappable, DDP's buckets among them, which DDP's reducer and the communication "
            "library use where no pin is (a bucket on the host aborts the rank, with gloo "
            "'writev: Bad address'). Use spill.torch.offload(ddp, optimizer) for DDP.",
            stacklevel=3)


def _held_by_offload() -> Set[int]:
    """The blocks live offload handles (every thread's) hold as their models' now."""
    from ._window import all_handles  # (_window imports this module)
    held: Set[int] = set()
    for handle in all_handles():
        held |= handle._persistent
        held |= handle._held_now()
    return held


class _StillPinning(PinEveryOp):
    """What a guard leaves on the dispatch stack when its exit could not bring back every
    tensor it made swappable (no room in the budget): every op pinned, nothing declared, as
    in offload's window, until guard.release() has brought them back."""

    declares = False


class guard:
    """``with spill.torch.guard(): ...`` runs the block with every aten op's tensor arguments
    pinned around the op, on the current CUDA stream (host-waiting pins on the CPU bridge).
    Every large tensor an op reads or produces inside becomes swappable; at exit, those still
    alive are brought back and made unswappable, so code after the block may touch them.

    optimizer: if given, a training step of ``scope`` begins at the first op after the
      previous step and ends when ``optimizer.step()`` returns, so the first step is recorded
      and later ones follow the plan. A list or tuple of optimizers: the step ends once each
      has stepped since it began, or before one steps again. Without it, bracket steps with
      ``with spill.torch.step():``.
    scope: by default a number spill gives the (first) optimizer on first use (the same for as long
      as it lives, never one an earlier optimizer had); the exit ends it (its recorded step
      and plan are freed), so each ``with`` block records its first step again. A scope named
      here is the caller's to end with ``spill.end_scope``.
    release_on_exit: bring the tensors it declared back at exit (the default). That needs
      room for all of them in the budget (raise it first with spill.set_budget). Otherwise
      the exit brings back what fits and raises ``torch.cuda.OutOfMemoryError`` (also
      ``spill.OutOfMemoryError``) saying what is left: those stay swappable and every op of
      the thread keeps running pinned, until ``release()`` (after raising the budget)
      brings them back (when the block raised, its exception goes on instead, with that
      message added as a note). With False they stay swappable: then every later use must
      be inside a guard or the offload hooks.
    Use it around the whole training loop: each exit brings every swapped tensor back.
    Requires spill.torch.enable() first.
    """

    def __init__(self, optimizer: Any = None, scope: Optional[int] = None,
                 release_on_exit: bool = True) -> None:
        self.optimizer = optimizer
        self.optimizers = optimizers_of(optimizer, "spill.torch.guard")
        self.scope_arg = None if scope is None else optional_scope(scope, None)[0]
        self.release_on_exit = bool(_args.flag(release_on_exit, "release_on_exit"))
        self._mode: Optional[PinEveryOp] = None
        self._reads: Any = None  # its function mode (_reads.host_reads): host reads, backward OOM
        self._saved: dict = {}
        # After an exit that could not bring every tensor back: the mode whose blocks are
        # left (its ``declared``), and the pins-only mode and the host reads kept on the
        # stacks meanwhile.
        self._left: Optional[PinEveryOp] = None
        self._still: Optional[_StillPinning] = None
        self._left_reads: Any = None

    def __enter__(self) -> "guard":
        if not state.active:
            raise Error("spill.torch.guard: spill is not PyTorch's allocator in this process; "
                        "call spill.torch.enable() first")
        if self._mode is not None:
            # Its mode and its step wrappers are one per entry: a second entry would push a
            # second mode that the inner exit pops, and the outer exit found none (a bare
            # AssertionError, and the first mode left on PyTorch's stack for good).
            raise Error("spill.torch.guard: this guard is already entered; a guard object "
                        "is entered once at a time (nesting guard() inside it needs a new "
                        "guard object, and pins nothing more: the outer one pins every op)")
        _warn_of_ddp()  # (first: a warning made an error leaves nothing entered)
        steps = None
        if self.optimizers:
            scope_id, owned = optional_scope(self.scope_arg, self.optimizers[0])
            steps = StepBoundaries(scope_id, manage=True, owned=owned,
                                   name="guard " + type(self.optimizers[0]).__name__)
            stepped = OptimizerRound(len(self.optimizers))

            def wrapper(index: int) -> Any:
                def wrap(original: Any) -> Any:
                    def step(*args: Any, **kwargs: Any) -> Any:
                        if stepped.again(index):
                            steps.end()
                        try:
                            return original(*args, **kwargs)
                        finally:
                            if stepped.stepped(index):
                                steps.end()
                    return step
                return wrap
            for index, opt in enumerate(self.optimizers):
                wrap_method(opt, "step", wrapper(index), self._saved)
        mode = PinEveryOp(Pinner(), steps, evaluations_outside=True)
        mode.keys_steps = True
        if self._left is not None:  # what an earlier exit could not bring back: this exit's
            mode.declared.update(self._left.declared)
        from ._reads import host_reads  # (_reads imports _window, which imports this module)
        reads = host_reads(guards_backward=True)
        if reads is not None:
            reads.__enter__()
            fast_path.steps_aside(reads)
        try:
            mode.__enter__()
        except BaseException:
            if reads is not None:
                reads.__exit__(None, None, None)
            raise
        self._mode, self._reads = mode, reads
        self._forget_left()
        _interrupts.guard_entered(True)
        fast_path.entered()
        return self

    def __exit__(self, *exc: Any) -> None:
        mode = self._mode
        if mode is None:
            raise Error("spill.torch.guard: __exit__ without __enter__")
        self._mode = None
        _interrupts.guard_entered(False)
        fast_path.left()
        from ._window import _dispatch_stack, _function_stack, _leave
        # Its own mode, wherever it is on the stack: torch 1.13's exit pops the top one,
        # which may be another's (a mode entered in the block and left open, a generator's
        # guard, the pins-only mode of an inner guard whose exit found no room): that one
        # came off and this one stayed on for good (audit 36a F2). Always by its own exit
        # (torch 2 restores its flags of dispatch there: _window._leave).
        stack = _current_dispatch_modes()
        if stack and stack[-1] is mode:
            mode.__exit__(*exc)
        else:
            _leave(mode, *_dispatch_stack())
        reads, self._reads = self._reads, None
        try:
            unwrap_methods(self._saved)
            if mode.steps is not None:
                mode.steps.finish()
        finally:
            # (what it declared is brought back even when the above raised)
            if not self.release_on_exit:
                if reads is not None:
                    _leave(reads, *_function_stack())
            else:
                self._left, self._left_reads = mode, reads
                try:
                    self.release()
                except OutOfMemoryError as e:
                    if exc[1] is None:
                        raise
                    # The block's own exception goes on (before, this error took its place,
                    # and ``except`` clauses for it no longer caught it: audit 36a F3); what
                    # is left stays pinned as after any exit that found no room.
                    note = getattr(exc[1], "add_note", None)
                    if note is not None:
                        note(str(e))

    def release(self) -> None:
        """Brings back, unswappable, what an exit of this guard could not (it raised
        ``torch.cuda.OutOfMemoryError``, also ``spill.OutOfMemoryError``: no room in the
        budget for all of it): call it after raising the budget (``spill.set_budget``).
        Until it succeeds, those tensors stay swappable and every op of the thread that
        exited runs pinned, as inside the guard, so code after the guard may use them.
        Raises the same error, saying what is left, while they still do not fit. Does
        nothing when nothing is left (also after a successful exit)."""
        left = self._left
        if left is None:
            return
        error = left.release()
        if error is None:
            self._forget_left()
            return
        if self._still is None:
            # At the bottom of the stack, as offload's modes: a mode entered later (the
            # caller's) comes off by its own exit, never this one in its place.
            from ._window import _dispatch_stack, _insert_bottom
            self._still = _StillPinning(left.pinner)
            _insert_bottom(self._still, *_dispatch_stack())
        raise TorchOutOfMemoryError(
            f"spill.torch.guard: {len(left.declared)} of the tensors it made swappable do "
            "not fit in the budget once unswappable again. They stay swappable, and every "
            "op of this thread runs pinned, as inside the guard, until they are back: raise "
            "the budget (spill.set_budget) and call release() on the guard (or enter it "
            "again: its next exit brings them back); guard(release_on_exit=False) leaves "
            f"everything swappable instead. {error}", error.code) from error

    def _forget_left(self) -> None:
        """Nothing is left to bring back (or a new entry took it over): the pins-only mode
        comes off the stack, wherever it is."""
        self._left = None
        still, self._still = self._still, None
        reads, self._left_reads = self._left_reads, None
        from ._window import _dispatch_stack, _function_stack, _leave, _remove
        if still is not None:
            _remove(still, *_dispatch_stack())
        if reads is not None:
            _leave(reads, *_function_stack())

    @property
    def scope(self) -> Optional[int]:
        """The step scope of this guard's steps (None without an optimizer)."""
        if self.scope_arg is not None or not self.optimizers:
            return self.scope_arg
        return default_scope(self.optimizers[0])

    @property
    def ops(self) -> int:
        """aten ops run under this guard so far."""
        return self._mode.ops if self._mode is not None else 0


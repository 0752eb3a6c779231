"""spill.torch.offload(model, optimizer): transparent swapping driven by PyTorch's own hooks,
a few calls per tensor per step.

Which blocks become swappable, and what pins every later use of each:
- parameters and buffers: declared at offload(); pinned by their module's forward pre-hook
  until its forward hook (buffers count as written: batch norm updates its running stats).
  A parameter that the first step saw used outside its owning module (a tied LM head written
  as ``x @ self.wte.weight.t()`` in the parent) is also pinned by the module that used it.
- activations: declared when autograd saves them for backward (the pack hook) and held pinned
  until the module that was running ends; module outputs stay pinned in the parent until it
  ends (in an ``nn.Sequential``, until the next child has pinned its inputs), so forward code
  between modules only ever touches pinned or undeclared blocks. A busy module (one whose
  frame would hold over a quarter of the budget that way, as the first step measured: a
  forward written in one module) runs its own code with every op pinned instead, and holds
  none of it (OffloadHandle._busy); one without children (nn.LSTM) runs its backward so too
  (_regions.py). The input batch is declared when the entry's training forward begins (also
  when nothing saves it: autocast saves its cast) and pinned by
  the entry (an nn.Sequential: until its first child has pinned it) and by the module that
  saves it, until they end: the loop's code after the forward runs in the window. In backward
  the unpack hook pins them (the plan's prefetches are issued ahead of it); the pins are
  dropped at the next point where the autograd engine is between nodes (a gradient hook on a
  module output).
- gradients: those the model has at offload() declared then; the others declared as an armed
  step's backward makes them (at the next point where the
  autograd engine is between nodes: a gradient hook on a module output or a parameter,
  and all of them when a ``loss.backward()`` the window saw returns), else at the optimizer
  step, which touches them in parameter order; a backward that accumulates into an existing
  gradient pins it first (a gradient hook on the parameter). zero_grad(set_to_none=False)
  zeroes them in place, pinned, as plain torch does (code may keep p.grad). A gradient
  autograd makes in parts (the model called twice before one backward; a
  parameter one forward uses several times, as a recurrent layer's weights) has its first
  part, which waits in AccumulateGrad's buffer, declared and pinned at its later uses
  (_partials.py). Under DistributedDataParallel, whose reducer
  copies the averaged gradients back into them when the backward ends (C++, no hook), they
  are held (undeclared, or pinned) until the backward returns.
- optimizer state: declared at offload() (what the optimizer has already: Adagrad's sums),
  after each optimizer step (each tensor known by a weak reference:
  a new one at a dead one's id() is declared too), and as ``optimizer.load_state_dict`` makes
  it (resuming from a checkpoint: _optimizer.load_state). The optimizer's step runs the
  implementation plain torch runs (the caller's foreach/fused, or torch's default: the
  foreach kernels for CUDA parameters since torch 2.0), so its bits are plain torch's; a
  torch.optim optimizer's param group that runs foreach or fused ops is cut, while spill runs
  the step, into chunks of parameters whose step tensors fit in an eighth of the budget
  (_optimizer.chunked_groups; param_groups and state_dict() show the caller's groups outside
  the step). When the step's tensors (parameters, gradients, state)
  fit in a quarter of the budget, a torch.optim optimizer's step runs with all of them pinned
  (_optimizer.py); otherwise (budget pressure, another optimizer, a closure) the step, like
  zero_grad(set_to_none=False), runs under the pin-every-op dispatch mode, so that one
  parameter's tensors (a chunk's, in the foreach implementation) are pinned at a time.
The first step runs entirely under that dispatch mode (as spill.torch.guard does), which both
keeps it safe and finds parameters used outside their modules. A forward of the model in eval
mode or without grad mode (an evaluation pass, inference) runs with every op pinned (nothing
declared): it may take a path the training forward did not show (nn.TransformerEncoderLayer's
fast path reads its children's parameters without calling them). Steps begin at the model's
first forward and end when optimizer.step() returns, with several optimizers (a list) once each
has stepped since the step began or before one steps again (without an optimizer, bracket steps
with ``with spill.torch.step():``). An optimizer that another one keeps as an attribute, over
its parameters (SAM's base optimizer), has its step wrapped too: outside its owner's step it is
the owner's step; the owner's own public methods (SAM's first_step) run in the window under
DeclareMade (every op pinned, what an op makes declared).
A training loop may call the model's submodules itself (``for blk in model.blocks: x =
blk(x)``, ``model.head(model.body(x))``), in every step or some: a submodule's forward that
begins while none of the model's forwards runs is an entry, and gets what the root's forward
gets (the step's start, the first step's discovery, the saved-tensor hooks); its outputs stay
pinned until the step ends, since the loop's code between two entries may read them.
A forward that runs inside a backward (activation checkpointing's recomputation, reentrant
or not) is neither an entry nor a step's forward (_recompute.py): its modules pin their
parameters and buffers, and the outermost one its arguments, until that region's backward is
over; no saved-tensor hooks are pushed there (non-reentrant checkpointing's own are below).
The checkpointed function's own calls outside those modules (a function calling none, an op
before the first module call) pin their tensor arguments into a hold of the recomputation's,
in an armed step's backward that the window runs (_recompute.py, _window._RecomputedOps).
Parameters frozen at offload() (requires_grad=False) and unfrozen later get their gradient
hook at the next entry.
offload's forward pre-hook runs before the module's own (moved to the front at offload()): a
weight_norm, spectral_norm or prune pre-hook then reads the parameters it computes ``weight`` from
pinned by their module; the computed weight, kept in the module until its next forward, is
declared at offload() and after each forward of the module (_declare_computed).
A module that ``functional_call`` runs with tensors in place of its own (MAML's adapted
weights) has those pinned by its pre-hook, and declared in a training forward (_hold_given).
A module's backward hooks (the caller's) run with every op pinned (_pin_backward_hooks).
offload's gradient hook runs before a parameter's other hooks and pins the parameter for
them; its forward hook is moved back to the end of a module's at each step's first forward.
A pin for reading (a parameter, an argument) unpins as written when the tensor's version
counter moved meanwhile (_Read: nn.Embedding's max_norm writes its weight in the forward).
The model as it is now is looked at each step's first forward and at the end of an armed
training forward (_refresh): parameters and buffers replaced, modules added or removed since
offload() are tracked from there (new ones pinned, declared and hooked; ones no module holds
any more made unswappable again).
TorchScript submodules (torch.jit.script, torch.jit.trace) run no Python hook inside: the
module that calls one pins all its parameters and buffers around its own forward (_scripted);
a model that is itself a ScriptModule is refused (spill.Error; guard() works for it).
Quiet steps (_quiet.py; ``quiet=0.5`` by default): a step whose previous step's peak of
allocated bytes stayed under that fraction of the budget (an armed step's: under 7/8 of it),
also once its activations are scaled by how much larger the step's inputs are (the tensor
arguments of its first forward; _fixed_bytes is what is not scaled), swaps no activation:
the saved-tensor hooks only wrap what autograd saves, pinning the parameters and buffers
among it at unpack; no module argument, output or safe point is pinned, no step scope
opened. Parameters, buffers, gradients and optimizer state keep their
declarations and pins above (the optimizer step pins its tensors when they fit under the
line). Modes change at step boundaries only (the first forward after optimizer.step(), or
after a quiet step ran out of memory; without an optimizer, every forward); activations
declared by armed steps and still alive are made unswappable before the first quiet step.
Out of memory in a quiet step is torch.cuda.OutOfMemoryError saying so (spill_set_oom_note),
and the next step is armed; in a backward, the note says what the autograd engine holds
(QuietSteps.backward_begins).
Parameters and buffers that the first step's forward used outside every module of the model
(``loss = crit(model(x)) + c * model.fc.weight.square().sum()``) are pinned from the first
forward of each later step until it ends: no module hook would pin those uses.
The training loop's own code between the hooked regions (checkpoints, logging,
clip_grad_norm_, an EMA, an evaluation pass, a loss term reading a weight) runs in the window
(_window.py): every op pinned around it, nothing made swappable, at no cost inside the
regions. An exception escaping a forward leaves nothing behind (_abandon_forward). Limits: a
thread other than the one that trains, raw pointers read by the caller's own code, and
``torch.autograd.backward`` called directly (correct, every op pinned) are not covered.
Copies and pickles of the model (``copy.deepcopy``, ``torch.save``) are plain torch modules,
without the hooks or the wrapped forward (_copies.py).
The blocks of parameters, buffers, gradients and optimizer state get names (spill_set_block_name:
``fc1.weight (param)``, ``grad of fc1.weight``, ``exp_avg of fc1.weight``), each tensor once,
for out-of-memory messages and memory snapshots (_names.py); activations stay unnamed."""
from __future__ import annotations

import importlib
import inspect
import itertools
import reprlib
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch.nn.parameter import is_lazy
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from spill import Error, InvalidArgumentError, OutOfMemoryError
from spill._errors import InvalidArgumentTypeError
from spill._capi import Status
from spill import budget as spill_budget

from . import _caller_hooks as caller_hooks
from . import _copies as copies
from ._fast_path import FAST_PATH_MODULES, only_torch
from ._guard import PinEveryOp, watch_ddp
from ._optimizer import DeclareMade, chunked_groups, load_state, pinned_step
from ._names import BlockNames
from ._partials import PartialGradients
from ._pins import (Pinner, Saved, TorchOutOfMemoryError, acyclic, components, leaves,
                    storage, whole_storage)
from ._quiet import EVALUATION, QuietSteps
from ._recompute import ModuleCall, Recomputation, call_frame, in_backward, region_frame
from ._regions import BackwardRegions
from ._state import state
from ._steps import shapes_key
from ._transforms import in_transform
from ._steps import (OptimizerRound, StepBoundaries, optimizers_of, optional_scope,
                     unwrap_methods, wrap_method)
from ._window import (_dispatch_stack, _function_stack, _insert_bottom, _leave, _remove,
                      all_handles, stray_optimizer_error, window)

Token = Any  # spill._capi.PinToken
_STRIDED = torch.strided  # (a sparse tensor has no storage of its own)
# The zero_grad methods that zero every gradient they see (_zero_grads discards before them).
_TORCH_ZERO_GRADS = (torch.optim.Optimizer.zero_grad, torch.nn.Module.zero_grad)


class _Held:
    """The first step's count of what a module's frame would hold (OffloadHandle._count_held):
    the blocks counted (address -> generation, bytes) and the bytes counted since their last
    check."""
    __slots__ = ("blocks", "unchecked")

    def __init__(self) -> None:
        self.blocks: Dict[int, Tuple[int, int]] = {}
        self.unchecked = 0


class _Frame:
    """The pins a running module holds until its forward ends. A busy module's frame (see
    OffloadHandle._busy) holds none of what its code makes: its ``ops`` mode pins each op of
    its own code instead."""
    __slots__ = ("module", "tokens", "sequential", "child_outputs", "packed", "inputs", "ops",
                 "functions", "call", "argument_nodes")

    def __init__(self, module: Optional[torch.nn.Module],
                 call: Optional[ModuleCall] = None) -> None:
        self.module = module
        self.call = call  # None for the step's frame (no module call)
        self.tokens: List[Tuple[Token, bool]] = []
        self.sequential = isinstance(module, torch.nn.Sequential)
        self.child_outputs: List[Token] = []
        self.packed: Set[int] = set()
        self.inputs: Set[int] = set()  # storage pointers of the module's tensor arguments
        self.ops: Optional[PinEveryOp] = None
        self.functions: Optional["_NewStorage"] = None  # (with ops: a busy module's)
        # A busy module without children in grad mode: its arguments' grad_fn (_regions.py).
        self.argument_nodes: Optional[List[Any]] = None


class _Read:
    """What a pin for reading holds instead of ``wrote=False``: the tensor and its version
    counter then. A forward may write a parameter in place all the same (nn.Embedding with
    ``max_norm`` renormalizes the rows it looks up; code writing a weight under no_grad): an
    unpin saying "not written" would let spill keep a host copy it made before, and the next
    swap-out would drop the write. The unpin says "written" when the version moved."""
    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.version = tensor._version

    def __bool__(self) -> bool:
        return self.tensor._version != self.version


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


def _evaluation_oom(e: BaseException) -> BaseException:
    """A pin's out-of-memory error in an evaluation forward, saying where it happened (an
    allocation's carries the note already: QuietSteps.evaluation)."""
    text = str(e)
    if EVALUATION in text:
        return e
    code = getattr(e, "code", Status.OUT_OF_MEMORY)
    state.last_oom = (f"{text}\n{EVALUATION}", code)
    return TorchOutOfMemoryError(*state.last_oom)


class _NewStorage(TorchFunctionMode):
    """A busy module's function mode (beside its ops mode): ``p.data = new`` in its code, for a
    parameter or buffer of a module that is not running (MoCo's EMA of the key encoder,
    ``pk.data = pk.data * m + pq.data * (1 - m)``, in the forward of the module that holds
    both encoders) makes the modules that own it look at it at once, as the window does, so
    the new storage is declared as it is made; before, every new weight stayed resident and
    undeclared until the forward ended. Each module's pre-hook pins what it holds then. A
    ``.data =`` elsewhere in a forward is looked at when the entry's forward ends."""

    def __init__(self, handle: "OffloadHandle") -> None:
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

    def __init__(self, handle: "OffloadHandle") -> None:
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


_module_getattr = torch.nn.Module.__getattr__


def _getattr_pinned(module: torch.nn.Module, name: str) -> Any:
    """``nn.Module.__getattr__`` (which serves parameters, buffers and submodules) once an
    offload handle was made: a parameter or buffer read while a training forward of an
    offloaded model runs on this thread, and its module does not, is pinned until the module
    running then ends (OffloadHandle._read_outside). The first step sees such reads op by op
    (_Discovery) and later steps pin those at the reader's pre-hook; a read it had not seen
    (a parent's code reading a child's weight from the third step on, a forward hook added
    after the first step reading another module's weight) went unpinned, and read the
    weight on the host (audit 36b F1: a segmentation fault on the CPU bridge)."""
    value = _module_getattr(module, name)
    if _in_forward and isinstance(value, torch.Tensor):
        me = threading.get_ident()
        for ref, thread in list(_in_forward.values()):
            handle = ref() if thread == me else None
            if handle is not None:
                handle._read_outside(module, value)
    return value


# The handles whose training forward runs now (id() -> (weak reference, thread)): an entry
# has begun and not ended (OffloadHandle._set_entry). Empty outside forwards, so that every
# other attribute read costs one test.
_in_forward: Dict[int, Tuple[Any, int]] = {}


def _install_getattr() -> None:
    """Puts _getattr_pinned in place of ``nn.Module.__getattr__``; once per process."""
    if torch.nn.Module.__getattr__ is _module_getattr:
        torch.nn.Module.__getattr__ = _getattr_pinned  # type: ignore[assignment]


def _tensor_attributes(module: torch.nn.Module) -> List[torch.Tensor]:
    """The tensors ``module`` keeps as plain attributes, neither parameters nor buffers: state
    its forward carries from one step to the next (an RNN's last hidden state, ``self.prev =
    h.detach()``; a memory bank), which may be an activation an armed step declared
    swappable. Its pre-hook pins them for its call (audit 36b F2: ``h + self.prev`` read one
    on the host, a segmentation fault on the CPU bridge at 12-20 MiB of a 6-layer MLP's
    footprint). Tensors in containers on the module are not looked into."""
    return [v for v in module.__dict__.values() if type(v) is torch.Tensor]


class OffloadHandle:
    """What :func:`offload` returns: ``remove()`` takes the hooks out and makes every tensor
    they declared unswappable again (resident), e.g. before saving a checkpoint."""

    def __init__(self, model: torch.nn.Module, optimizer: Any,
                 scope: Optional[int], quiet: Any = 0.5) -> None:
        if not isinstance(model, torch.nn.Module):
            # Checked first: model.modules() below raised AttributeError: 'NoneType' ...
            raise InvalidArgumentTypeError(
                f"spill.torch.offload: model must be a torch.nn.Module, got "
                f"{type(model).__name__} {reprlib.repr(model)}")
        if not state.active:
            raise Error("spill.torch.offload: spill is not PyTorch's allocator in this process; "
                        "call spill.torch.enable() first")
        optimizers = optimizers_of(optimizer, "spill.torch.offload")
        _refuse_offloaded(model)
        _refuse_lazy(model)
        self._policy = QuietSteps(quiet, state.device)
        self.model = model
        self.optimizer = optimizer
        # The optimizers whose steps end the training step (a step ends once each has stepped
        # since it began), and those they step themselves (SAM's base optimizer, Lookahead's
        # inner one): a step of one of those outside its owner's step counts as its owner's.
        self.optimizers: Tuple[torch.optim.Optimizer, ...] = optimizers
        self._inner: List[torch.optim.Optimizer] = []
        self._inner_of: Dict[int, List[Any]] = {}  # id() of an optimizer -> its inner ones
        self._round = OptimizerRound(len(optimizers))  # which of them stepped in this step
        self._stepping = 0  # wrapped step() calls running (an owner's step calls its inner's)
        self._owner_mode: Optional[DeclareMade] = None  # (_owner_method_wrapper)
        self.pinner = Pinner()
        scope_id, owned = optional_scope(scope, model)
        self.steps = StepBoundaries(scope_id, manage=bool(optimizers), owned=owned,
                                    name="offload " + type(model).__name__)
        self.steps.enable_evaluations()
        self._frames: List[_Frame] = []
        self._step_frame = _Frame(None)         # the model's outputs, until the step ends
        self._bw_pending: List[Tuple[Token, bool]] = []
        self._fresh: List[Any] = []  # weak references to parameters whose gradient is new
        # The model's DistributedDataParallel wrappers: their reducer reads and writes the
        # gradients, and their forward broadcasts the buffers, in C++ where no hook sees it.
        self._ddp = _ddp_modules(model)
        _refuse_outer_ddp(model)
        self._ddp_held: List[Tuple[Token, bool]] = []  # gradients held until backward ends
        self._hooks: List[Any] = []  # the parameters' gradient hooks
        self._module_hooks: Dict[torch.nn.Module, List[Any]] = {}  # forward pre/post hooks
        # The modules' backward hooks wrapped to run pinned (_pin_backward_hooks): their dicts
        # and keys, to put the caller's hooks back at remove().
        self._wrapped_hooks: List[Tuple[Dict[int, Any], int]] = []
        self._grad_hooked: Dict[int, Any] = {}  # id() -> weak reference (ids are reused)
        # Per module, its parameters, buffers and TorchScript children when last seen
        # (_refresh), and the TorchScript modules of the model (_scripted).
        self._layout: Dict[torch.nn.Module, Tuple[tuple, tuple, tuple, tuple]] = {}
        # Per module, (block pointer, weak reference) of what its pre-hook pins, as tracked.
        self._tracked: Dict[torch.nn.Module, List[Tuple[int, Any]]] = {}
        self._scripted: Set[torch.nn.Module] = set()
        self._saved_methods: dict = {}
        self._saved_hooks_pushed = False
        self._saved_hooks_quiet = False  # (which pair of its own: _push_saved_hooks)
        # Optimizer state examined (id() -> weak reference, checked: ids are reused), and
        # whether any of it was declared.
        self._state_refs: Dict[int, Any] = {}
        self._state_declared = False
        # Parameters and buffers: per module, the tensors its pre-hook pins (and wrote flags).
        self._direct: Dict[torch.nn.Module, List[Tuple[torch.Tensor, bool]]] = {}
        self._owners: Dict[int, Set[torch.nn.Module]] = {}
        self._persistent: Set[int] = set()       # storage pointers of parameters and buffers
        # Per module, the attributes its weight_norm or spectral_norm pre-hook computes (a
        # weight kept from one forward to the next): _declare_computed.
        self._computed: Dict[torch.nn.Module, List[str]] = {}
        # Discovery (first step): the module stack and parameters used outside their owners.
        self._discovery: Optional[_Discovery] = None
        self._taken_off: List[Any] = []  # modes taken off in a backward (_take_off)
        # An evaluation forward's pin-every-op mode (_begin_forward), until the entry ends.
        self._eval_ops: Optional[_PinOps] = None
        # The host reads of a forward whose ops a mode pins (the first step's, an evaluation
        # forward's) on the CPU bridge (_reads.host_reads)
        self._forward_reads: Any = None
        # The module of PyTorch's own whose fast path runs with that mode off (_fast_path_enter).
        self._fast_path_module: Optional[torch.nn.Module] = None
        self._discovered = False
        self._stack: List[torch.nn.Module] = []
        self._stack_calls: List[ModuleCall] = []
        self._stack_set: Set[torch.nn.Module] = set()
        self._extra: Dict[torch.nn.Module, Dict[int, torch.Tensor]] = {}
        # Per module, the bytes its frame would hold in an armed step (what its own code made
        # and its children returned in the first step; _busy), and while counting, the blocks
        # counted; the quarter of the budget above which a module is busy (each forward's).
        self._would_hold: Dict[torch.nn.Module, int] = {}
        self._counted: Dict[torch.nn.Module, _Held] = {}
        self._hold_line = 0
        # Parameters and buffers the first step used outside every module: pinned from the
        # first forward of each later step to its end.
        self._outside: Dict[int, torch.Tensor] = {}
        self.forwards = 0
        self._wrapped: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
        self._began_step = False  # the running forward began a step (see _abandon_forward)
        # The step's key waits for the forward's keyword arguments (torch 1.13's pre-hooks see
        # the positional ones only; see _pre_module).
        self._key_pending = False
        # The module whose forward began the forward running now (an entry: the root, or a
        # submodule the training loop calls directly), its nested calls of itself, and whether
        # a backward or a step ended since the last entry (without an optimizer, the next entry
        # then begins a step).
        self._entry: Optional[torch.nn.Module] = None
        self._entry_depth = 0
        self._step_over = True
        # Quiet steps (_quiet.py): the mode of the step running, whether the next root
        # forward begins a step, the blocks declared in armed steps other than parameters,
        # gradients and optimizer state (made unswappable again when a quiet step begins;
        # those freed are dropped at step boundaries: _prune_activations), and per module
        # what a quiet step pins (its parameters and buffers, and those it uses outside their
        # owners), held in _quiet_frames while it runs.
        self._quiet = False
        self._boundary = True
        self._acts: Set[int] = set()
        self._acts_pruned = 64  # its length after the last pruning, doubled (_prune_activations)
        # remove(): done once; what it could not bring back (no room), and the pins-only mode
        # kept on this thread's stack meanwhile.
        self._removed = False
        self._left: List[int] = []
        self._still: Optional[Any] = None
        self._quiet_pins: Dict[torch.nn.Module, List[Tuple[torch.Tensor, bool]]] = {}
        self._quiet_frames: List[Tuple[torch.nn.Module, List[Tuple[Token, bool]]]] = []
        # The hooks run some 450 times a step (a CNN): they use these instead of looking the
        # methods up each time (the pinner's only: a bound method of self kept here would make
        # a cycle that keeps the model alive after remove() until a collection).
        self._movable = self.pinner.movable
        self._pin_block = self.pinner.pin
        self._unpin = self.pinner.unpin
        # Gradients made in parts (the model called twice before one backward): _partials.py.
        self._parts = PartialGradients(self.pinner, self._persistent, _between(self))
        # The backward of busy modules without children (nn.LSTM): _regions.py.
        self._regions = BackwardRegions(self.pinner, self._persistent, _between(self))
        # Forwards a backward recomputes (activation checkpointing): _recompute.py.
        self._recompute = Recomputation(self.pinner)
        self._recomputing = False  # in the window's recomputing set
        self._window = window()
        self._names = BlockNames()  # what the tensors are, for snapshots and OOM messages
        # Collected without remove() (with its model and optimizer): _collected.
        self._finalizer = weakref.finalize(self, _collected, self._window, self.steps,
                                           self._policy)
        self._finalizer.atexit = False
        try:
            self._install()
            self._window.add(self)
            _install_getattr()
            watch_ddp(_refuse_ddp_over_offloaded)
        except BaseException:
            # Nothing of it stays: hooks, wrappers, declarations (before, an optimizer
            # without load_state_dict left the model hooked, and a later offload() of it
            # was accepted over the first one's hooks).
            try:
                self.remove()
            except Exception:  # (the first error is the one to report)
                pass
            raise

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(copies.handle_message(self.model))

    def _warn_foreign(self, foreign: Set[int]) -> None:
        """Warns that some of the model's tensors are not in spill's memory, so they never
        move (made before spill.torch.enable(); before, offload() said nothing and a model
        three times the budget "fit" it, nothing moved)."""
        sizes: Dict[int, int] = {}
        for t in itertools.chain(self.model.parameters(), self.model.buffers()):
            ptr = self._movable(t)
            if ptr in foreign:
                sizes[ptr] = storage(t).nbytes()
        warnings.warn(
            f"spill.torch.offload: {len(foreign)} of the {type(self.model).__name__}'s "
            f"parameters and buffers ({sum(sizes.values()) / 2**20:.1f} MiB) are not in "
            "spill's memory, so they never move and the budget does not count them: they were "
            "made before spill.torch.enable() (on the CPU bridge, tensors made before it keep "
            "PyTorch's own allocator) or in another pool. Make the model after enable(), or "
            "copy it there (copy.deepcopy(model) after enable()), then offload() the copy.",
            stacklevel=5)  # (the caller of offload(): through __init__ and _install)

    def __deepcopy__(self, memo: Any) -> Any:
        raise TypeError(copies.handle_message(self.model))

    # ------------------------------------------------------------------ installation

    def _install(self) -> None:
        self._scripted = _scripted(self.model)
        for m in self.model.modules():
            if m not in self._scripted:
                self._hook_module(m)
                self._track(m)
        self._names.model(self.model)
        self._unhooked = []
        for p in self.model.parameters():
            self._hook_parameter(p)
        for opt in self.optimizers:  # (and those outside the model: _declare_gradients)
            for p in _parameters(opt):
                self._hook_parameter(p)
        foreign = {ptr for ptr in self._persistent if not self.pinner.declare(ptr)}
        if foreign:
            self._warn_foreign(foreign)
        for m in self._computed:  # (weight_norm() computed one when it was applied)
            self._declare_computed(m)
        for index, opt in enumerate(self.optimizers):
            self._wrap_optimizer(opt, index)
        self._declare_optimizers_memory()
        self._wrap_forward(self.model)
        # model.zero_grad() (set_to_none=False by default in torch 1.13) as an optimizer's:
        # in the window, it would bring every gradient on the host back only to zero it.
        wrap_method(self.model, "zero_grad",
                    self._zero_grad_wrapper(lambda: list(self.model.parameters())),
                    self._saved_methods)
        wrap_method(self.model, "_apply", self._wrap_apply, self._saved_methods)

    def _wrap_optimizer(self, opt: Any, index: int) -> None:
        """Wraps the methods of ``opt``, the handle's optimizer ``index``, and of the
        optimizers it steps itself (SAM's base optimizer, Lookahead's inner one)."""
        wrap_method(opt, "step", self._step_wrapper(opt, index), self._saved_methods)
        # (an optimizer-like wrapper may lack these: what it lacks cannot be called)
        if callable(getattr(opt, "zero_grad", None)):
            wrap_method(opt, "zero_grad",
                        self._zero_grad_wrapper(lambda o=opt: _parameters(o)),
                        self._saved_methods)
        if callable(getattr(opt, "load_state_dict", None)):
            wrap_method(opt, "load_state_dict", self._wrap_load, self._saved_methods)
        if _zero_redundancy(opt):
            # ZeroRedundancyOptimizer: after its shard's step, every rank broadcasts the
            # parameters it owns into the others' (c10d, no aten op: no mode sees it).
            wrap_method(opt, "_sync_params", self._wrap_sync_params, self._saved_methods)
            return  # (its local optimizer's step runs inside its own)
        inner = _inner_optimizers(opt, self.optimizers + tuple(self._inner))
        self._inner_of[id(opt)] = inner
        for other in inner:
            self._inner.append(other)
            wrap_method(other, "step", self._step_wrapper(other, index), self._saved_methods)
        if inner:
            for name in _own_methods(opt):
                wrap_method(opt, name, self._owner_method_wrapper(), self._saved_methods)

    def _declare_optimizers_memory(self) -> None:
        """State the optimizers have already (Adagrad's sums, which its constructor makes;
        state of steps taken before offload()) can move from now on, as after a step. So can
        the gradients of steps taken before: every later use is pinned (the first step's
        mode, the window, zero_grad's pins). Before, they stayed resident, and a budget
        lowered after offload() ran out of memory in the first zero_grad."""
        self._declare_state()
        for p in self.model.parameters():
            for ptr in self.pinner.movables(p.grad):
                self.pinner.declare(ptr)

    def add_optimizer(self, optimizer: Any, replaces: Any = None) -> None:
        """Another optimizer (or a list of them) over the model, known from now on as one
        given to offload() is: its methods wrapped, its state declared swappable. This is the
        way to change optimizers mid-training at any budget (``remove()`` then ``offload()``
        must first bring every tensor back, which at a third of the footprint does not fit).

        ``replaces``: an optimizer the handle knows, which it forgets (its methods put back;
        the new one, the first of a list, takes its place in the step), so that steps end as
        they did; its state stays swappable (``old.state.clear()`` lets it go; the loop's code
        reads it pinned, as any tensor there). Without it the old one stays known (the handle
        keeps it alive): a step ends once each optimizer has stepped, or before one steps a
        second time, so with the old one idle each step ends as the next ``step()`` begins
        rather than as it returns (audit 35d: 3-7% more bytes swapped)."""
        caller = "spill.torch.OffloadHandle.add_optimizer"
        if self._removed:
            raise Error(f"{caller}: the handle was removed; call spill.torch.offload(model, "
                        "[optimizers...]) again")
        if not self.optimizers:
            raise Error(f"{caller}: offload() was given no optimizer, so its steps are "
                        "bracketed by spill.torch.step(), not by an optimizer's step; give "
                        "offload() the optimizers from the start")
        if optimizer is None:
            raise InvalidArgumentTypeError(f"{caller}: optimizer is None: pass the optimizer "
                                           "(or a list of them) to add")
        added = optimizers_of(optimizer, caller)
        known = self.optimizers + tuple(self._inner)
        for opt in added:
            if any(o is opt for o in known):
                raise InvalidArgumentError(
                    f"{caller}: the {type(opt).__name__} is one the handle knows already")
        slot = None
        if replaces is not None:
            slot = next((i for i, o in enumerate(self.optimizers) if o is replaces), None)
            if slot is None:
                inner = any(o is replaces for o in self._inner)
                raise InvalidArgumentError(
                    f"{caller}: replaces ({type(replaces).__name__}) is not an optimizer the "
                    "handle was given" + (" but one another of them steps: replace that one"
                                          if inner else ""))
            self._forget_optimizer(replaces)
        for opt in added:
            for p in _parameters(opt):
                self._hook_parameter(p)
            if slot is not None:  # (its index is the one its step wrapper counts by)
                index, slot = slot, None
                self.optimizers = tuple(opt if i == index else o
                                        for i, o in enumerate(self.optimizers))
            else:
                index = len(self.optimizers)
                self.optimizers += (opt,)
                self._round.count += 1
            self._wrap_optimizer(opt, index)
        # (what offload() was given, as it was given: the handle kept a replaced one alive)
        self.optimizer = self.optimizers[0] if len(self.optimizers) == 1 else \
            list(self.optimizers)
        self._declare_optimizers_memory()
        # State it made while no handle knew it (its steps ran in the window, which declared
        # it on running out of memory, for a while): the handle's now, not to be made
        # unswappable again when the next region begins (release_made).
        made = self._window.declared_made
        for t in self._state_tensors():
            for ptr in self.pinner.movables(t):
                made.pop(ptr, None)

    def _forget_optimizer(self, opt: Any) -> None:
        """Puts back the methods of ``opt`` and of the optimizers it steps itself (their
        places in ``optimizers`` and ``_inner`` are the caller's to fill or drop)."""
        gone = [opt, *self._inner_of.pop(id(opt), [])]
        self._inner = [o for o in self._inner if not any(o is g for g in gone)]
        saved = self._saved_methods
        mine = {key: entry for key, entry in saved.items() if any(entry[0] is g for g in gone)}
        for key in mine:
            del saved[key]
        unwrap_methods(mine)

    def _hook_module(self, m: torch.nn.Module) -> None:
        copies.register_module(m)  # a copy of the model leaves the hooks out
        if _KWARGS_OK:
            handle = m.register_forward_pre_hook(self._pre_kwargs, with_kwargs=True)
        else:
            handle = m.register_forward_pre_hook(self._pre)
        # First: a pre-hook registered before offload() (weight_norm's, spectral_norm's,
        # which compute the weight from other parameters) then reads them pinned by the
        # module itself, not by whatever module runs around it for the whole forward.
        m._forward_pre_hooks.move_to_end(handle.id, last=False)
        self._module_hooks[m] = [handle, m.register_forward_hook(self._post)]
        self._pin_backward_hooks(m)

    def _pin_backward_hooks(self, m: torch.nn.Module) -> None:
        """The module's backward hooks (register_full_backward_hook, and torch 2's backward
        pre-hooks) run inside the backward, where nothing pins what they read: the module's
        weight (a Fisher estimate), the inputs a forward hook kept (per-sample gradients,
        K-FAC). Each runs with every op pinned (nothing declared), as an evaluation forward
        does; offload() and each step's first forward wrap the hooks registered since."""
        for name in ("_backward_hooks", "_backward_pre_hooks"):
            hooks = m.__dict__.get(name)
            if hooks:
                self._pin_hooks(hooks)

    def _pinned_hook(self, hook: Any, declare: bool = False) -> Any:
        pinner = self.pinner
        mode = DeclareMade if declare else _PinOps

        def pinned(*args: Any, **kwargs: Any) -> Any:
            if state.forked_child:
                return hook(*args, **kwargs)
            with mode(pinner):
                return hook(*args, **kwargs)
        pinned._spill_original = hook  # type: ignore[attr-defined]  # (remove(), copies)
        return pinned

    def _pin_hooks(self, hooks: Dict[int, Any], declare: bool = False) -> None:
        """The caller's hooks in ``hooks`` (a module's backward hooks, or a parameter's
        gradient hooks beside offload's) not wrapped yet run with every op pinned from now on;
        remove() gives them back. A parameter's: one may read another tensor than the parameter
        (a mask buffer: ``g * self.mask``), on the host in the backward; wrapped at offload(),
        at each step's first forward (_refresh: torch 1.13 calls a snapshot of the dict, so one
        registered since would run unwrapped) and when offload's gradient hook runs.
        ``declare``: what their ops make is declared swappable as it is made (DeclareMade)."""
        for key, hook in list(hooks.items()):
            if getattr(hook, "_spill_original", None) is None and \
                    not getattr(hook, "_spill_grad_hook", False):
                hooks[key] = self._pinned_hook(hook, declare)
                self._wrapped_hooks.append((hooks, key))

    def _hook_parameter(self, p: torch.nn.Parameter) -> None:
        """The gradient hook (see _grad_hook), once per parameter; a frozen one gets it when
        it is unfrozen (_hook_unfrozen)."""
        ref = self._grad_hooked.get(id(p))
        if ref is not None and ref() is p:
            return
        if p.requires_grad:
            self._grad_hooked[id(p)] = weakref.ref(p)
            handle = p.register_hook(self._grad_hook(p))
            self._hooks.append(handle)
            hooks = getattr(p, "_backward_hooks", None)
            if isinstance(hooks, dict) and handle.id in hooks and len(hooks) > 1:
                # First: a hook of the caller's registered before then runs after it, with the
                # parameter pinned (see _grad_hook). The others are inserted again rather than
                # moved: autograd calls them in the dict's insertion order, which
                # OrderedDict.move_to_end does not change.
                others = [(k, h) for k, h in hooks.items() if k != handle.id]
                for k, _ in others:
                    del hooks[k]
                for k, h in others:
                    hooks[k] = h
        elif not any(q is p for q in self._unhooked):
            self._unhooked.append(p)

    def _track(self, m: torch.nn.Module) -> List[int]:
        """Notes the parameters and buffers ``m``'s pre-hook pins (those of its TorchScript
        children too) and what it looks like now (_refresh compares it); returns the pointers
        of blocks it owns that no module owned before (to declare)."""
        scripted = self._scripted
        direct = [(p, False) for p in m._parameters.values() if p is not None]
        direct += [(b, True) for b in m._buffers.values() if b is not None]
        children = tuple(c for c in m._modules.values() if c in scripted)
        for child in children:
            # A TorchScript submodule runs no Python hook, nor do its own submodules: the
            # module that calls it pins all their parameters and buffers.
            direct += [(p, False) for p in child.parameters()]
            direct += [(b, True) for b in child.buffers()]
        self._layout[m] = (tuple(m._parameters.values()), tuple(m._buffers.values()), children,
                           _data_pointers(m))
        self._direct[m] = []  # those that can move: a smaller one is never pinned
        tracked = self._tracked[m] = []
        new: List[int] = []
        for t, wrote in direct:
            ptr = self.pinner.movable(t)
            if ptr:
                self._direct[m].append((t, wrote))
                tracked.append((ptr, weakref.ref(t)))
                owners = self._owners.setdefault(ptr, set())
                if not owners:
                    new.append(ptr)
                owners.add(m)
                self._persistent.add(ptr)
        names = _computed_weights(m)
        if names:
            self._computed[m] = names
        else:
            self._computed.pop(m, None)
        return new

    def _untrack(self, m: torch.nn.Module) -> List[Any]:
        """Forgets what ``m`` owned; returns weak references to the tensors no module owns any
        more (_refresh makes those still alive unswappable again)."""
        gone: List[Tuple[int, Any]] = []
        self._direct.pop(m, None)
        # (by the pointers noted then: ``p.data = new`` or ``model.to()`` gives a parameter
        # another storage)
        for ptr, ref in self._tracked.pop(m, []):
            owners = self._owners.get(ptr)
            if owners is not None:
                owners.discard(m)
                if not owners:
                    del self._owners[ptr]
                    self._persistent.discard(ptr)
                    gone.append((ptr, ref))
        self._layout.pop(m, None)
        self._computed.pop(m, None)
        self._quiet_pins.pop(m, None)
        return gone

    def _refresh(self, only: Optional[Set[torch.nn.Module]] = None,
                 evaluating: bool = False) -> None:
        """At each step's first forward and at the end of each entry's forward: the model as
        it is now. A parameter or buffer
        replaced (``module.weight = nn.Parameter(...)``, ``self.buf = new`` in a forward, a
        weight tied after offload()), a module added (``add_module``, ``append``, ``insert``)
        or removed since offload() or the last step: the new ones are pinned by their module
        (and declared, and a new parameter gets its gradient hook), a new module gets the
        hooks, and what no module owns any more is made unswappable again when still alive
        (an optimizer may hold an old parameter). Before, offload pinned what the model held
        at offload(): a parameter it had not seen had no gradient hook, and a backward
        accumulating into its gradient, which the optimizer step declares, read it unpinned.
        ``only``: those modules (a parameter's ``.data`` set in the window), none removed."""
        layout = self._layout
        scripted = self._scripted
        seen: Set[torch.nn.Module] = set()
        changed: List[torch.nn.Module] = []
        for m in self.model.modules() if only is None else only:
            if m in scripted:
                continue
            seen.add(m)
            if m.__dict__.get("_backward_hooks") or m.__dict__.get("_backward_pre_hooks"):
                self._pin_backward_hooks(m)
            if _swapped_in(m, layout.get(m)):
                continue  # a functional_call runs it with other tensors: its own come back
            for p in m._parameters.values():
                hooks = getattr(p, "_backward_hooks", None) if p is not None else None
                if hooks and len(hooks) > 1:
                    self._pin_hooks(hooks)
                # torch 2.1's post-accumulate-grad hooks (an optimizer stepped in the backward,
                # a parameter at a time): their ops pinned, what they make (the optimizer's
                # state) declared, as after an optimizer step
                hooks = getattr(p, "_post_accumulate_grad_hooks", None) if p is not None else None
                if hooks:
                    self._pin_hooks(hooks, declare=True)
            old = layout.get(m)
            if old is None:
                if isinstance(m, torch.jit.ScriptModule):  # added since: its caller pins it
                    self._scripted = scripted = _scripted(self.model)
                    changed.extend(p for p in self.model.modules()
                                   if p in layout and m in p._modules.values())
                    continue
                self._hook_module(m)
                changed.append(m)
                continue
            if not (_same(old[0], m._parameters.values()) and
                    _same(old[1], m._buffers.values()) and old[3] == _data_pointers(m)):
                changed.append(m)
            pre, post = (h.id for h in self._module_hooks[m][:2])
            hooks = m._forward_pre_hooks
            if next(iter(hooks), pre) != pre and pre in hooks:
                # First: a pre-hook registered since with torch 2's prepend=True (one reading
                # the module's weight) runs after the module's pins are taken.
                hooks.move_to_end(pre, last=False)
            hooks = m._forward_hooks
            if next(reversed(hooks), post) != post and post in hooks:
                # Last: a forward hook registered since (one reading the module's weight)
                # runs while the module's pins hold.
                hooks.move_to_end(post)
        removed = [m for m in layout if m not in seen] if only is None else []
        if not changed and not removed:
            return
        gone: List[Any] = []
        for m in removed:
            gone += self._untrack(m)
            for handle in self._module_hooks.pop(m, []):
                handle.remove()
            for per_module in (self._extra, self._would_hold, self._counted):
                per_module.pop(m, None)  # (they would keep the module alive)
        for m in changed:
            gone += self._untrack(m)
        new: List[int] = []
        self._names.model(self.model, changed)
        for m in changed:
            new += self._track(m)
            if self._discovered:
                pins = list(self._direct[m]) + [(t, False)
                                                for t in self._extra.get(m, {}).values()]
                if pins:
                    self._quiet_pins[m] = pins
            for p in m._parameters.values():
                if p is not None:
                    self._hook_parameter(p)
        for ptr in new:
            self.pinner.declare(ptr)
        for m in changed:
            if m in self._computed:
                self._declare_computed(m)
        held = set().union(*(h._persistent for h in all_handles())) if gone else set()
        # What went and the window declared (on running out of memory) stays the window's:
        # its next training region makes it unswappable if still alive. At an evaluation
        # forward's beginning (``evaluating``) every op until the next training region is
        # pinned, so what went becomes the window's too (a buffer the last forward replaced,
        # ``self.kv = torch.cat(...)``, still held for a moment; before, each was brought back
        # first, and one held longer stayed resident).
        window_made = self._window.declared_made
        for ptr, ref in gone:
            t = ref()
            if t is None or ptr in self._persistent or ptr in held or self._movable(t) != ptr:
                continue
            generation = self.pinner.generation(ptr)
            if evaluating:
                if self.pinner.declare(ptr):
                    window_made[ptr] = generation
            elif window_made.get(ptr, -1) != generation:
                self.pinner.declare(ptr, False)

    @property
    def scope(self) -> int:
        """The step scope of this handle's steps (see :func:`offload`)."""
        return self.steps.scope

    @property
    def quiet(self) -> float:
        """The fraction of the budget under which the previous step's peak lets a step run
        quiet (0.0: every step swaps activations; see :func:`offload`)."""
        return self._policy.fraction

    @property
    def step_is_quiet(self) -> bool:
        """Whether the step running (or the last one) runs quiet."""
        return self._quiet

    @property
    def quiet_steps(self) -> int:
        """Steps begun quiet so far."""
        return self._policy.quiet_steps

    @property
    def armed_steps(self) -> int:
        """Steps begun armed (swapping activations) so far, the first one included."""
        return self._policy.armed_steps

    def remove(self) -> None:
        """Removes the hooks and brings every tensor they declared back (unswappable). When
        the scope was the default one, it is ended too: spill frees its recorded step and
        plan (``spill.end_scope``); a scope the caller named is left to the caller. When the
        budget cannot hold them all once unswappable, it brings back what fits and raises
        ``torch.cuda.OutOfMemoryError`` (also ``spill.OutOfMemoryError``) saying how many are
        left: those stay swappable and every op of this thread runs pinned (a read of one
        brings it back where the budget has room, else raises out of memory) until remove()
        is called again after the budget was raised (``spill.set_budget``). Before, the first
        tensor that did not fit stopped it, the rest stayed on the host with no hook, and the
        next read of a parameter was a segmentation fault on the CPU bridge."""
        if self._removed:
            self._bring_back_left(None)
            return
        self._removed = True
        self._finalizer.detach()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._regions.remove()
        for handles in self._module_hooks.values():
            for h in handles:
                h.remove()
        self._module_hooks.clear()
        for hooks, key in self._wrapped_hooks:
            hook = hooks.get(key)
            if hook is not None and getattr(hook, "_spill_original", None) is not None:
                hooks[key] = hook._spill_original
        self._wrapped_hooks.clear()
        unwrap_methods(self._saved_methods)
        self._window.discard(self)
        _in_forward.pop(id(self), None)
        self._leave_eval_ops()
        self._leave_discovery()
        self._pop_saved_hooks()
        self._unwind(0)
        self._unwind_quiet()
        self._release_frame(self._step_frame)
        self._release_backward()
        self._release_recomputed()
        self._parts.forget()
        self.steps.end()
        self._policy.forget()
        acts, self._acts = self._acts, set()
        # Activations still alive (a kept output): resident for good, as the rest.
        ptrs = list(acts)
        tensors = [t for t, _ in (x for ts in self._direct.values() for x in ts)]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += self._state_tensors()
        ptrs += [ptr for ptr in (self.pinner.movable(t) for t in tensors) if ptr]
        self._left = list(dict.fromkeys(ptrs))
        try:
            self._bring_back_left(None)
        finally:
            self.steps.finish()

    def _bring_back_left(self, error: Optional[OutOfMemoryError]) -> None:
        """Declares unswappable (bringing back) what remove() has left; see remove()."""
        left: List[int] = []
        for ptr in self._left:
            try:
                self.pinner.declare(ptr, False)
            except OutOfMemoryError as e:  # no room for it: it stays swappable
                left.append(ptr)
                error = error or e
        self._left = left
        if not left:
            still, self._still = self._still, None
            if still is not None:
                from ._window import _dispatch_stack, _leave
                _leave(still, *_dispatch_stack())  # (entered below)
            return
        if self._still is None:
            from ._guard import _StillPinning
            self._still = _StillPinning(self.pinner)
            self._still.__enter__()
        assert error is not None
        raise TorchOutOfMemoryError(
            f"spill.torch: remove() could not bring {len(left)} tensor(s) back: they do not "
            "fit in the budget once unswappable. They stay swappable, and every op of this "
            "thread runs pinned until they are back: raise the budget (spill.set_budget) and "
            f"call remove() again. {error}", error.code) from error

    # ------------------------------------------------------------------ forward

    def _pre_kwargs(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if in_transform():
            return
        if self._quiet and self._entry is not None and module is not self.model:
            if module is self._entry:
                self._entry_depth += 1
            pins = self._quiet_pins.get(module)
            if pins is not None and not state.forked_child:
                self._hold_quiet(module, pins)
            return
        self._pre(module, (args, kwargs) if kwargs else args)

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        if state.forked_child or in_transform():
            # (inside a functorch transform the module runs as a copy would: _transforms.py)
            return
        if self._entry is None and torch.is_grad_enabled() and self._pre_recomputed(module, args):
            return
        # An entry: the root's forward, or a submodule's called while none of the model's
        # forwards runs (``for blk in model.blocks: x = blk(x)`` in the training loop). Each
        # gets what the root's forward gets: a step (boundary), the first step's discovery,
        # and the saved-tensor hooks that pin what backward uses.
        root = self._entry is None or module is self.model
        if root:
            if not self._window.here():
                self._follow_thread()
            try:
                self._begin_forward(module, args)
                self._pre_module(module, args, True)
            except BaseException:
                self._abandon_forward()
                raise
            self._fast_path_enter(module)
            return
        if module is self._entry:
            self._entry_depth += 1
        self._pre_module(module, args, False)
        self._fast_path_enter(module)

    def _fast_path_enter(self, module: torch.nn.Module) -> None:
        """An eval-mode forward of nn.TransformerEncoderLayer, nn.TransformerEncoder or
        nn.MultiheadAttention themselves (not a subclass, whose code may read the host) runs
        with the host reads' function mode (_forward_reads, CPU bridge only) off until it
        returns: under any function mode PyTorch skips their fused fast path
        (torch.overrides.has_torch_function), and the slow path's numbers differ (a few ulps
        on an AVX-512 machine, 2026-12-07): an evaluation pass then gave other values than
        plain torch. Their code reads no tensor on the host; the evaluation's dispatch mode
        (_EvalOps) pins what the fused op reads. A module with a child, a hook or a function
        (``activation=``) of the caller's keeps the slower path: that code may read the host
        (review 43r F2, found for guard's)."""
        reads = self._forward_reads
        if (reads is None or self._fast_path_module is not None or module.training
                or type(module) not in _FAST_PATH_MODULES or not only_torch(module)):
            return
        if _remove(reads, *_function_stack()):
            self._fast_path_module = module

    def _fast_path_leave(self, module: torch.nn.Module) -> None:
        if self._fast_path_module is not module:
            return
        self._fast_path_module = None
        if self._forward_reads is not None:
            _insert_bottom(self._forward_reads, *_function_stack())

    def _follow_thread(self) -> None:
        """A training forward begins on a thread other than the one the handle trains on
        (its window's; not inside a backward there: _pre_recomputed). A model trains on one
        thread: its window, the saved-tensor hooks and the modes its steps push belong to
        that thread's stacks (PyTorch keeps them per thread). The handle goes to this thread
        when it has not trained yet (made on one thread, trained on another) or when its
        thread has ended (what it had pushed there went with it); else the forward is
        refused, naming what to do. Before, the forward was taken for a recomputation inside
        a backward: its pins were held as such and dropped at the next forward, and the
        second step of a model trained on a new thread read a weight on the host (a
        segmentation fault on the CPU bridge)."""
        old = self._window
        if self.forwards and old.thread_object.is_alive():
            name = type(self.model).__name__
            raise Error(
                f"spill.torch.offload: the model ({name}) runs its forwards (trains or infers) "
                f"on thread {old.thread_object.name!r}, which is still running, and a forward "
                f"now runs on thread {threading.current_thread().name!r}; an offloaded model "
                "runs on one thread (its hooks keep state on that thread's PyTorch stacks). "
                "Run every forward on one thread (a server: one worker thread for the model, "
                "e.g. ThreadPoolExecutor(max_workers=1)), or move it here: raise the budget to "
                "hold the whole model, call handle.remove() (which brings every tensor back), "
                "offload() it again here and lower the budget. Another thread may read its "
                "tensors under spill.torch.pin_reads(), but not run its forward")
        # Whatever the old thread's stacks held of this handle is gone with the thread (or
        # was never pushed): forgotten, never popped from this thread's stacks.
        self._saved_hooks_pushed = False
        self._eval_ops = None
        self._policy.evaluation(False)
        for frame in self._frames:
            frame.ops = frame.functions = None
        if self._discovery is not None:  # the first step's discovery begins again here
            self._acts.update(self._discovery.declared)
            self._discovery = None
            self._stack.clear()
            self._stack_calls.clear()
            self._stack_set.clear()
            self._counted.clear()
        if self._recomputing:
            self._recomputing = False
            old.recomputing.discard(self)
        old.discard(self)
        self._window = window()
        self._window.add(self)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _collected, self._window, self.steps)
        self._finalizer.atexit = False

    def _pre_module(self, module: torch.nn.Module, args: Any, root: bool) -> None:
        if self._quiet:
            if root and torch.is_grad_enabled() and not state.forked_child:
                self._hold_inputs(args)
            pins = self._quiet_pins.get(module)
            if pins is not None:
                self._hold_quiet(module, pins)
            if root and self._persistent and torch.is_grad_enabled():
                self._push_saved_hooks(True)
            return
        if self._discovery is not None:
            self._discover_enter(module)
            return
        self.steps.ensure()
        if root and self._began_step:
            # The step's variant: batches of another length may have other tensors over
            # swap_threshold, and so other blocks; each variant follows a plan of its own. A
            # forward given keyword arguments only (``model(ids=x)``) is keyed by its wrapper
            # (_wrap_forward), which sees them, where the pre-hook does not (torch 1.13).
            self._key_pending = not any(isinstance(t, torch.Tensor) for t in leaves(args))
            if not self._key_pending:
                self.steps.key(shapes_key(args))
        stream = self.pinner.stream()
        self._drop_finished()
        frame = _Frame(module, ModuleCall())
        tokens = frame.tokens
        busy = self._busy(module)
        swapped = _functional_call_tensors(module, self._layout.get(module))
        if swapped:  # the tensors a functional_call gives the module for its own
            self._hold_given(tokens, swapped, stream, busy)
        if not busy:  # a busy module's ops pin its parameters and buffers as they use them
            for t, wrote in self._direct.get(module, ()):
                self._hold(tokens, t, stream, wrote)
            extra = self._extra.get(module)
            if extra:
                for t in extra.values():
                    self._hold(tokens, t, stream, False)
            if self._eval_ops is None:
                for t in _tensor_attributes(module):
                    self._hold(tokens, t, stream, False)
        movable, pin = self._movable, self._pin_block
        # An nn.Sequential hands its input to its first child and never reads it again: the
        # pin goes once that child has pinned it, as a child's output does for the next one.
        held = frame.child_outputs if frame.sequential else None
        evaluating = self._eval_ops is not None
        for t in leaves(args):
            ptr = movable(t)
            if ptr:
                frame.inputs.add(ptr)
                if busy or evaluating:
                    continue  # its ops pin it (and its children's pre-hooks)
                token = pin(ptr, stream)
                if token is not None:
                    if held is not None:
                        held.append(token)
                    else:
                        tokens.append((token, True))
        if root and frame.inputs and torch.is_grad_enabled() and self._eval_ops is None:
            # The batch moves like an activation even when nothing saves it (under autocast
            # the first layer saves its cast): pinned as above, by the ops of a busy entry,
            # and by the window's mode after the forward.
            declare, persistent = self.pinner.declare, self._persistent
            for ptr in frame.inputs:
                if ptr not in persistent and declare(ptr):
                    self._acts.add(ptr)
        frames = self._frames
        if frames:
            parent = frames[-1]
            if parent.sequential and parent.child_outputs:
                unpin = self._unpin
                for token in parent.child_outputs:  # the previous child's output: our input
                    unpin(token, stream, True)
                parent.child_outputs.clear()
        if busy:
            # A module without children runs all of its code under the mode, which may then
            # declare what its ops make too (nn.LSTM's per-layer gate projections, which
            # nothing saves). One with children keeps the mode on while they run (their ops
            # are pinned twice, harmlessly), so that its own code stays pinned after it catches
            # a child's exception, when no hook says the child is over; it declares nothing,
            # since the children's code might read a tensor of theirs not passed to them: only
            # what autograd saves moves.
            leaf = next(module.children(), None) is None
            frame.ops = _BusyLeafOps(self.pinner, self._acts, frame.call, bool(self._ddp)) if leaf \
                else _PinOps(self.pinner)
            # Its backward too (_regions.py), but not under DDP: what the region's ops make
            # includes the gradients, which DDP's reducer writes when the backward ends.
            if leaf and torch.is_grad_enabled() and not self._ddp:
                frame.argument_nodes = [t.grad_fn for t in leaves(args) if
                                        isinstance(t, torch.Tensor) and t.grad_fn is not None]
            frame.ops.__enter__()
            frame.functions = _NewStorage(self)
            frame.functions.__enter__()
        frames.append(frame)
        if root and torch.is_grad_enabled():
            self._push_saved_hooks(False)

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if in_transform():
            return
        self._fast_path_leave(module)
        if self._entry is None and self._recompute.frame is not None:
            self._post_recomputed(module)
            return
        if module is self._entry:
            if self._entry_depth:
                self._entry_depth -= 1
            else:
                try:
                    self._end_entry(output)
                    self._post_module(module, output)
                    if not self._quiet and torch.is_grad_enabled() and not state.forked_child:
                        # A buffer the forward replaced (``self.avg = ...``) can move from
                        # here, through the backward and the optimizer step (a quiet step
                        # has room: its next step's first forward declares it).
                        self._refresh()
                except BaseException:
                    self._abandon_forward()
                    raise
                self._window.leave(self)
                return
        self._post_module(module, output)

    def _post_module(self, module: torch.nn.Module, output: Any) -> None:
        if self._quiet:
            frames = self._quiet_frames
            if frames and frames[-1][0] is module and not state.forked_child:
                self._release_tokens(frames.pop()[1])
            return
        if state.forked_child:
            return
        if self._discovery is not None:
            if self._discovered_top() is module:
                self._discover_leave()
                parent = self._discovered_top()
                if parent is not None and not isinstance(parent, torch.nn.Sequential):
                    self._count_held(parent, output)  # held by its parent
            return
        frames = self._frames
        if frames and frames[-1].module is module:
            depth = len(frames) - 1
        else:
            depth = next((i for i in range(len(frames) - 1, -1, -1)
                          if frames[i].module is module), None)
            if depth is None:
                return
        if len(frames) > depth + 1:
            self._unwind(depth + 1)  # frames an exception left behind
        if module in self._computed:
            self._declare_computed(module)
        frame = frames.pop()
        self._leave_ops(frame)
        if frame.argument_nodes is not None:
            self._regions.module_ended(output, frame.argument_nodes)
            frame.argument_nodes = None
        parent = frames[-1] if frames else self._step_frame
        stream = self.pinner.stream()
        grad = torch.is_grad_enabled()
        held = parent.child_outputs if parent.sequential else None
        busy = parent.ops is not None or self._eval_ops is not None
        for t in leaves(output):
            if not isinstance(t, torch.Tensor):
                continue
            if grad and t.requires_grad and t.grad_fn is not None:
                # (not on a leaf: a module that returns its parameter would leave a hook on
                # it at every step)
                t.register_hook(self._safe_point)
            if busy:
                continue  # the parent's ops pin it as they use it
            if held is not None:
                token = self._pin(t, stream)
                if token is not None:
                    held.append(token)
            else:
                self._hold(parent.tokens, t, stream, True)
        self._release_frame(frame)

    def _held_now(self) -> Set[int]:
        """The blocks that can move among what the model holds now: its parameters, their
        gradients, buffers and the weights its reparametrizations compute (weight_norm,
        spectral_norm, prune), also those added since the hooks last looked at it (_refresh
        takes them there). A gradient the loop's code gave a parameter (``p.grad = p.grad *
        0.5``) is one: every later use of a gradient is pinned (the gradient hook, zero_grad,
        the step, which declares them anyway). Before, the region after that code made those
        unswappable again, all at once (out of memory at a third of an MLP's footprint)."""
        movable = self._movable
        held = set()
        for m in self.model.modules():
            grads = (p.grad for p in m._parameters.values() if p is not None)
            for t in itertools.chain(m._parameters.values(), m._buffers.values(), grads,
                                     (m.__dict__.get(n) for n in _computed_weights(m))):
                ptr = movable(t) if isinstance(t, torch.Tensor) else 0
                if ptr:
                    held.add(ptr)
        return held

    def _declare_computed(self, module: torch.nn.Module) -> None:
        """The weight that the module's weight_norm or spectral_norm pre-hook computed stays
        in the module until its next forward computes another: declared swappable (it is read
        only in the window, pinned, until the pre-hook replaces it). A training forward
        declares it when autograd saves it; an evaluation forward saves nothing, and its
        weights stayed resident and undeclared until the next training forward."""
        for name in self._computed[module]:
            t = module.__dict__.get(name)
            ptr = self._movable(t)
            if ptr and ptr not in self._persistent and self.pinner.declare(ptr):
                self._acts.add(ptr)

    def _end_entry(self, output: Any) -> None:
        """The entry's forward hook (see _pre): its saved-tensor hooks go; its outputs stay
        pinned in the step frame (code between entries may read them) until the step ends."""
        self._set_entry(None)
        self.steps.deferred = False
        self.steps.end_evaluation()
        self._leave_eval_ops()
        self._pop_saved_hooks()
        self._claim_in_backward(output)
        if (not self._quiet and self._discovery is None and torch.is_grad_enabled()
                and not state.forked_child):
            self._parts.entry_ended(output)

    def _claim_in_backward(self, output: Any) -> None:
        """The model's backward will begin with a gradient of its output: the out-of-memory
        note is this step's from there (another model may have run a step since the
        forward), and says what is in the backward's hands (QuietSteps.backward_begins)."""
        if torch.is_grad_enabled() and not state.forked_child:
            for t in leaves(output):
                if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not None:
                    t.register_hook(_weak_hook(self._claim_note))

    def _claim_note(self, grad: torch.Tensor) -> None:
        if self._policy.during:
            self._policy.claim()
        else:  # a backward the window did not see begin (torch.autograd.backward)
            self._policy.backward_begins()

    def _begin_forward(self, module: torch.nn.Module, args: Any) -> None:
        self.forwards += 1
        self._sweep_modes()
        self._policy.backward_ends()  # (a torch.autograd.backward the window did not see)
        # Without an optimizer, a step begins at each root forward; at a submodule's entry
        # only after a backward (or outside grad mode, where nothing is kept for one): code
        # between two entries of one step may still read the first one's outputs.
        new_step = (module is self.model or self._step_over or not torch.is_grad_enabled())
        self._set_entry(module)
        self._entry_depth, self._step_over = 0, False
        self._began_step = False
        # An evaluation forward pins every op (_EvalOps): what the window declared on running
        # out of memory may stay swappable through it. One outside grad mode: a training
        # forward in eval mode (batch norm and dropout frozen by model.eval(), fine-tuning)
        # saves activations for a backward, which move as in train mode (it ran as an
        # evaluation before: every op pinned, and at a budget train mode fits it ran out of
        # memory in its backward, audit 36f F2).
        evaluation = not torch.is_grad_enabled()
        self._window.enter(self, keep_made=evaluation)
        if self._boundary or new_step:
            self._refresh(evaluating=evaluation)
        if self._unhooked:
            self._hook_unfrozen()
        if self._inner and self._discovery is None:
            # An optimizer that steps another one itself may make state in a method of its
            # own between two forwards of one step (SAM's first_step keeps the weights it
            # climbs from): it can move from here.
            self._declare_state()
        if module not in self._wrapped:
            self._wrap_forward(module)
        # What an exception in the previous forward left: its frames and saved-tensor hooks;
        # what the last backward's recomputations hold (a backward the window did not run).
        self._release_recomputed()
        self._unwind(0)
        self._unwind_quiet()
        self._leave_eval_ops()
        self._pop_saved_hooks()
        if not self.steps.manage and new_step:
            self._release_frame(self._step_frame)
            self._release_backward()
        if not self._discovered and self._discovery is None:
            # At the bottom of the stack, as the window's modes: a mode of the caller's entered
            # around this forward stays above it, and its exit (torch 1.13's pops the top)
            # takes itself off. Pushed on top, the caller's exit popped this one and left the
            # caller's mode on for good (a mode rounding matmuls to bf16 around the first
            # step rounded every later one).
            self._discovery = _Discovery(self)
            _insert_bottom(self._discovery, *_dispatch_stack())
        elif (self._discovery is not None and not self.steps.manage and self.forwards > 1
              and new_step):
            self._leave_discovery()
        if self._would_hold and self._discovery is None:
            self._hold_line = spill_budget(state.device) // 4
        if self._discovery is None and evaluation:
            # An evaluation forward (torch.no_grad(), inference_mode) may take a path the first
            # step's training forward did not show, where a module's code reads its children's
            # parameters without calling them (nn.TransformerEncoderLayer's and
            # nn.MultiheadAttention's fast path in eval mode): every op is pinned. (In grad
            # mode such reads by attribute are pinned by _getattr_pinned.)
            self._eval_ops = _EvalOps(self.pinner, self._window)
            _insert_bottom(self._eval_ops, *_dispatch_stack())  # (see _Discovery's above)
            self._policy.evaluation(True)
        if self._discovery is not None or self._eval_ops is not None:
            # Where a mode pins every op (the first step, an evaluation forward), the CPU
            # bridge's host reads (``.tolist()``, ``.numpy()``, printing) read memory without
            # an op: pinned as in the window, until the forward ends (before,
            # ``.tolist()`` of another module's weight on the host faulted: audit 36f F1 in an
            # evaluation forward, and in the first step's, whose reactive evictions can take
            # it). None on a GPU.
            from ._reads import host_reads  # (_reads imports _window)
            # Not while torch.jit.trace runs the forward: its check run (the second forward,
            # an evaluation one) saw the ops come through the mode's Python frame and failed
            # with "Graphs differed across invocations" (audit 38a F1). The cost: a host read
            # (.tolist(), .numpy()) of another module's tensor inside a traced forward is not
            # pinned (docs/pytorch.md, TorchScript).
            self._forward_reads = None if torch.jit.is_tracing() else host_reads()
            if self._forward_reads is not None:
                _insert_bottom(self._forward_reads, *_function_stack())
        # An evaluation forward between two steps (``model.eval()`` between the optimizer's
        # step and the next training forward) belongs to neither: it leaves the boundary to
        # the next training forward, and its pins begin no training step; they go to a step
        # of the evaluations' own scope, ended when the forward returns (_steps.py,
        # enable_evaluations). Before, it began the next step, which left the plan (an
        # evaluation, then a training step) and was recorded again, and so was the step after
        # it: two steps off the plan for each evaluation (a GPT at a third on the CPU bridge,
        # 2026-12-05: 40-66 and 21-50 demand fetches against 0-5 in a planned step).
        # Evaluation: eval mode and no grad mode, both. A ``torch.no_grad()`` forward in
        # training mode (targets the model computes for itself) and a training forward in eval
        # mode (batch norm frozen by ``model.eval()``) begin the step as before.
        evaluating = (self._boundary and self.steps.manage and self._discovery is None
                      and not module.training and not torch.is_grad_enabled())
        self.steps.deferred = evaluating
        # A step boundary: after the optimizer's step (without an optimizer, every step as
        # above), or after a quiet step ran out of memory (the caller abandoned it).
        if (self._boundary and not evaluating and (self.steps.manage or new_step)) or (
                self._quiet and self._policy.oom_since_boundary()):
            self._boundary = not self.steps.manage
            self._began_step = True
            self._release_backward()  # pins an abandoned backward left
            self._parts.forget()
            self._prune_activations()
            self._begin_mode(self._policy.decide(
                self._discovery is not None, _bytes_of(args), self._fixed_bytes))
            if self._outside:
                stream = self.pinner.stream()
                for t in self._outside.values():
                    self._hold(self._step_frame.tokens, t, stream, True)
        else:
            self._policy.claim()  # another model's step may have run since ours began

    def _wrap_forward(self, module: torch.nn.Module) -> None:
        """Wraps an entry's forward (the root's at offload(), a submodule's the first time the
        training loop calls it directly) so that an exception escaping it cleans up at once
        (_abandon_forward); a failing first call of a submodule entry is cleaned up at the
        next forward instead."""
        self._wrapped.add(module)

        def wrap(original: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                outermost = self._entry is module and not self._entry_depth
                if outermost and self._key_pending:
                    self._key_pending = False
                    self.steps.key(shapes_key((args, kwargs)))
                try:
                    return original(*args, **kwargs)
                except BaseException as e:
                    if outermost and self._entry is module:
                        self._abandon_forward()
                        # An op of the forward that ran out while an optimizer no handle knows
                        # holds resident state: said, as where a region cannot begin (before,
                        # only there: audit 39a F5).
                        if "no offload() handle knows" not in str(e):
                            named = stray_optimizer_error(self._window, e)
                            if named is not None:
                                raise named from e
                    raise
            return forward
        wrap_method(module, "forward", wrap, self._saved_methods)

    def _abandon_forward(self) -> None:
        """An exception escaped an entry's forward (a shape error the caller catches, out of
        memory): the state before it comes back. Its saved-tensor hooks are popped, its frames
        and their pins released, the entry closed and the first step's discovery mode left
        (the next forward begins it again); when the forward began a step, that step's pins go
        and the next forward begins it again (a boundary). The forward's graph goes with the
        caller's last reference to it (Saved makes no cycle)."""
        self._set_entry(None)
        self._entry_depth = 0
        self._key_pending = False
        self.steps.deferred = False
        self.steps.end_evaluation()
        self._leave_eval_ops()
        self._pop_saved_hooks()
        self._unwind(0)
        self._unwind_quiet()
        if self._discovery is not None:
            self._take_off(self._discovery)
            self._acts.update(self._discovery.declared)
            self._discovery = None
            self._stack.clear()
            self._stack_calls.clear()
            self._stack_set.clear()
        if self._began_step:
            self._began_step = False
            self._parts.forget()
            self._release_frame(self._step_frame)
            self._release_backward()
            self._boundary = True
            self._step_over = True
        self._window.leave(self)

    # ------------------------------------------------------------------ recomputed forwards

    def _pre_recomputed(self, module: torch.nn.Module, args: Any) -> bool:
        """A module's forward beginning inside a backward (activation checkpointing's
        recomputation; _recompute.py): pinned into the hold of the outermost recomputed
        module, never an entry, no saved-tensor hooks. False when it is not inside a
        backward (an entry then)."""
        rc = self._recompute
        frame = call_frame()
        if frame is None:
            return False
        if rc.nested(frame):
            hold = rc.current()
        else:
            if not in_backward(frame, self._window):
                return False
            rc.frame = None  # an outermost module that never returned (its forward raised)
            hold = rc.begin(frame, module, args)
            if not self._recomputing:
                # The window's saved-tensor hooks (on top with use_reentrant=True) would pin
                # the parameters the recomputation saves until the whole backward ends.
                self._recomputing = True
                self._window.recomputing.add(self)
            if self._discovery is None:
                if not self._quiet:
                    self.steps.ensure()
                stream = self.pinner.stream()
                for t in leaves(args):
                    self._hold(hold, t, stream, False)
        if self._discovery is not None:  # the first step pins every op (its stack: see _pre)
            self._discover_enter(module)
            return True
        pins = self._quiet_pins.get(module)
        if pins:
            if not self._quiet:
                self.steps.ensure()
            stream = self.pinner.stream()
            for t, wrote in pins:
                self._hold(hold, t, stream, wrote)
        return True

    def _recomputes_calls(self) -> bool:
        """Whether the backward about to run in the window needs _RecomputedOps for this
        handle (_window.py): an armed step past the first (the first pins every op)."""
        return not self._quiet and self._discovery is None and not state.forked_child

    def _recomputed_call(self, args: Any, kwargs: Any) -> None:
        """A call with grad enabled in a backward the window runs (_window._RecomputedOps):
        inside non-reentrant checkpointing's recomputation and outside every recomputed
        module (whose hold pins what it uses), its tensor arguments that are declared
        swappable are pinned into the recomputation's hold (_recompute.py), each block once,
        as are the checkpointed function's arguments when the hold opens; nothing otherwise."""
        rc = self._recompute
        if rc.frame is not None:
            if rc.running():
                return
            # A recomputed module that raised (torch 2's checkpointing stops a recomputation
            # so, and the module's forward hook never runs): over; before, the next region's
            # ops before its first module were taken for that module's (review 39d).
            rc.end()
        frame = region_frame()
        if frame is None:
            return
        stream = self.pinner.stream()
        if frame is not rc.region:
            region_args = frame.f_locals.get("args", ())
            hold = rc.begin_region(frame, region_args)
            self.steps.ensure()
            for t in leaves(region_args):
                ptr = self._movable(t)
                if ptr and ptr not in rc.region_pinned:
                    rc.region_pinned.add(ptr)
                    self._hold(hold, t, stream, False)
        hold, pinned = rc.region_hold, rc.region_pinned
        swappable = self.pinner.swappable
        for t in leaves((args, kwargs)) if kwargs else leaves(args):
            ptr = self._movable(t)
            # Only what may move: what the recomputation makes is declared by no hook
            # (checkpointing's saved-tensor hooks are above offload's), and a hold's pin keeps
            # its tensor (_Read), which would keep each temporary of the function (a cast, a
            # sum it passes on) alive until the region's backward is over. (A block not
            # swappable now is asked again at its next use.)
            if ptr and ptr not in pinned and swappable(ptr):
                pinned.add(ptr)
                self.steps.ensure()
                self._hold(hold, t, stream, False)

    def _post_recomputed(self, module: torch.nn.Module) -> None:
        if self._discovery is not None and self._discovered_top() is module:
            self._discover_leave()
        if self._recompute.is_end(module):
            self._recompute.end()
            self._leave_recomputation()

    def _leave_recomputation(self) -> None:
        if self._recomputing:
            self._recomputing = False
            self._window.recomputing.discard(self)

    def _release_recomputed(self) -> None:
        """The backward is over (or the step, or a new forward, begins): every hold goes."""
        if self._recompute.holds or self._recompute.frame is not None:
            self._recompute.release()
        self._leave_recomputation()

    # ------------------------------------------------------------------ quiet steps

    def _begin_mode(self, quiet: bool) -> None:
        """Switches to the mode of the step beginning now (no frame is open)."""
        if quiet and not self._quiet and not self._forget_activations():
            quiet = False
        self._quiet = quiet
        self._policy.begin(quiet)

    def _fixed_bytes(self) -> int:
        """The bytes of what every step holds whatever its batch (QuietSteps.decide): the
        parameters, buffers, gradients and optimizer state there are now on the target's
        device (spill's memory), each storage once."""
        sizes: Dict[int, int] = {}
        params = list(self.model.parameters())
        tensors = itertools.chain(params, self.model.buffers(),
                                  (p.grad for p in params if p.grad is not None),
                                  self._state_tensors())
        cpu = self.pinner.cpu
        for t in tensors:
            if t.layout == torch.strided and t.is_cuda != cpu and not t.is_meta:
                s = storage(t)
                sizes[s.data_ptr()] = s.nbytes()
        return sum(sizes.values())

    def _prune_activations(self) -> None:
        """At a step boundary: drops from _acts the addresses whose blocks were freed (spill
        holds no block there: generation 0), when the set has doubled since the last time
        (a cost per step that stays constant). Armed steps of varying shapes declare new
        addresses each step, and only a quiet step cleared the set: it grew without bound
        (72 to 2415 over 240 steps of random lengths, audit 2026-12-06). A freed activation
        needs nothing from _forget_activations; an address another block took since stays
        (making that block unswappable there is harmless)."""
        acts = self._acts
        if len(acts) <= self._acts_pruned:
            return
        generation = self.pinner.generation
        acts.difference_update([ptr for ptr in acts if not generation(ptr)])
        self._acts_pruned = 2 * len(acts) + 64

    def _forget_activations(self) -> bool:
        """Before the first quiet step: the blocks armed steps declared that are neither
        parameters, buffers, gradients nor optimizer state, where still alive (an output or
        an input batch the caller keeps), become unswappable again: a quiet step does not pin
        them. False (and the step stays armed) when one cannot come back for lack of room."""
        keep = set(self._persistent)
        for p in self.model.parameters():
            if p.grad is not None:
                keep.add(self._movable(p.grad))
        keep.update(self._movable(v) for v in self._state_tensors())
        acts, self._acts = self._acts, set()
        pending = [ptr for ptr in acts if ptr not in keep]
        for i, ptr in enumerate(pending):
            try:
                self.pinner.declare(ptr, False)
            except OutOfMemoryError:
                self._acts.update(pending[i:])
                return False
        return True

    def _hold_inputs(self, args: Any) -> None:
        """A quiet step's forward pins no module argument, as its activations are never
        declared; but the tensors its entry is given come from outside the step, and another
        handle's armed step may have declared them swappable: a batch two models train on, a
        GAN's generated images, what another model's forward returned. They stay pinned until
        the step ends: the forward reads them, and autograd saves them for the backward without
        a pin in a quiet step. Before, such a batch was read unpinned by the quiet model's
        forward and backward (found by check_pins: a model stepping quiet beside one stepping
        armed on the same batch faulted once the batch was evicted between them)."""
        stream = self.pinner.stream()
        tokens = self._step_frame.tokens
        try:
            for t in leaves(args):
                if isinstance(t, torch.Tensor):
                    self._hold(tokens, t, stream, False)
        except OutOfMemoryError as e:
            raise self._quiet_oom(e) from e

    def _hold_quiet(self, module: torch.nn.Module,
                    pins: List[Tuple[torch.Tensor, bool]]) -> None:
        stream = self.pinner.stream()
        tokens: List[Tuple[Token, bool]] = []
        try:
            for t, wrote in pins:
                self._hold(tokens, t, stream, wrote)
        except OutOfMemoryError as e:
            for token, _ in tokens:
                self._unpin(token, stream, False)
            raise self._quiet_oom(e) from e
        self._quiet_frames.append((module, tokens))

    def _quiet_oom(self, e: OutOfMemoryError) -> BaseException:
        """A pin's out-of-memory error in a quiet step, as PyTorch's, with the explanation."""
        message = f"{e}\n{self._policy.oom_note()}"
        state.last_oom = (message, e.code)
        return TorchOutOfMemoryError(message, e.code)

    def _unwind_quiet(self) -> None:
        """Releases what quiet frames an exception left open."""
        while self._quiet_frames:
            self._release_tokens(self._quiet_frames.pop()[1])

    def _release_tokens(self, tokens: List[Tuple[Token, Any]]) -> None:
        stream = self.pinner.stream()
        unpin = self._unpin
        for token, wrote in tokens:
            unpin(token, stream, bool(wrote))  # (a _Read: whether the tensor was written)

    # ------------------------------------------------------------------ saved tensors

    def _push_saved_hooks(self, quiet: bool) -> None:
        if not self._saved_hooks_pushed:
            ours = self._own_saved_hooks(quiet)
            hooks = ours
            caller = caller_hooks.top()  # (the caller's, entered around the forward)
            if caller is not None:
                hooks = caller_hooks.chained(*hooks, caller)
            torch._C._autograd._push_saved_tensors_default_hooks(*hooks)
            # (a pair the caller enters inside the forward is chained with ours: _caller_hooks)
            caller_hooks.pushed(ours)
            self._saved_hooks_quiet = quiet
            self._saved_hooks_pushed = True

    def _own_saved_hooks(self, quiet: bool) -> Any:
        """The handle's pair (made anew each time: kept on the handle, its bound methods
        would make a reference cycle, and the handle, with what it holds, would outlive the
        caller's last reference to it until a collection)."""
        return (self._pack_quiet, self._unpack_quiet) if quiet else (self._pack, self._unpack)

    def _pop_saved_hooks(self) -> None:
        """At the root module's forward hook, or where hooks still pushed mean that an
        exception interrupted the forward (the next forward, remove()). The interrupted
        forward's graph needs nothing more: Saved makes no reference cycle, so it goes with
        the caller's last reference to it."""
        if self._saved_hooks_pushed:
            torch._C._autograd._pop_saved_tensors_default_hooks()
            caller_hooks.popped(self._own_saved_hooks(self._saved_hooks_quiet))
            self._saved_hooks_pushed = False

    def _pack(self, t: torch.Tensor) -> Any:
        ptr = self._movable(t)
        if not ptr or state.forked_child:
            return acyclic(t)
        frames = self._frames
        if frames and ptr not in self._persistent:
            frame = frames[-1]
            if ptr in frame.inputs:
                frame = self._holder(ptr)
            if ptr not in frame.packed:
                frame.packed.add(ptr)
                if frame.ops is not None:  # a busy module's ops pin it where its code uses it
                    if self.pinner.declare(ptr):
                        self._acts.add(ptr)
                    return Saved(t, ptr)
                token = self._pin_block(ptr, self.pinner.stream())
                if token is not None:
                    frame.tokens.append((token, True))
                    self.pinner.declare(ptr)
                    self._acts.add(ptr)
        return Saved(t, ptr)

    def _pack_quiet(self, t: torch.Tensor) -> Any:
        # A quiet step declares no activation, but what autograd saves is pinned when backward
        # uses it: a parameter or buffer (a Linear's weight, batch norm's running statistics),
        # and another block that is swappable by then, since another handle may declare it
        # before this backward runs (a GAN's generator stepping quiet: the discriminator's
        # armed forward declared the generator's output, which Tanh had saved, and
        # tanh_backward read it unpinned; audit 38a F0). The rest are kept as they are, or
        # detached (see Saved: never a reference cycle).
        ptr = self._movable(t)
        if ptr and not state.forked_child:
            return Saved(t, ptr)
        return acyclic(t)

    def _unpack_quiet(self, saved: Any) -> torch.Tensor:
        if type(saved) is not Saved:
            return saved
        # An activation only when it is swappable now: one another handle declared may be
        # evicted under the node that unpacks it, one nobody declared never moves (a quiet
        # step pins none of those). Nothing on this thread declares it between here and the
        # node's use of it.
        ptr = saved.ptr
        if ptr and not state.forked_child and (ptr in self._persistent
                                               or self.pinner.swappable(ptr)):
            token = self._pin_block(saved.ptr, self.pinner.stream())
            if token is not None:
                self._bw_pending.append((token, False))
        return saved.tensor

    def _holder(self, ptr: int) -> _Frame:
        """The frame whose code may still use a tensor saved now: the running module's, unless
        the tensor is its argument; then the frame that passed it in, up to where it was made
        (an nn.Sequential does not touch a child's argument after the child returns). A tensor
        the training loop made (the batch) is the entry's argument: the loop's code after the
        forward runs in the window, which pins each op, so the entry's frame holds it."""
        i = len(self._frames) - 1
        while i >= 0 and ptr in self._frames[i].inputs:
            i -= 1
        i = max(i, 0)
        if i < len(self._frames) - 1 and self._frames[i].sequential:
            return self._frames[i + 1]
        return self._frames[i]

    def _unpack(self, saved: Any) -> torch.Tensor:
        if type(saved) is not Saved:
            return saved
        if not state.forked_child:
            self.steps.ensure()
            token = self._pin_block(saved.ptr, self.pinner.stream())
            if token is not None:
                self._bw_pending.append((token, False))
        return saved.tensor

    def _safe_point(self, grad: Optional[torch.Tensor]) -> None:
        # The engine is between nodes: every tensor unpacked so far has been used (also
        # those the window's hooks unpacked: a penalty's double-backward graph), and the
        # gradients AccumulateGrad made since the last point are done with (the next layer's
        # backward makes its gradients before their parameters' hooks run: declared only
        # there, each would stay resident through that layer's backward).
        if self._bw_pending:
            self._release_backward(held=False)
        if self._window.kept:
            self._window.release_kept()
        if self._fresh and not self._ddp:
            self._declare_fresh()

    def _grad_hook(self, p: torch.nn.Parameter) -> Any:
        ref = weakref.ref(p)

        def hook(grad: torch.Tensor) -> None:
            self._safe_point(grad)
            self._step_over = True
            if self._fresh and not self._ddp:
                self._declare_fresh()
            param = ref()
            if param is None or state.forked_child:
                return
            others = getattr(param, "_backward_hooks", None)
            if others is not None and len(others) > 1:
                # Hooks of the caller's on the parameter run after this one (see
                # _hook_parameter) and may read it (``g + wd * p``): pinned until the engine
                # is next between nodes, as what the backward unpacks. What else they read (a
                # mask buffer: ``g * self.mask``) is pinned by their ops (_pin_hooks).
                # (Naming `hook` here would make a cycle through its own cell, which kept the
                # handle and the model alive after remove() until a collection.)
                self._pin_hooks(others)
                token = self._pin(param, self.pinner.stream())
                if token is not None:
                    self._bw_pending.append((token, _Read(param)))
            if param.grad is not None:
                # AccumulateGrad is about to add into the existing gradient (a sparse one:
                # into its indices and values). Under DDP its reducer copies the averaged
                # gradients back into every gradient when the backward ends: held till then.
                held = self._ddp_held if self._ddp else self._bw_pending
                self._hold_gradient(param.grad, held, self.pinner.stream())
            elif self._persistent and not self._quiet:
                # AccumulateGrad is about to make its gradient (a quiet step, which has room,
                # leaves it to the optimizer step).
                self._fresh.append(ref)
        hook.__torch_unserializable__ = True  # type: ignore[attr-defined]  # (torch.save warns)
        hook._spill_grad_hook = True  # type: ignore[attr-defined]  # (_pin_hooks)
        return hook

    def _hook_unfrozen(self) -> None:
        """Frozen parameters (requires_grad=False at offload()) that a fine-tuning loop has
        unfrozen since (progressive unfreezing, then add_param_group): their gradient hook, so
        that a backward accumulating into a gradient on the host pins it first."""
        unfrozen = [p for p in self._unhooked if p.requires_grad]
        if unfrozen:
            self._unhooked = [p for p in self._unhooked if not p.requires_grad]
            for p in unfrozen:
                self._hook_parameter(p)

    def _declare_fresh(self) -> None:
        """Declares the gradients AccumulateGrad made since the last gradient hook: a
        backward would otherwise hold every gradient it makes resident until it ends."""
        fresh, self._fresh = self._fresh, []
        for ref in fresh:
            param = ref()
            for ptr in self.pinner.movables(param.grad) if param is not None else ():
                self.pinner.declare(ptr)
            if param is not None:
                self._names.gradient(param)

    # ------------------------------------------------------------------ optimizer

    def _step_wrapper(self, opt: torch.optim.Optimizer, index: int) -> Any:
        """The wrapper of ``opt.step`` (one of the handle's optimizers, the ``index``-th, or an
        optimizer that one steps itself): the training step ends once each of the handle's
        optimizers has stepped since it began (with one optimizer, at each step()), or
        before one steps a second time (one that does not step in every iteration, or not
        yet: steps of a bounded length all the same, each the same as the last)."""
        return lambda original: self._wrap_step(opt, index, original)

    def _wrap_step(self, opt: torch.optim.Optimizer, index: int, original: Any) -> Any:
        def step(*args: Any, **kwargs: Any) -> Any:
            if state.forked_child or self._stepping:
                # (an inner optimizer's step inside its owner's: part of that one)
                return original(*args, **kwargs)
            self._stepping += 1
            owner_mode = self._owner_mode
            restore_groups = None
            # (an exception ends the step whichever optimizers stepped: the caller abandons
            # it; one before the optimizer's step too, such as out of memory declaring the
            # gradients: before, it left the region begun and this wrapper taking every
            # later step for an inner optimizer's)
            ended = True
            try:
                if owner_mode is not None:
                    owner_mode.suspended = True
                self._window.enter(self)
                if self._round.again(index):
                    self._end_step()
                self._release_backward()
                self._release_recomputed()
                self._policy.backward_ends()
                self._policy.claim()
                quiet = self._quiet
                self._names.gradients()  # (those made since the last step's: named once)
                self._declare_gradients(quiet, opt)
                # (an eighth: a chunk's step tensors and its temporaries fit in a quarter,
                # the limit over which a foreach op would be split again, _foreach.py)
                restore_groups = chunked_groups(opt, self.pinner,
                                                spill_budget(state.device) // 8)
                if self._discovery is not None or (quiet and not self._persistent
                                                   and not self._state_declared):
                    # The first step; or a quiet step where nothing the step touches is
                    # swappable: no parameter can move (so neither can a gradient) and no
                    # optimizer state was made swappable.
                    result = original(*args, **kwargs)
                else:
                    # A quiet step may pin everything up to its line (the previous step's
                    # peak, all of it, was under it); it opens no step scope.
                    limit = self._policy.line if quiet else spill_budget(state.device) // 4
                    try:
                        done, result = pinned_step(opt, self.pinner, limit, original, args,
                                                   kwargs)
                    except OutOfMemoryError as e:
                        if quiet:
                            raise self._quiet_oom(e) from e
                        raise
                    if not done:
                        mode = PinEveryOp(self.pinner, None if quiet else self.steps, self._acts)
                        with mode:
                            result = original(*args, **kwargs)
                        self._acts.update(mode.declared)
                self._declare_state()
                ended = self._round.stepped(index)
            finally:
                self._stepping -= 1
                if owner_mode is not None:
                    owner_mode.suspended = False
                if restore_groups is not None:
                    restore_groups()
                if ended:
                    self._end_step()
                self._set_entry(None)  # an entry an exception interrupted: the forward is over
                self._window.leave(self)
                self._window.release_kept()
            return result
        return step

    def _hold_until_step_ends(self, tensors: List[torch.Tensor]) -> None:
        """A functorch transform in this handle's forward, in grad mode, read ``tensors`` (made
        before it: weights, activations): the graph the forward records through it saved them
        without the saved-tensor hooks (the transform disables them), so that the backward
        reads them unpinned. They stay pinned until the step ends (_transforms.py)."""
        stream = self.pinner.stream()
        for t in tensors:
            self._hold(self._step_frame.tokens, t, stream, False)

    def _end_step(self) -> None:
        self._round.clear()
        self._release_frame(self._step_frame)
        self._parts.forget()
        self.steps.end()
        self._leave_discovery()
        self._boundary = True

    def _backward_begins(self, roots: Any) -> None:
        """``roots.backward()`` in the window begins (_window.py): the out-of-memory note says
        what the backward holds from here (QuietSteps.backward_begins); in an armed step of
        several entries, the parts of one gradient are looked for from ``roots`` too
        (_partials.py)."""
        if not state.forked_child:
            self._policy.backward_begins()
            if not self._quiet and self._discovery is None:
                self._parts.backward_begins(roots)
            if any(getattr(d, "find_unused_parameters", False) for d in self._ddp):
                self._hold_unused_gradients()

    def _hold_unused_gradients(self) -> None:
        """A DistributedDataParallel backward with ``find_unused_parameters``: every gradient
        there is now is held (pinned) until the backward ends. DDP's reducer reads the
        gradient of a parameter this rank's backward does not reach into its bucket, and
        writes the averaged bucket back into it, in C++ with no hook of spill's in between:
        _grad_hook holds only those the backward reaches, and one unreached on the host was
        read unpinned (audit 36e F2: a layer each rank uses every other step, a segmentation
        fault on the CPU bridge)."""
        stream = self.pinner.stream()
        for p in self.model.parameters():
            if p.grad is not None:
                self._hold_gradient(p.grad, self._ddp_held, stream)

    def _hold_gradient(self, grad: torch.Tensor, held: List[Tuple[Token, Any]],
                       stream: Optional[int]) -> None:
        """Pins ``grad`` (a sparse one: its indices and values) into ``held``, as written."""
        for t in (grad,) + components(grad):
            token = self._pin(t, stream)
            if token is not None:
                held.append((token, True))

    def _backward_done(self) -> None:
        """A ``loss.backward()`` in the window ended (_window.py): the gradients made after
        the last gradient hook are declared too (see _declare_fresh), so that several backward
        passes before one step (gradient accumulation) do not hold them resident. Their later
        uses are pinned as before: the window's ops, the gradient hook of the next backward,
        the optimizer step. The backward's last pins (the gradients made after the last point
        between nodes) go here too: before, they stayed until the next region began."""
        self._sweep_modes()
        self._release_backward()
        if self._fresh and not state.forked_child:
            self._declare_fresh()
        self._release_recomputed()
        self._parts.forget()  # a forward after this one begins new graphs
        self._policy.backward_ends()

    def _grad_returned(self) -> None:
        """``torch.autograd.grad`` in the window returned or raised: the backward it ran (whose
        first gradient hook set the out-of-memory note, _claim_note) is over."""
        self._policy.backward_ends()

    def _graph_built(self, results: Any) -> None:
        """``torch.autograd.grad(..., create_graph=True)`` in the window returned ``results``
        (a gradient penalty): in an armed step, the parts a later backward through its graph
        and the forward's makes of one gradient are looked for (_partials.py)."""
        if not self._quiet and self._discovery is None and not state.forked_child:
            self._parts.graph_built(results)

    def _backward_failed(self) -> None:
        """A ``loss.backward()`` in the window raised (out of memory): the nodes its graphs'
        partial gradients hooked are let go (_partials.py), so that the graph goes with the
        caller's last reference to it."""
        self._release_held_gradients()
        self._parts.forget()
        self._policy.backward_ends()
        # The recomputation's holds and its region's frame, whose callers hold the failed
        # backward's loss, and so its graph, until the next forward (review 39d).
        self._release_recomputed()

    def _declare_gradients(self, quiet: bool, opt: torch.optim.Optimizer) -> None:
        """Makes the gradients swappable before ``opt``'s step; those of its parameters are
        touched (pinned and unpinned) first: the step's recording then knows each of them from
        here on, in the optimizer's order, so a plan can move it between now and the
        optimizer's use of it instead of meeting an unknown block. A quiet step records
        nothing: it only declares them."""
        pinner = self.pinner
        # A parameter of the optimizer's outside the model (a loose classifier weight beside
        # the backbone, a wrapper's layer around the offloaded module; one added with
        # add_param_group since) gets the gradient hook too, before its gradient can move:
        # the backward's AccumulateGrad adds into a kept gradient, and without the hook's pin
        # it added into one on the host (a segmentation fault on the CPU bridge).
        for group in opt.param_groups:
            for p in group["params"]:
                if p.requires_grad:  # (a frozen one has no gradient yet; _hook_parameter would
                    self._hook_parameter(p)  # scan the frozen list for it every step)
        if quiet and not self._persistent:  # no parameter can move: neither can its gradient
            return
        touch = not quiet
        if touch:
            self.steps.ensure()
            stream = pinner.stream()
            for group in opt.param_groups:
                for p in group["params"]:
                    for ptr in pinner.movables(p.grad):  # (a sparse one's indices, values)
                        token = pinner.pin(ptr, stream)
                        pinner.declare(ptr)
                        if token is not None:
                            pinner.unpin(token, stream, False)
        for p in self.model.parameters():  # (those no optimizer of the handle steps)
            for ptr in pinner.movables(p.grad):
                pinner.declare(ptr)

    def _wrap_sync_params(self, original: Any) -> Any:
        def sync_params(*args: Any, **kwargs: Any) -> Any:
            if state.forked_child:
                return original(*args, **kwargs)
            held: List[Tuple[Token, bool]] = []
            stream = self.pinner.stream()
            try:
                for p in self.model.parameters():
                    self._hold(held, p, stream, True)  # received, or read to send
                return original(*args, **kwargs)
            finally:
                self._release_tokens(held)
        return sync_params

    def _owner_method_wrapper(self) -> Any:
        """The wrapper of a method of its own (not torch.optim's) of an optimizer that steps
        another one (SAM's first_step and second_step), called outside a step: it runs in the
        handle's region under DeclareMade (every op pinned; what an op makes declared at once),
        so state it makes (the weights SAM climbs from, the size of the model) can move as it
        is made; within a step it is part of the step."""
        def wrapper(original: Any) -> Any:
            def method(*args: Any, **kwargs: Any) -> Any:
                if state.forked_child or self._stepping:
                    return original(*args, **kwargs)
                self._window.enter(self)
                outer, self._owner_mode = self._owner_mode, DeclareMade(self.pinner)
                try:
                    with self._owner_mode:
                        return original(*args, **kwargs)
                finally:
                    self._owner_mode = outer
                    self._declare_state()
                    self._window.leave(self)
            return method
        return wrapper

    def _zero_grad_wrapper(self, params: Callable[[], List[torch.Tensor]]) -> Any:
        """The wrapper of an optimizer's or the model's zero_grad, which zeroes the gradients
        of ``params()``."""
        return lambda original: self._wrap_zero_grad(params, original)

    def _wrap_zero_grad(self, params: Callable[[], List[torch.Tensor]], original: Any) -> Any:
        default = inspect.signature(original).parameters.get("set_to_none")
        default_to_none = bool(default.default) if default is not None else True

        def zero_grad(*args: Any, **kwargs: Any) -> Any:
            if state.forked_child or self._discovery is not None:
                return original(*args, **kwargs)
            to_none = kwargs.get("set_to_none", args[0] if args else default_to_none)
            owner_mode = self._owner_mode  # (SAM's first_step calls it: it has its own pins)
            if owner_mode is not None:
                owner_mode.suspended = True
            self._window.enter(self)  # (the window's modes would see every p.grad access)
            try:
                if to_none:  # no tensor is read or written
                    return original(*args, **kwargs)
                return self._zero_grads(params(), original, args, kwargs)
            finally:
                self._window.leave(self)
                if owner_mode is not None:
                    owner_mode.suspended = False
        return zero_grad

    def _zero_grads(self, params: List[torch.Tensor], original: Any, args: Any,
                    kwargs: Any) -> Any:
        """``zero_grad(set_to_none=False)`` of an optimizer or of the model (over ``params``),
        in the handle's region: the gradients are zeroed in place, as plain torch does, each
        pinned; one on the host comes back without a copy (spill_discard: its bytes are about
        to be zeros). Code may keep ``p.grad`` (a logger, a hand-written scaling, a flat
        view): it must stay the live gradient. Before, a gradient that could move was replaced
        by new zeros, and such code wrote into dead tensors: the losses left plain torch's
        from the third step, even with nothing ever swapped (an audit, 2026-12-05). Only a
        gradient that is its whole storage is discarded: one that is a view into a larger
        buffer (DDP's ``gradient_as_bucket_view``, a flat gradient buffer, another optimizer's
        gradients beside it) leaves the rest of that buffer live, which a discard lost (on a
        GPU, stale bytes; audit 34a). Nor is a storage over a part of a block (made over its
        memory by from_blob or DLPack): spill_discard, told the storage's bytes, discards
        only a block they cover whole."""
        # Only torch's own zero_grad surely zeroes them: an override may keep them (gradient
        # accumulation written into the optimizer, zeroing every second call), and a discarded
        # gradient then came back without its bytes (audit 35d).
        own = getattr(original, "__func__", None) in _TORCH_ZERO_GRADS
        for p in params if own else ():
            ptr = self.pinner.movable(p.grad) if p.grad is not None else 0
            if ptr and whole_storage(p.grad):
                try:  # (nothing for one not on the host)
                    self.pinner.discard(ptr, storage(p.grad).nbytes())
                except InvalidArgumentError:
                    pass  # memory not spill's (numpy's): zeroed as it is
        if self._quiet:  # the gradients (all of them fit), pinned around it
            stream = self.pinner.stream()
            tokens: List[Tuple[Token, bool]] = []
            try:
                for p in params:
                    if p.grad is not None:
                        self._hold(tokens, p.grad, stream, True)
                return original(*args, **kwargs)
            finally:
                self._release_tokens(tokens)
        with PinEveryOp(self.pinner):
            return original(*args, **kwargs)

    def _wrap_apply(self, original: Any) -> Any:
        """The model's ``_apply``, behind ``model.to(...)``, ``.half()``, ``.double()``,
        ``.to(memory_format=torch.channels_last)``: every new parameter, buffer and gradient
        it makes is declared as an op makes it (DeclareMade), and the model is looked at
        again when it returns (_refresh: the new tensors are tracked, pinned by their modules
        from then on). Before, the converted weights were made in the window, where nothing is
        declared, and stayed resident: a model converted to double at a third of its
        footprint ran out of memory in the conversion."""
        def apply(*args: Any, **kwargs: Any) -> Any:
            if state.forked_child or self._entry is not None:
                return original(*args, **kwargs)
            self._window.enter(self)  # (its own mode pins the ops instead of the window's)
            try:
                with DeclareMade(self.pinner):
                    result = original(*args, **kwargs)
            finally:
                self._window.leave(self)
            self._refresh()
            return result
        return apply

    def _wrap_load(self, original: Any) -> Any:
        def load_state_dict(*args: Any, **kwargs: Any) -> Any:
            if state.forked_child:
                return original(*args, **kwargs)
            self._window.enter(self)  # (its own mode pins the ops instead of the window's)
            try:
                result = load_state(self.pinner, original, args, kwargs)
                self._declare_state()  # what it kept without a copy (torch 2's .to())
            finally:
                self._window.leave(self)
            return result
        return load_state_dict

    def _state_tensors(self) -> List[torch.Tensor]:
        """The state tensors of the handle's optimizers and of those they step themselves."""
        tensors: List[torch.Tensor] = []
        for opt in self.optimizers + tuple(self._inner):
            for st in opt.state.values():
                tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
            tensors += [t for t in _kept_tensors(opt)
                        if storage(t).data_ptr() not in self._owners]
        return tensors

    def _state_items(self) -> List[Tuple[torch.Tensor, Optional[str]]]:
        """_state_tensors, each with its name (``exp_avg of fc1.weight``: its key in the
        optimizer's state, and its parameter's qualified name), or None (a parameter outside
        the model, a tensor an optimizer keeps in an attribute)."""
        items: List[Tuple[torch.Tensor, Optional[str]]] = []
        param = self._names.param
        for opt in self.optimizers + tuple(self._inner):
            for p, st in opt.state.items():
                qualified = param(p)
                items += [(v, f"{k} of {qualified}" if qualified is not None else None)
                          for k, v in st.items() if isinstance(v, torch.Tensor)]
            items += [(t, None) for t in _kept_tensors(opt)
                      if storage(t).data_ptr() not in self._owners]
        return items

    def _declare_state(self) -> None:
        """Declares the optimizers' state tensors it has not seen before. Each is known by
        its id() and a weak reference to it: a tensor made after another was freed may get
        the dead one's id() (a state reset, a second checkpoint loaded), and is new all the
        same."""
        if not self.optimizers:
            return
        known = self._state_refs
        now: Dict[int, Any] = {}
        pinner = self.pinner
        for v, label in self._state_items():
            ref = known.get(id(v))
            fresh = ref is None or ref() is not v
            if fresh:
                ref = weakref.ref(v)
                if label is not None:
                    self._names.name(v, label)
            # A sparse one (SGD's momentum over sparse gradients) gets new values and indices
            # in place: looked at each time.
            if fresh or v.layout != _STRIDED:
                for ptr in pinner.movables(v):
                    if pinner.declare(ptr):
                        self._state_declared = True
            now[id(v)] = ref
        self._state_refs = now

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

    # ------------------------------------------------------------------ pins

    def _pin(self, t: Any, stream: Optional[int]) -> Optional[Token]:
        ptr = self._movable(t)
        if not ptr:
            return None
        try:
            return self._pin_block(ptr, stream)
        except (torch.cuda.OutOfMemoryError, OutOfMemoryError) as e:
            # A module's weights in an evaluation forward: as its ops do (_EvalOps), it tries
            # again once what the window and such forwards made is declared. (The error is
            # not kept: its traceback's frames would hold the forward's tensors.)
            if self._eval_ops is None:
                named = stray_optimizer_error(self._window, e)
                if named is not None:  # (a replacement optimizer's state fills the budget)
                    raise named from e
                raise
        self._window.declare_made()
        try:
            return self._pin_block(ptr, stream)  # (raises again when nothing could move)
        except (torch.cuda.OutOfMemoryError, OutOfMemoryError) as e:
            raise _evaluation_oom(e) from e

    def _hold_given(self, tokens: List[Tuple[Token, Any]], given: List[torch.Tensor],
                    stream: Optional[int], busy: bool) -> None:
        """A module called by ``torch.func.functional_call`` (torch.nn.utils.stateless in
        torch 1.13) reads the tensors it was given in place of its parameters and buffers
        (MAML's adapted weights, made in the loop's code): pinned around its forward, unless
        its ops pin them (busy), and in a training forward declared swappable as the batch
        is (autograd saves them; they are read only by such forwards, pinned, by the backward,
        unpacked, and by the window's ops). Before, its hooks pinned the module's own
        parameters, which it did not read, and the given tensors stayed resident."""
        declare = (torch.is_grad_enabled() and self._eval_ops is None
                   and self._discovery is None)
        for t in given:
            ptr = self._movable(t)
            if not ptr:
                continue
            if declare and ptr not in self._persistent and self.pinner.declare(ptr):
                self._acts.add(ptr)
            if not busy:
                self._hold(tokens, t, stream, False)

    def _set_entry(self, module: Optional[torch.nn.Module]) -> None:
        """The module whose forward began the forward running now (None: none runs)."""
        self._entry = module
        if module is None:
            _in_forward.pop(id(self), None)
        else:
            _in_forward[id(self)] = (weakref.ref(self), threading.get_ident())

    def _read_outside(self, owner: torch.nn.Module, t: torch.Tensor) -> None:
        """``t``, a parameter or buffer of ``owner`` read by attribute while a training
        forward of this handle's model runs (see _getattr_pinned): pinned in the frame of the
        module running now, until it ends (in a quiet step, the innermost quiet frame's, else
        until the step ends), when ``owner`` is one of the model's and not running (its own
        pre-hook pins its tensors for its call) and no mode pins every op there (the first
        step's, an evaluation forward's, a busy module's)."""
        if self._discovery is not None or self._eval_ops is not None \
                or owner not in self._direct or state.forked_child:
            return
        if self._quiet:
            # (a module without tensors of its own, the root of most models, has no quiet
            # frame: then until the step ends)
            quiet = self._quiet_frames
            if quiet and (quiet[-1][0] is owner or any(m is owner for m, _ in quiet)):
                return
            tokens = quiet[-1][1] if quiet else self._step_frame.tokens
        else:
            frames = self._frames
            if not frames:
                return
            top = frames[-1]
            # (most reads are a module's own, which its pre-hook pinned: the top frame's)
            if top.module is owner or top.ops is not None \
                    or any(f.module is owner for f in frames):
                return
            extra = self._extra.get(top.module)
            if extra and id(t) in extra:
                return  # the first step saw it: pinned by the pre-hook
            tokens = top.tokens
        self._hold(tokens, t, self.pinner.stream(), False)

    def _hold(self, tokens: List[Tuple[Token, Any]], t: Any, stream: Optional[int],
              wrote: bool) -> None:
        token = self._pin(t, stream)
        if token is not None:
            tokens.append((token, wrote or _Read(t)))

    def _release_frame(self, frame: _Frame) -> None:
        if not frame.tokens and not frame.child_outputs:
            return
        self._release_tokens(frame.tokens)
        if frame.child_outputs:
            self._release_tokens([(token, True) for token in frame.child_outputs])
        frame.tokens.clear()
        frame.child_outputs.clear()
        frame.packed.clear()

    def _release_backward(self, held: bool = True) -> None:
        """The backward's pins until the engine is next between nodes; with ``held``, also
        the gradients a DDP backward holds until it ends (see _grad_hook)."""
        pending, self._bw_pending = self._bw_pending, []
        if pending:
            self._release_tokens(pending)
        if held:
            self._release_held_gradients()

    def _release_held_gradients(self) -> None:
        """The gradients a DDP backward held until it ended (see _grad_hook)."""
        held, self._ddp_held = self._ddp_held, []
        if held:
            self._release_tokens(held)

    def _unwind(self, depth: int) -> None:
        while len(self._frames) > depth:
            frame = self._frames.pop()
            self._leave_ops(frame)
            self._release_frame(frame)

    def _drop_finished(self) -> None:
        """Unwinds the frames of module calls that are over without a post hook: a forward
        raised and its caller caught the exception. Until then their pins stay (safe: a busy
        caller's own code runs under its mode all along, its children's too); from here the
        next module's outputs are its true parent's."""
        frames = self._frames
        depth = len(frames)
        while depth and frames[depth - 1].call is not None \
                and not frames[depth - 1].call.running():
            depth -= 1
        if depth < len(frames):
            self._unwind(depth)

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

    def _leave_ops(self, frame: _Frame) -> None:
        if frame.ops is not None:
            _leave(frame.ops, *_dispatch_stack())  # (entered: _window._leave)
            frame.ops = None
        if frame.functions is not None:
            _leave(frame.functions, *_function_stack())
            frame.functions = None


copies.HOOK_OWNERS.add(OffloadHandle)


def _between(handle: OffloadHandle) -> Any:
    """The handle's _safe_point (the engine is between nodes), without a reference to the
    handle (see _collected)."""
    ref = weakref.ref(handle)

    def between() -> None:
        h = ref()
        if h is not None:
            h._safe_point(None)
    return between


def _collected(window: Any, steps: StepBoundaries, policy: QuietSteps) -> None:
    """A handle garbage-collected without remove(), with its model and optimizer (their hooks
    held it until then): its default scope ends (spill frees the recording and plan), its
    out-of-memory note goes (it explained later errors with no model) and the window forgets
    it (Window.collected: its modes go once no handle is left)."""
    if state.forked_child:
        return
    try:
        steps.finish()
    except Error:  # a step spill cannot end now: the scope goes with the process
        pass
    try:
        policy.forget()
    except Error:
        pass
    window.collected()


def _hook_classes() -> Tuple[type, ...]:
    """The pre-hook classes of torch.nn.utils.weight_norm and spectral_norm (the modules, not
    the functions that shadow them in torch.nn.utils) and of torch.nn.utils.prune (every
    pruning method, PruningContainer included)."""
    found = []
    for module, name in (("torch.nn.utils.weight_norm", "WeightNorm"),
                         ("torch.nn.utils.spectral_norm", "SpectralNorm"),
                         ("torch.nn.utils.prune", "BasePruningMethod")):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


_REPARAMETRIZATIONS = _hook_classes()


def _computed_weights(module: torch.nn.Module) -> List[str]:
    """The attributes that ``torch.nn.utils.weight_norm``, ``spectral_norm`` or ``prune``
    pre-hooks of ``module`` compute at each forward (``weight`` from ``weight_g`` and
    ``weight_v``, or from ``weight_orig`` and ``weight_mask``; a pruning method keeps the
    name as ``_tensor_name``)."""
    names = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _REPARAMETRIZATIONS):
            name = getattr(hook, "name", None) or getattr(hook, "_tensor_name", None)
            if isinstance(name, str):
                names.append(name)
    return names


def _functional_call_tensors(module: torch.nn.Module,
                              own: Optional[tuple] = None) -> List[torch.Tensor]:
    """The tensors ``functional_call`` put in place of ``module``'s own parameters and buffers
    while it runs; none otherwise. torch 1.13 gives the module a class of its own that answers
    those names from the dict (``_attr_to_path``); torch 2 writes each given tensor into the
    module's ``_parameters`` (or ``_buffers``) entry for the call and puts the module's own
    back after it: there, the entries of ``_parameters`` that are not ``nn.Parameter``
    (``setattr`` refuses those), as MAML's adapted weights are, and while a functional_call
    runs, any entry that is not the module's own (``own``: its layout, see _swapped_in)."""
    names = module.__dict__.get("_attr_to_path")
    if not names:
        given = [t for t in module._parameters.values() if _given(t)]
        if own is not None and _replaced(own, module) and _in_functional_call():
            mine = own[0] + own[1]
            given += [t for t in (*module._parameters.values(), *module._buffers.values())
                      if t is not None and not _given(t) and not any(t is o for o in mine)]
        return given
    given = []
    for name in names:
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor):
            given.append(t)
    return given


def _bytes_of(args: Any) -> int:
    """The bytes of the tensors among a forward's arguments (each tensor's elements, a view's
    included: an expanded batch makes activations of its own size)."""
    return sum(t.numel() * t.element_size() for t in leaves(args)
               if isinstance(t, torch.Tensor))


def _given(t: Any) -> bool:
    """Whether ``t``, an entry of a module's ``_parameters``, is a tensor torch 2's
    ``functional_call`` put there for the call (setattr accepts only nn.Parameter there)."""
    return isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)


def _swapped_in(m: torch.nn.Module, own: Optional[tuple] = None) -> bool:
    """Whether torch 2's ``functional_call`` runs ``m`` with tensors of the caller's in its
    ``_parameters`` or ``_buffers`` now: the module's own are what they were (they come back
    when the call ends), so _refresh leaves its layout (``own``) as it is. Tensors that are
    not nn.Parameter tell it; nn.Parameter objects (another model's) or buffers put in place
    of the layout's do while a functional_call is on the stack (_in_functional_call). Before,
    the layout followed those and back: the module's own parameters were made unswappable
    for the call, and another handle's given ones after it (out of memory at a third)."""
    if any(_given(t) for t in m._parameters.values()):
        return True
    return own is not None and _replaced(own, m) and _in_functional_call()


def _replaced(own: tuple, m: torch.nn.Module) -> bool:
    """Whether ``m``'s parameters or buffers are other objects than its layout ``own`` has."""
    return not (_same(own[0], m._parameters.values()) and _same(own[1], m._buffers.values()))


# The frames of torch 2's functional_call (torch.func's, and torch.nn.utils.stateless's inner
# one, which runs the module inside _reparametrize_module).
_FUNCTIONAL_CALL_FRAMES = frozenset(("functional_call", "_functional_call"))


def _in_functional_call() -> bool:
    """Whether a ``functional_call`` is on the calling thread's stack (asked only when a
    module's tensors differ from its layout, so the walk is rare)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in _FUNCTIONAL_CALL_FRAMES:
            return True
        frame = frame.f_back
    return False


# PyTorch's modules whose evaluation forward takes a fused fast path only while no function
# mode is on (OffloadHandle._fast_path_enter; guard's and pin_reads': _fast_path.py).
_FAST_PATH_MODULES = FAST_PATH_MODULES

_KWARGS_OK = "with_kwargs" in torch.nn.Module.register_forward_pre_hook.__code__.co_varnames


def _data_pointers(m: torch.nn.Module) -> Tuple[int, ...]:
    """Where ``m``'s parameters and buffers live now (``p.data = new``, ``model.to()`` and
    ``model.half()`` keep the objects and change this)."""
    return tuple(t.data_ptr() if t is not None else 0
                 for t in (*m._parameters.values(), *m._buffers.values()))


def _same(old: tuple, now: Any) -> bool:
    """Whether a module's parameters (or buffers) ``now`` are the objects ``old`` holds."""
    return len(old) == len(now) and all(a is b for a, b in zip(old, now))


def _weak_hook(method: Any) -> Callable[[torch.Tensor], None]:
    """A tensor hook that calls the bound ``method`` while its object lives: a hook of the
    handle's left on a forward's output is kept by autograd's nodes, and what the handle
    keeps can reach those nodes (the first step's reads outside their owners, _extra: under
    a TorchScript function, views whose graph does), a cycle the collector cannot see.
    Before, such a model and its handle outlived remove() and their last reference (16 MiB
    more for each model trained so in one process)."""
    ref = weakref.WeakMethod(method)

    def hook(grad: torch.Tensor) -> None:
        bound = ref()
        if bound is not None:
            bound(grad)
    return hook


def _parameters(opt: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _inner_optimizers(opt: torch.optim.Optimizer,
                      known: Tuple[torch.optim.Optimizer, ...]) -> List[torch.optim.Optimizer]:
    """The optimizers ``opt`` keeps as attributes, over parameters of its own (SAM's base
    optimizer, Lookahead's inner one), which its own methods step (SAM's second_step calls
    the base optimizer's step(), never its own), other than those in ``known``."""
    mine = {id(p) for p in _parameters(opt)}
    found = []
    for value in vars(opt).values():
        if (isinstance(value, torch.optim.Optimizer) and value is not opt
                and all(value is not o for o in known + tuple(found))
                and mine.issuperset(id(p) for p in _parameters(value))):
            found.append(value)
    return found


# An optimizer's attributes that are torch.optim's: what _kept_tensors does not look in.
_OPTIMIZER_FIELDS = frozenset(("param_groups", "state", "defaults"))
_CONTAINERS = (torch.Tensor, list, tuple, dict)


def _kept_tensors(opt: Any) -> List[torch.Tensor]:
    """The tensors an optimizer of a class written outside torch keeps in public attributes
    of its own, alone or in lists, tuples and dicts (a Lookahead wrapper's slow weights,
    ``self.slow``, made in its constructor). They are declared as its state is: its step runs
    with every op pinned (pinned_step takes only torch's optimizers), as do its other
    methods called in the window. Before, they stayed resident: at a third of an MLP's
    footprint, out of memory. torch's own optimizers (ZeroRedundancyOptimizer's buffers, which
    communication reads) are not looked at."""
    if type(opt).__module__.startswith("torch."):
        return []
    found: List[torch.Tensor] = []

    def walk(value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            if value.layout == _STRIDED and not value.is_meta:
                found.append(value)
        elif depth < 3 and isinstance(value, (list, tuple, dict)):
            values = list(value.values()) if isinstance(value, dict) else value
            if values and isinstance(values[0], _CONTAINERS):  # (not a list of numbers)
                for v in values:
                    walk(v, depth + 1)

    for name, value in getattr(opt, "__dict__", {}).items():
        if not name.startswith("_") and name not in _OPTIMIZER_FIELDS:
            walk(value, 0)
    return found


# What an optimizer that steps another one keeps of torch.optim's: not its own methods.
_OPTIMIZER_API = frozenset(("step", "zero_grad", "load_state_dict", "state_dict",
                            "add_param_group"))


def _own_methods(opt: torch.optim.Optimizer) -> List[str]:
    """The public methods ``opt``'s class defines outside torch (SAM's first_step and
    second_step), but not torch.optim's API (step and zero_grad are wrapped on their own)."""
    names: List[str] = []
    for cls in type(opt).__mro__:
        if not issubclass(cls, torch.optim.Optimizer) or cls.__module__.startswith("torch."):
            continue
        for name, value in vars(cls).items():
            if (inspect.isfunction(value) and not name.startswith("_")
                    and name not in _OPTIMIZER_API and name not in names):
                names.append(name)
    return names


def _refuse_offloaded(model: torch.nn.Module) -> None:
    """offload() of a model that shares a module with one a live handle has offloaded would
    hook that module twice."""
    for other in all_handles():
        shared = set(other.model.modules()).intersection(model.modules())
        if shared:
            what = "is" if model is other.model else "shares a module with"
            raise Error(f"spill.torch.offload: the model ({type(model).__name__}) {what} the "
                        f"one ({type(other.model).__name__}) a live handle has offloaded; "
                        "call handle.remove() first, or give one offload() every optimizer "
                        "of the model: offload(model, [optimizer_a, optimizer_b])")


def _refuse_lazy(model: torch.nn.Module) -> None:
    """offload() of a model whose lazy modules (``nn.LazyLinear``...) have not made their
    parameters yet: offload tracks each tensor's memory, which such a parameter does not have
    until the first forward. Before, torch's own ValueError came from inside offload() (audit
    39a F4)."""
    lazy = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if is_lazy(t)]
    if lazy:
        names = ", ".join(repr(n) for n in lazy[:3]) + (", ..." if len(lazy) > 3 else "")
        raise InvalidArgumentError(
            f"spill.torch.offload: the model ({type(model).__name__}) has {len(lazy)} "
            f"parameter{'s' if len(lazy) > 1 else ''} or buffer{'s' if len(lazy) > 1 else ''} "
            f"its lazy modules have not made yet ({names}): run one forward with a batch "
            "first (PyTorch's dry run), then offload(); an optimizer made before it is fine")


def _zero_redundancy(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a ZeroRedundancyOptimizer with its parameter broadcast."""
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(optimizer, ZeroRedundancyOptimizer) and \
        callable(getattr(optimizer, "_sync_params", None))


def _ddp_modules(model: torch.nn.Module) -> Set[torch.nn.Module]:
    """The DistributedDataParallel modules in ``model`` (itself included). Raises spill.Error
    for one whose gradients are views of its buckets: its reducer writes them, and the
    communication library reads them, outside every hook, from the first backward on."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # a torch built without distributed support
        return set()
    found = {m for m in model.modules() if isinstance(m, DistributedDataParallel)}
    for m in found:
        if getattr(m, "gradient_as_bucket_view", False):
            raise Error(
                "spill.torch.offload: DistributedDataParallel(gradient_as_bucket_view=True) "
                "keeps the gradients in DDP's buckets, which its reducer writes and the "
                "communication library reads where no hook of spill's runs, so they could be "
                "on the host then. Pass gradient_as_bucket_view=False (the default): DDP "
                "copies each gradient into its bucket, and the gradients can move")
    return found


_OUTER_DDP = (
    "Offload the wrapper instead: ddp = DistributedDataParallel(model); handle = "
    "spill.torch.offload(ddp, optimizer). DDP's reducer reads and writes the gradients in its "
    "backward where no hook of spill's runs, and offload() knows of it only when the wrapper "
    "is in the model it is given (offloading the wrapped module alone, gradients moved to "
    "the host under it: a segmentation fault on the CPU bridge, an illegal address on a GPU).")


def _refuse_outer_ddp(model: torch.nn.Module) -> None:
    """Raises spill.Error when a DistributedDataParallel outside ``model`` wraps it or one of
    its modules (``offload(ddp.module, opt)``). Looked for only in a process whose default
    process group is up, among the objects the collector tracks (once, at offload())."""
    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # a torch built without distributed support
        return
    if not dist.is_available() or not dist.is_initialized():
        return
    import gc
    for obj in gc.get_objects():
        if isinstance(obj, DistributedDataParallel) and obj is not model \
                and any(m is model for m in obj.modules()) \
                and not any(m is obj for m in model.modules()):
            what = ("the model given" if obj.module is model else
                    f"a model ({type(obj.module).__name__}) that holds the module given")
            raise Error(f"spill.torch.offload: a DistributedDataParallel wraps {what} "
                        f"({type(model).__name__}). {_OUTER_DDP}")


def _refuse_ddp_over_offloaded(module: Any) -> None:
    """Run (watch_ddp) before each new DistributedDataParallel: wrapping a model that holds,
    or is part of, a model a live offload handle has offloaded raises spill.Error
    (``offload(model, opt)`` then ``DistributedDataParallel(model)``: the handle does not
    know of the wrapper)."""
    for handle in all_handles() if isinstance(module, torch.nn.Module) else ():
        model = handle.model
        if any(m is model for m in module.modules()) or any(
                m is module for m in model.modules()):
            raise Error(f"spill.torch.offload: DistributedDataParallel over a "
                        f"{type(module).__name__} that holds, or is part of, a model a "
                        f"live offload handle has offloaded ({type(model).__name__}): "
                        f"call handle.remove() first. {_OUTER_DDP}")


def _scripted(model: torch.nn.Module) -> Set[torch.nn.Module]:
    """The TorchScript modules of ``model`` (``torch.jit.script``, ``torch.jit.trace``) and
    every module inside them: their forwards run in TorchScript, where no Python hook runs (a
    ScriptModule refuses forward hooks). Raises spill.Error when the model itself is one."""
    script = torch.jit.ScriptModule
    if isinstance(model, script):
        raise Error(
            f"spill.torch.offload: the model ({type(model).__name__}) is a TorchScript module "
            "(torch.jit.script or torch.jit.trace): no Python hook runs inside TorchScript, so "
            "offload cannot pin what its forward reads. Offload the Python model instead (a "
            "TorchScript submodule inside a Python model is supported: the module that calls "
            "it pins its parameters), or run the training loop under spill.torch.guard()")
    found: Set[torch.nn.Module] = set()
    for m in model.modules():
        if isinstance(m, script) and m not in found:
            found.update(m.modules())
    return found


def offload(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
            scope: Optional[int] = None, quiet: Any = 0.5) -> OffloadHandle:
    """Makes ``model``'s parameters, buffers, activations and gradients (and ``optimizer``'s
    state) swappable, with the pins PyTorch's hooks give (see this module's docstring).

    model: the module trained; its forward hooks, parameter hooks and saved-tensor hooks are
      installed; ``copy.deepcopy(model)``, pickle and ``torch.save(model)`` give plain torch
      modules without them. A model (or a module of one) that a live handle has offloaded is
      refused. optimizer: if given, its ``step`` ends each training step (the first one is
      recorded, later ones follow the plan) and runs the implementation plain torch would
      (``foreach``, ``fused`` or torch's default), over chunks of parameters that fit under
      pressure (``param_groups`` and checkpoints show the caller's groups outside the
      step). A list or tuple: every optimizer that updates the model (one for the
      embeddings, another for the matrices); a step ends once each has stepped.
    scope: the step scope; two models trained in one process get their own recordings. By
      default a number spill gives the model on first use (the same for as long as the model
      lives, never one an earlier model had), ended by ``remove()``; a scope named here is
      the caller's to end with ``spill.end_scope``.
    quiet: a step runs without swapping activations (faster: no hooks on them) when the
      previous step's peak of allocated bytes was under this fraction of the budget (0.5;
      True = 0.5; False or 0: every step swaps them). Its one risk: a quiet step whose
      activations suddenly outgrow the budget (parameters, gradients and optimizer state can
      still move) raises torch.cuda.OutOfMemoryError saying so; the next step is armed.
    Returns a handle whose ``remove()`` undoes it all.
    Requires spill.torch.enable() first.
    """
    return OffloadHandle(model, optimizer, scope, quiet)

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

import itertools
import reprlib
import warnings
import weakref
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch.nn.parameter import is_lazy

from spill import Error, InvalidArgumentError, OutOfMemoryError
from spill._errors import InvalidArgumentTypeError

from . import _copies as copies
from ._guard import watch_ddp
from ._names import BlockNames
from ._optimizer import DeclareMade
from ._partials import PartialGradients
from ._pins import Pinner, TorchOutOfMemoryError, storage
from ._quiet import QuietSteps
from ._recompute import ModuleCall, Recomputation
from ._regions import BackwardRegions
from ._state import state
from ._steps import (OptimizerRound, StepBoundaries, optimizers_of, optional_scope, unwrap_methods,
                     wrap_method)
from ._window import all_handles, window
# OffloadHandle's methods by concern, and their helpers (which stay importable from here):
from ._offload_activations import _Activations
from ._offload_entries import _Entries, _bytes_of, _collected
from ._offload_grads import _Gradients, _weak_hook
from ._offload_modes import (_BusyLeafOps, _Discovery, _EvalOps, _Held, _Modes, _NewStorage,
                             _PinOps, _SET_DATA)
from ._offload_modules import _FAST_PATH_MODULES, _KWARGS_OK, _ModuleHooks, _tensor_attributes
from ._offload_optimizer import (_CONTAINERS, _OPTIMIZER_API, _OPTIMIZER_FIELDS, _Optimizers,
                                 _TORCH_ZERO_GRADS, _inner_optimizers, _kept_tensors, _own_methods,
                                 _parameters, _zero_redundancy)
from ._offload_pins import (Token, _Frame, _Pins, _Read, _STRIDED, _evaluation_oom, _getattr_pinned,
                            _in_forward, _install_getattr, _module_getattr)
from ._offload_recompute import _Recomputed
from ._offload_tracking import (_FUNCTIONAL_CALL_FRAMES, _REPARAMETRIZATIONS, _Tracking,
                                _computed_weights, _data_pointers, _functional_call_tensors, _given,
                                _hook_classes, _in_functional_call, _replaced, _same, _scripted,
                                _swapped_in)


class OffloadHandle(_ModuleHooks, _Entries, _Recomputed, _Activations, _Gradients, _Optimizers,
                    _Tracking, _Modes, _Pins):
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
        # (type(), not isinstance, as _guard's _warn_of_ddp says why: no reduce_op warning)
        if issubclass(type(obj), DistributedDataParallel) and obj is not model \
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

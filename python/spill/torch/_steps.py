"""Training-step boundaries for the hooks: a step of one scope (a model) begins at its first
pin after the previous step ended and ends when the optimizer's step() returns. Pins belong
to the calling thread's current scope, so a thread that joins the step (PyTorch's CUDA
backward runs on autograd's device thread) names the scope with spill_set_scope once per
step, and again after another model's hooks named theirs there; it starts no op:
spill_begin_op there made every later pin of the step, the backward's and the optimizer's,
one op (the plan could prefetch nothing inside it, and a block passing its id to a later one
in the op made the recording unplannable).

A scope the integration chose (the default: no ``scope=`` given) is a number from a
process-wide counter, kept for the model or optimizer object as long as it lives: the same
object keeps its scope across handles and guards, and a new object never gets an old one's
(as it could by ``id()``, which Python reuses). Such a scope is ended (spill_end_scope: its
recording and plan freed) when the handle is removed or the guard exits; a scope the caller
named is the caller's to end (``spill.end_scope``)."""
from __future__ import annotations

import ctypes
import functools
import inspect
import itertools
import math
import threading
import types
import weakref
from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch

from spill import InvalidArgumentError, _args
from spill._errors import InvalidArgumentTypeError
from spill._capi import raise_status
from spill._lib import library

from ._pins import leaves
from ._state import state


# Per thread: device -> the scope a StepBoundaries made current there last.
_current = threading.local()


class StepBoundaries:
    """Begins and ends the steps of ``scope`` on spill's device (see the module docstring)."""

    def __init__(self, scope: int, manage: bool, owned: bool = False, name: str = "") -> None:
        self.scope = scope          # checked (optional_scope): c_uint64 would wrap it
        self.manage = manage        # False: the caller brackets steps (with spill.step())
        self.owned = owned          # the integration chose the scope: finish() ends it
        self.name = name            # what the scope is, for traces ("offload GPT")
        self.in_step = False
        # Set for an evaluation between two steps (offload: a forward in eval mode, see its
        # _begin_forward; guard: an op outside grad mode, or Tensor.item()): its pins begin no
        # step of this scope; they go to a step of the evaluation scope (below) when there is
        # one, else to this scope with none open (spill records and plans nothing of them).
        self.deferred = False
        self.count = 0              # steps ended so far
        # offload's evaluation passes between steps (``deferred`` for a forward in eval mode
        # and without grad mode): each is a step of a scope of their own, so that the first is
        # recorded and the later ones follow its plan (prefetching the weights they read). As
        # pins in no step they fetched on demand what the training plan had moved out at the
        # end of the step before: torchvision's googlenet with an evaluation after every step,
        # 127-144 demand fetches in steps 3-6 against 11-34 when the evaluation began the next
        # training step (2026-12-05). Set by enable_evaluations(); guard() leaves it unset.
        self.evaluation_scope: Optional[int] = None
        self.in_evaluation = False
        # Per thread, the step (its count) in which the thread named the scope. Not a set of
        # thread idents: a thread that ended gives its ident to the next one, whose native
        # current scope is unset (a backward per step on a fresh thread, as the CPU bridge's
        # rehearsal runs autograd.grad and the later backward of a gradient penalty: the
        # second one's pins went to no scope, and its steps followed no plan).
        self._named = threading.local()
        self._lib = library()
        self._device = state.device
        # A scope the integration chose is a number from 2**63 up: a report names it instead
        # (a scope the caller chose is the caller's to name, spill.set_scope_name).
        if owned and name and not state.forked_child:
            self._name_scope(scope, name)

    def _name_scope(self, scope: int, name: str) -> None:
        self._call("spill_set_scope_name", self._device, ctypes.c_uint64(scope),
                   name.encode("utf-8", "replace"))  # (spill cuts it at 255 bytes)

    def _call(self, name: str, *args: Any) -> None:
        status = getattr(self._lib, name)(*args)
        if status != 0:
            raise_status(self._lib, status)

    def ensure(self) -> None:
        """Called by every hook before its pins: begins a step if none is open and makes the
        scope current on this thread, once per thread and step and again whenever another
        scope's hooks made theirs current there since (two models in one backward, a GAN's
        generator through its discriminator: the backward's thread named the generator's
        scope, then the discriminator's, and the generator's later pins went to the
        discriminator's recording)."""
        if not self.manage:
            return
        named = self._named
        current = _current.__dict__
        if self.deferred and not self.in_step:
            # An evaluation pass: a step of the evaluations' scope when there is one; else no
            # step, the pins going to this scope (none is open there: nothing records them),
            # not to whichever scope another model's hooks made current on this thread.
            evaluation = self.evaluation_scope
            target = self.scope if evaluation is None else evaluation
            if evaluation is not None and not self.in_evaluation:
                self._call("spill_begin_step", self._device, ctypes.c_uint64(evaluation))
                self.in_evaluation = True
            elif current.get(self._device) != target:
                self._call("spill_set_scope", self._device, ctypes.c_uint64(target))
            current[self._device] = target
            return
        if self.in_evaluation:
            self.end_evaluation()
        if not self.in_step:
            self._call("spill_begin_step", self._device, ctypes.c_uint64(self.scope))
            self.in_step = True
        elif getattr(named, "step", None) != self.count or current.get(self._device) != self.scope:
            self._call("spill_set_scope", self._device, ctypes.c_uint64(self.scope))
        else:
            return
        named.step = self.count
        current[self._device] = self.scope

    def key(self, key: int) -> None:
        """The variant of the step in progress (spill_step_key): the scope keeps a plan per
        variant, and a step keyed before its first pin follows its variant's."""
        if self.manage and self.in_step and not self.deferred:
            self._call("spill_step_key", self._device, ctypes.c_uint64(self.scope),
                       ctypes.c_uint64(key & 0xFFFF_FFFF_FFFF_FFFF))

    def enable_evaluations(self) -> None:
        """Evaluation passes between steps (``deferred``) run as steps of a scope of their
        own, made here from the process-wide counter and ended by finish()."""
        if self.manage and self.evaluation_scope is None:
            self.evaluation_scope = fresh_scope()
            if self.name:
                self._name_scope(self.evaluation_scope, self.name + ", evaluations")

    def end_evaluation(self) -> None:
        """Ends the evaluation pass's step, if one is open (its forward returned)."""
        if self.in_evaluation:
            self.in_evaluation = False
            self._call("spill_end_step", self._device, ctypes.c_uint64(self.evaluation_scope))

    def end(self) -> None:
        if self.manage and self.in_step:
            self.in_step = False
            self.count += 1
            self._call("spill_end_step", self._device, ctypes.c_uint64(self.scope))

    def finish(self) -> None:
        """Ends the step in progress, the evaluations' scope, and, when the integration
        chose the scope, the scope itself (their recordings and plans are freed)."""
        self.end()
        if state.forked_child:
            return
        self.end_evaluation()
        if self.evaluation_scope is not None:
            self._call("spill_end_scope", self._device, ctypes.c_uint64(self.evaluation_scope))
        if self.owned:
            self._call("spill_end_scope", self._device, ctypes.c_uint64(self.scope))


def wrap_method(obj: Any, name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]],
                saved: dict) -> None:
    """Replaces ``obj.name`` by ``wrapper(original)`` on the instance; ``saved`` keeps what to
    put back (see :func:`unwrap_methods`)."""
    original = getattr(obj, name)
    wrapped = wrapper(original)
    on = [True]  # False once unwrapped: the method then calls the original

    # A bound method, as the original was: code that wraps it in turn (an LR scheduler's step
    # counter takes method.__self__ and method.__func__) keeps working.
    @functools.wraps(original)
    def method(_self: Any, *args: Any, **kwargs: Any) -> Any:
        return (wrapped if on[0] else original)(*args, **kwargs)
    _keep_signature(method, original, obj)
    previous = obj.__dict__.get(name)
    method._spill_previous = previous  # type: ignore[attr-defined]  # (see wrapped_previous)
    _wrappers.add(method)
    ours = types.MethodType(method, obj)
    saved[(id(obj), name)] = (obj, name, previous, ours, on)
    setattr(obj, name, ours)


# The functions wrap_method made (weakly: one lives as long as its object's wrapper).
_wrappers: "weakref.WeakSet[Any]" = weakref.WeakSet()


def wrapped_previous(method: Any) -> Tuple[bool, Any]:
    """(True, what the instance had before) when ``method`` is a wrapper wrap_method put on
    an instance (None: nothing, the class's method), else (False, None). Copies of the
    instance leave the wrapper out (_copies.py)."""
    func = getattr(method, "__func__", None)
    if type(func) is not types.FunctionType or func not in _wrappers:
        return False, None
    return True, func._spill_previous  # type: ignore[attr-defined]


def _keep_signature(method: Callable[..., Any], original: Any, obj: Any) -> None:
    """Makes inspect.signature of the wrapper, bound to ``obj``, the original's
    (HuggingFace's Trainer reads ``model.forward``'s parameters to choose a dataset's
    columns): inspect drops the first parameter of a bound method's function, found through
    ``__wrapped__``, so that is the original's function where the original is a method bound
    to ``obj`` (also right through a wrapper of the caller's made later with functools.wraps,
    where inspect stops at our bound method); else an explicit signature with a first
    parameter to drop."""
    if isinstance(original, types.MethodType) and original.__self__ is obj:
        method.__wrapped__ = original.__func__  # type: ignore[attr-defined]
        return
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        return
    first = inspect.Parameter("_self", inspect.Parameter.POSITIONAL_ONLY)
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[first, *signature.parameters.values()])


def unwrap_methods(saved: dict) -> None:
    """Puts back what :func:`wrap_method` replaced. Where other code has wrapped our method
    since (an LR scheduler created afterwards), its wrapper stays and ours only passes calls
    through to the original."""
    for obj, name, previous, ours, on in saved.values():
        on[0] = False
        if obj.__dict__.get(name) is not ours:
            continue
        if previous is None:
            obj.__dict__.pop(name, None)
        else:
            setattr(obj, name, previous)
    saved.clear()


# Default scopes: 2**63 + n, apart from the small numbers callers pick. Keyed by id() but
# checked by a weak reference, so an entry never outlives its object.
_DEFAULT_SCOPE_BASE = 1 << 63
_scope_counter = itertools.count(1)
_scope_lock = threading.Lock()
_scopes: Dict[int, Tuple[Any, int]] = {}


def fresh_scope() -> int:
    """A default scope of no object's (StepBoundaries' evaluation passes)."""
    with _scope_lock:
        return _DEFAULT_SCOPE_BASE + next(_scope_counter)


def default_scope(obj: Any) -> int:
    """The step scope the integration uses for ``obj`` (a model or an optimizer): made on
    first use from a process-wide counter, the same for as long as ``obj`` lives."""
    with _scope_lock:
        entry = _scopes.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return entry[1]
        scope = _DEFAULT_SCOPE_BASE + next(_scope_counter)
        key = id(obj)

        def forget(ref: Any) -> None:
            with _scope_lock:
                if _scopes.get(key, (None,))[0] is ref:
                    del _scopes[key]
        try:
            _scopes[key] = (weakref.ref(obj, forget), scope)
        except TypeError:
            pass  # not weakly referable: a new scope each time it is used
        return scope


def optional_scope(scope: Optional[int], default: Any) -> Tuple[int, bool]:
    """The scope to use and whether the integration chose it (then it ends it when done). A
    scope given is checked as spill.begin_step checks it: int() and ctypes wrapped 2**64 + 7
    to 7 (another model's scope), -1 to 2**64 - 1 and took 7.9 and "7" as 7."""
    return (default_scope(default), True) if scope is None else (_args.scope(scope), False)


class OptimizerRound:
    """Which of a training step's ``count`` optimizers have stepped since it began (offload's
    and guard's): the step ends once each has stepped, or before one steps a second time (one
    that steps less often than the others, or not yet, still gives steps of a bounded length,
    each like the last)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.done: Set[int] = set()

    def again(self, index: int) -> bool:
        """Optimizer ``index`` is about to step: True (and a new round) when it already stepped
        in this one, whose step then ends first."""
        if index not in self.done:
            return False
        self.done.clear()
        return True

    def stepped(self, index: int) -> bool:
        """Optimizer ``index`` stepped: True (and a new round) when each has now."""
        self.done.add(index)
        if len(self.done) < self.count:
            return False
        self.done.clear()
        return True

    def clear(self) -> None:
        self.done.clear()


def optimizers_of(optimizer: Any, caller: str) -> Tuple[Any, ...]:
    """The ``optimizer`` argument of offload() or guard() (``caller``, for errors) as a tuple:
    None, one optimizer, or a list or tuple of them (several optimizers over one model: one
    for the embeddings, another for the matrices)."""
    if optimizer is None:
        return ()
    many = isinstance(optimizer, (list, tuple))
    found = tuple(optimizer) if many else (optimizer,)
    if many and not found:
        raise InvalidArgumentError(f"{caller}: optimizer is an empty " + type(optimizer).__name__ +
                    "; pass None (then bracket steps with spill.torch.step()), one optimizer "
                    "or several")
    for i, opt in enumerate(found):
        where = f"optimizer[{i}]" if many else "optimizer"
        if not callable(getattr(opt, "step", None)) or not hasattr(opt, "param_groups"):
            raise InvalidArgumentTypeError(f"{caller}: {where} ({type(opt).__name__}) is not an "
                        "optimizer (no step() and param_groups); pass a torch.optim.Optimizer, "
                        "a list of them, or None")
        if any(o is opt for o in found[:i]):
            raise InvalidArgumentError(f"{caller}: {where} ({type(opt).__name__}) is given twice")
    return found


def shapes_key(args: Any) -> int:
    """A step's variant (spill_step_key) from the tensor arguments of its first forward
    (offload; guard gathers shapes over the ops before the step's first pin, key_of_shapes),
    ordered so that a batch of a size not met before follows the plan of the nearest size met:
    16 bits of their ranks and dtypes, 24 of the logarithm of their element count, 24 of their
    exact shapes (hashes are stable within the process, as long as spill keeps plans)."""
    return key_of_shapes([shape_of(t) for t in leaves(args) if isinstance(t, torch.Tensor)])


def shape_of(t: torch.Tensor) -> Tuple[Any, ...]:
    """What a step's key reads of a tensor: its shape, dtype and element count (not the
    tensor: a key gathered over several ops holds no memory)."""
    return (tuple(t.shape), t.dtype, t.numel())


def key_of_shapes(shapes: Any) -> int:
    """shapes_key over shape_of's tuples."""
    kinds = hash(tuple((len(s), d) for s, d, _ in shapes)) & 0xFFFF
    size = min(int(math.log2(1 + sum(n for _, _, n in shapes)) * (1 << 18)), (1 << 24) - 1)
    digest = hash(tuple(s for s, _, _ in shapes)) & 0xFF_FFFF
    return kinds << 48 | size << 24 | digest

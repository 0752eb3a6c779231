"""The optimizers under offload: their wrapped step, zero_grad and load_state_dict (and the
model's zero_grad and _apply), and their state declared swappable. Mixed into OffloadHandle;
the design is in _offload.py's docstring."""
from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from spill import InvalidArgumentError, OutOfMemoryError
from spill import budget as spill_budget

from ._guard import PinEveryOp
from ._offload_pins import Token, _STRIDED
from ._optimizer import DeclareMade, chunked_groups, load_state, pinned_step
from ._pins import storage, whole_storage
from ._state import state
from ._steps import unwrap_methods, wrap_method


# The zero_grad methods that zero every gradient they see (_zero_grads discards before them).
_TORCH_ZERO_GRADS = (torch.optim.Optimizer.zero_grad, torch.nn.Module.zero_grad)


class _Optimizers:
    """OffloadHandle's optimizer wrappers and optimizer state."""

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

    def _end_step(self) -> None:
        self._round.clear()
        self._release_frame(self._step_frame)
        self._parts.forget()
        self.steps.end()
        self._leave_discovery()
        self._boundary = True

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


def _zero_redundancy(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a ZeroRedundancyOptimizer with its parameter broadcast."""
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(optimizer, ZeroRedundancyOptimizer) and \
        callable(getattr(optimizer, "_sync_params", None))

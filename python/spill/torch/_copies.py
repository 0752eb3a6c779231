"""Copies of an offloaded model are plain torch modules: ``copy.deepcopy``, ``copy.copy``,
``pickle`` and ``torch.save`` of a module offload() hooked (the model or a submodule) leave
spill's module hooks and forward, zero_grad and _apply wrappers out of the copy, which gets its own
tensors, no spill hook, and its class's forward (it runs the copy's modules, never the
original's); the
original keeps them and trains on. A reducer registered with copyreg for the module's class
does it (pickle and copy consult copyreg's table before the class's ``__reduce_ex__``): the
state it hands on is the module's own, less the hooks whose owner is a spill handle and the
forward, zero_grad and _apply spill put on the instance (what was there before comes back). For any other
instance of those classes it changes nothing. The parameters' gradient hooks are never copied
or pickled by torch. What still reaches a handle (an attribute of the caller's, a class whose
own ``__getstate__`` returns something else than a dict) raises TypeError saying what to do.
"""
from __future__ import annotations

import copy
import copyreg
import threading
from typing import Any, Callable, Dict, Optional, Set

from ._steps import wrapped_previous

# Classes whose instances' hooks, when bound methods of one of them, belong to spill.
HOOK_OWNERS: Set[type] = set()

_lock = threading.Lock()
_previous: Dict[type, Optional[Callable[[Any], Any]]] = {}  # the reducer registered before


def register(cls: type) -> None:
    """Makes copies and pickles of ``cls``'s instances leave spill's hooks out (see the module
    docstring). Registered once per class, for the process; a reducer registered for the class
    before is called first, its state filtered the same way."""
    with _lock:
        if cls in _previous:
            return
        _previous[cls] = copyreg.dispatch_table.get(cls)
        copyreg.pickle(cls, _reduce)


def register_module(module: Any) -> None:
    """:func:`register` for ``module``'s class, except for a class that
    ``torch.nn.utils.parametrize`` made for this one module (``ParametrizedLinear``): copyreg's
    table would keep it, and through its properties' closures the module and its tensors,
    alive for the whole process (spill never frees them, even after ``remove()``), and copy
    does not consult the table for it anyway, since the class has a ``__deepcopy__`` that
    copies the module's ``__dict__``, spill's hooks included (then ``TypeError``: a handle
    cannot be copied). That ``__deepcopy__`` is replaced by the same copy of the
    ``__dict__`` without spill's hooks (parametrize refuses pickling such a module)."""
    cls = type(module)
    own = cls.__dict__.get("__deepcopy__")
    if own is not None and getattr(own, "__name__", "") == "default_deepcopy" and \
            cls.__module__ == "torch.nn.utils.parametrize":
        cls.__deepcopy__ = _plain_deepcopy
        return
    if own is _plain_deepcopy:
        return
    register(cls)


def _plain_deepcopy(self: Any, memo: Dict[int, Any]) -> Any:
    """parametrize's ``default_deepcopy``, with :func:`plain_state` of the ``__dict__``."""
    obj = memo.get(id(self), None)
    if obj is not None:
        return obj
    replica = self.__new__(self.__class__)
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(plain_state(self.__dict__), memo)
    for slot in copyreg._slotnames(self.__class__):  # type: ignore[attr-defined]
        if hasattr(self, slot):
            setattr(replica, slot, copy.deepcopy(getattr(self, slot), memo))
    return replica


def _reduce(obj: Any) -> Any:
    previous = _previous.get(type(obj))
    rv = previous(obj) if previous is not None else obj.__reduce_ex__(2)
    if isinstance(rv, tuple) and len(rv) > 2 and isinstance(rv[2], dict):
        state = plain_state(rv[2])
        if state is not rv[2]:
            rv = rv[:2] + (state,) + rv[3:]
    return rv


def _ours(hook: Any) -> bool:
    return type(getattr(hook, "__self__", None)) in HOOK_OWNERS


def _pinned(hook: Any) -> bool:
    return getattr(hook, "_spill_original", None) is not None


def plain_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """A module's ``__dict__`` without spill's hooks and method wrappers: ``state`` itself
    when it has none, else a new dict (the module keeps its own)."""
    changes: Dict[str, Any] = {}
    dropped: Set[Any] = set()
    for name in ("forward", "zero_grad", "_apply"):
        method = state.get(name, None)
        if method is None:
            continue
        found, previous = wrapped_previous(method)
        while found and previous is not None:  # a wrapper of ours over another of ours
            again, earlier = wrapped_previous(previous)
            if not again:
                break
            previous = earlier
        if found:
            changes[name] = previous
    for key, hooks in state.items():
        if key.endswith("hooks") and isinstance(hooks, dict) and any(
                _ours(h) or _pinned(h) for h in hooks.values()):
            kept = type(hooks)()
            for k, h in hooks.items():
                if _ours(h):
                    dropped.add(k)
                else:  # (a backward hook of the caller's, which offload runs pinned)
                    kept[k] = getattr(h, "_spill_original", None) or h
            changes[key] = kept
    if dropped:  # the flags torch 2 keeps beside its hooks (with_kwargs, always_call)
        for key, flags in state.items():
            if key not in changes and "_hooks_" in key and isinstance(flags, dict) and any(
                    k in dropped for k in flags):
                changes[key] = type(flags)((k, v) for k, v in flags.items() if k not in dropped)
    if not changes:
        return state
    clean = dict(state)
    for key, value in changes.items():
        if value is None:
            clean.pop(key, None)
        else:
            clean[key] = value
    return clean


def handle_message(model: Any) -> str:
    """Why an offload handle cannot be copied or pickled, and what to do instead."""
    return (f"spill.torch.offload's handle of a {type(model).__name__} cannot be copied or "
            "pickled (it holds spill's runtime). Copy or save the model itself: "
            "copy.deepcopy(model), pickle and torch.save(model) give a plain torch module "
            "without spill's hooks; or save model.state_dict(). Keep the handle outside the "
            "model (an attribute of the model holding it is copied with the model).")

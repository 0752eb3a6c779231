"""The model as it is now (_refresh): the parameters and buffers each module's pre-hook
pins, the weights reparametrizations compute, modules and tensors replaced since offload(),
and functional_call's tensors in place of a module's own. Mixed into OffloadHandle; the design
is in _offload.py's docstring."""
from __future__ import annotations

import importlib
import itertools
import sys
import weakref
from typing import Any, List, Optional, Set, Tuple

import torch

from spill import Error

from ._window import all_handles


class _Tracking:
    """OffloadHandle's view of the model's modules, parameters and buffers."""

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


def _data_pointers(m: torch.nn.Module) -> Tuple[int, ...]:
    """Where ``m``'s parameters and buffers live now (``p.data = new``, ``model.to()`` and
    ``model.half()`` keep the objects and change this)."""
    return tuple(t.data_ptr() if t is not None else 0
                 for t in (*m._parameters.values(), *m._buffers.values()))


def _same(old: tuple, now: Any) -> bool:
    """Whether a module's parameters (or buffers) ``now`` are the objects ``old`` holds."""
    return len(old) == len(now) and all(a is b for a, b in zip(old, now))


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

"""Gradients and the backward: the parameters' gradient hooks, the points where the autograd
engine is between nodes, the caller's backward hooks run pinned, and the backward's pins. Mixed
into OffloadHandle; the design is in _offload.py's docstring."""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ._offload_modes import _PinOps
from ._offload_pins import Token, _Read
from ._optimizer import DeclareMade
from ._pins import components, leaves
from ._state import state


class _Gradients:
    """OffloadHandle's gradient hooks and backward."""

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

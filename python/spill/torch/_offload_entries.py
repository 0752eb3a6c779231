"""Entries: a forward of the model (or of a submodule the training loop calls) that begins
while none runs. It begins the step, the first step's discovery or an evaluation, and ends or
is abandoned as a whole. Mixed into OffloadHandle; the design is in _offload.py's
docstring."""
from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from spill import Error
from spill import budget as spill_budget

from ._offload_modes import _Discovery, _EvalOps
from ._pins import leaves
from ._quiet import QuietSteps
from ._state import state
from ._steps import StepBoundaries, shapes_key, wrap_method
from ._window import _dispatch_stack, _function_stack, _insert_bottom, stray_optimizer_error, window


class _Entries:
    """OffloadHandle's entries: their beginning, end and abandonment."""

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
        self._finalizer = weakref.finalize(self, _collected, self._window, self.steps,
                                           self._policy)
        self._finalizer.atexit = False

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


def _bytes_of(args: Any) -> int:
    """The bytes of the tensors among a forward's arguments (each tensor's elements, a view's
    included: an expanded batch makes activations of its own size)."""
    return sum(t.numel() * t.element_size() for t in leaves(args)
               if isinstance(t, torch.Tensor))

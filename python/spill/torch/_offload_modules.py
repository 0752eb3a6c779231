"""Offload's module hooks: the forward pre-hook and forward hook of every module, which open
and close its frame (pinning its parameters, buffers, arguments and outputs), and the fused
fast path of PyTorch's own modules. Mixed into OffloadHandle; the design is in _offload.py's
docstring."""
from __future__ import annotations

from typing import Any, List

import torch

from . import _copies as copies
from ._fast_path import FAST_PATH_MODULES, only_torch
from ._offload_modes import _BusyLeafOps, _NewStorage, _PinOps
from ._offload_pins import _Frame
from ._offload_tracking import _functional_call_tensors
from ._pins import leaves
from ._recompute import ModuleCall
from ._state import state
from ._steps import shapes_key
from ._transforms import in_transform
from ._window import _function_stack, _insert_bottom, _remove


def _tensor_attributes(module: torch.nn.Module) -> List[torch.Tensor]:
    """The tensors ``module`` keeps as plain attributes, neither parameters nor buffers: state
    its forward carries from one step to the next (an RNN's last hidden state, ``self.prev =
    h.detach()``; a memory bank), which may be an activation an armed step declared
    swappable. Its pre-hook pins them for its call (audit 36b F2: ``h + self.prev`` read one
    on the host, a segmentation fault on the CPU bridge at 12-20 MiB of a 6-layer MLP's
    footprint). Tensors in containers on the module are not looked into."""
    return [v for v in module.__dict__.values() if type(v) is torch.Tensor]


class _ModuleHooks:
    """OffloadHandle's forward pre-hooks and forward hooks."""

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


# PyTorch's modules whose evaluation forward takes a fused fast path only while no function
# mode is on (OffloadHandle._fast_path_enter; guard's and pin_reads': _fast_path.py).
_FAST_PATH_MODULES = FAST_PATH_MODULES


_KWARGS_OK = "with_kwargs" in torch.nn.Module.register_forward_pre_hook.__code__.co_varnames

"""Activations: the saved-tensor hooks that declare and pin what autograd saves, and quiet
steps, which swap none (_quiet.py). Mixed into OffloadHandle; the design is in _offload.py's
docstring."""
from __future__ import annotations

import itertools
from typing import Any, Dict, List, Tuple

import torch

from spill import OutOfMemoryError

from . import _caller_hooks as caller_hooks
from ._offload_pins import Token, _Frame
from ._pins import Saved, TorchOutOfMemoryError, acyclic, leaves, storage
from ._state import state


class _Activations:
    """OffloadHandle's saved-tensor hooks and quiet steps."""

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

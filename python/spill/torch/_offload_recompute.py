"""Forwards a backward recomputes (activation checkpointing), as offload's hooks see them:
pinned into the recomputation's holds (_recompute.py). Mixed into OffloadHandle; the design is
in _offload.py's docstring."""
from __future__ import annotations

from typing import Any

import torch

from ._pins import leaves
from ._recompute import call_frame, in_backward, region_frame
from ._state import state


class _Recomputed:
    """OffloadHandle's recomputed forwards."""

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

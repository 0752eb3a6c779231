"""offload()'s quiet steps: when the previous step's peak of allocated bytes stayed under a
fraction of the budget (``quiet=``, one half by default), the next step runs without swapping
activations: no saved-tensor hooks, no safe points, no pins of module arguments and outputs,
no step scope (the swapper neither records nor plans it). Parameters, buffers, gradients and
optimizer state stay swappable and pinned by their hooks, so a step whose memory suddenly
grows can still move them; what it cannot move (its activations) ends in
torch.cuda.OutOfMemoryError, whose message says so (spill_set_oom_note) and how to turn the
mode off (``quiet=False``); the step after an out-of-memory error is armed.

The decision is made at a step boundary, before the root module's forward begins:
- the peak is spill's allocated bytes (resident or on the host) between two boundaries
  (spill_take_allocated_peak, apart from the peaks PyTorch's reset_peak_memory_stats
  restarts), the budget spill's budget at the boundary;
- a step whose peak passed ``quiet`` x budget arms the next one;
- hysteresis: an armed step is followed by a quiet one only when its peak was under
  ``REARMED_MARGIN`` (7/8) of that line, so a step near the line does not flip every step;
- a step whose inputs (the tensor arguments of its first forward) are larger than the
  previous step's is armed when that step's peak, its part other than parameters, buffers,
  gradients and optimizer state scaled by the inputs' ratio, passes the line: a larger batch
  makes activations in proportion, far more than its own bytes, which the previous peak
  does not show (scaled linearly: growth made inside the forward, or activations growing
  faster than the inputs, attention's with the sequence length, is the risk that remains).
The peak of allocated bytes does not depend on the mode (swapped-out bytes count as
allocated), so quiet and armed steps of the same work measure the same peak."""
from __future__ import annotations

import ctypes
import math
import numbers
import weakref
from typing import Any, Callable, Dict, List, Optional

from spill import InvalidArgumentError
from spill._errors import InvalidArgumentTypeError
from spill._capi import raise_status
from spill._lib import library

DEFAULT = 0.5
REARMED_MARGIN = 7 / 8


def fraction(value: Any) -> float:
    """The ``quiet=`` argument of offload() as a fraction of the budget (0: always armed).
    ``None`` is ``False``. A number out of range is an InvalidArgumentError (a ValueError);
    anything else, a string such as ``"0.5"`` included, an InvalidArgumentTypeError (also a
    TypeError), as for offload's other arguments of the wrong type."""
    if value is True:
        return DEFAULT
    if value is False or value is None:
        return 0.0
    what = (f"spill.torch.offload: quiet must be a fraction of the budget in [0, 1] (a step "
            f"runs without swapping activations when the previous step's peak stayed under "
            f"it), True (= {DEFAULT}), or False or None (every step swaps), got {value!r}")
    if not isinstance(value, numbers.Real):  # numpy's scalars are numbers too
        raise InvalidArgumentTypeError(what)
    f = float(value)
    if math.isfinite(f) and 0.0 <= f <= 1.0:
        return f
    raise InvalidArgumentError(what)


class _StatsHead(ctypes.Structure):
    """The start of spill_stats, as far as the fields read here (spill fills what fits)."""
    _fields_ = [("struct_size", ctypes.c_size_t), ("device", ctypes.c_int32),
                ("simulated", ctypes.c_int32), ("budget_bytes", ctypes.c_uint64),
                ("allocated_bytes", ctypes.c_uint64), ("allocated_peak_bytes", ctypes.c_uint64),
                ("requested_bytes", ctypes.c_uint64), ("reserved_bytes", ctypes.c_uint64),
                ("reserved_peak_bytes", ctypes.c_uint64), ("cached_bytes", ctypes.c_uint64),
                ("swapped_out_bytes", ctypes.c_uint64), ("host_pinned_bytes", ctypes.c_uint64),
                ("allocations", ctypes.c_uint64), ("frees", ctypes.c_uint64),
                ("cache_hits", ctypes.c_uint64), ("ooms", ctypes.c_uint64)]
    _fields_ += [(name, ctypes.c_uint64) for name in (
        "swap_out_bytes_total", "swap_in_bytes_total", "swap_outs", "swap_ins",
        "clean_evictions", "prefetches", "prefetch_hits", "demand_fetches",
        "evictions_reactive", "evictions_planned", "stale_unpins", "pinned_bytes",
        "unswappable_bytes")]


def _check(lib: Any, status: int) -> None:
    if status != 0:
        raise_status(lib, status)


EVALUATION = ("spill.torch.offload: this happened in an evaluation forward (eval mode or no "
              "grad), which keeps no activations, so nothing of its own can move out but what "
              "its ops made once they are done (a KV cache): an op's tensors with the running "
              "modules' weights did not fit. Raise the budget or use a smaller batch.")


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class _Watcher:
    __slots__ = ("peak", "__weakref__")

    def __init__(self) -> None:
        self.peak = 0


# Per device, every watcher's peak since its last take: spill keeps one interval, and two
# handles (two models) take it at their own boundaries.
_watchers: Dict[int, "weakref.WeakSet[_Watcher]"] = {}
# Per device, the out-of-memory note set now (spill keeps one per device): the note of the
# handle whose step ran last (see QuietSteps.claim).
_notes: Dict[int, str] = {}
# Per device, the handle whose step runs now and the device's out-of-memory count when it
# claimed the device: the errors since then are its own (spill counts them per device).
_claims: Dict[int, List[Any]] = {}


class QuietSteps:
    """One offload handle's decisions (see the module docstring)."""

    def __init__(self, value: Any, device: int) -> None:
        self.fraction = fraction(value)
        self.device = device
        self.quiet = False          # the current step's mode
        self.quiet_steps = 0        # steps decided so far, by mode (the first is armed)
        self.armed_steps = 0
        self.peak = 0               # the previous step's peak and the budget then
        self.budget = 0
        self.inputs = 0             # the bytes of the previous step's inputs (0: none seen)
        self.reason = ""            # why the current step is armed, when it is
        self.text = ""              # this handle's out-of-memory note ("" when armed)
        self.during = ""            # ... and while its backward runs (backward_begins)
        self.evaluating = False     # an evaluation forward runs (evaluation)
        self._lib = library()
        self.ooms = 0               # out-of-memory errors raised while this handle's step ran
        self._ooms: Optional[int] = None  # ... as of the last boundary
        self._watcher = _Watcher()
        self._ref = weakref.ref(self)
        _watchers.setdefault(device, weakref.WeakSet()).add(self._watcher)

    # ---------------------------------------------------------------- spill's figures

    def _stats(self) -> _StatsHead:
        s = _StatsHead()
        s.struct_size = ctypes.sizeof(_StatsHead)
        _check(self._lib, self._lib.spill_get_stats(self.device, ctypes.byref(s)))
        return s

    def _take_peak(self) -> int:
        value = ctypes.c_uint64(0)
        _check(self._lib, self._lib.spill_take_allocated_peak(self.device, ctypes.byref(value)))
        for w in _watchers.get(self.device, ()):
            w.peak = max(w.peak, value.value)
        peak, self._watcher.peak = self._watcher.peak, 0
        return peak

    def _settle(self) -> _StatsHead:
        """Counts the device's out-of-memory errors since the last claim as the claimant's."""
        st = self._stats()
        claim = _claims.get(self.device)
        if claim is not None:
            owner = claim[0]()
            if owner is not None:
                owner.ooms += st.ooms - claim[1]
            claim[1] = st.ooms
        return st

    def oom_since_boundary(self) -> bool:
        """Whether an allocation ran out of memory in this handle's step since the last
        boundary (the quiet step it broke was abandoned: the next forward is a boundary)."""
        self._settle()
        return self._ooms is not None and self.ooms > self._ooms

    # ---------------------------------------------------------------- decisions

    def decide(self, first: bool, inputs: int = 0,
               fixed: Optional[Callable[[], int]] = None) -> bool:
        """At a step boundary: whether the step beginning now runs quiet. ``inputs``: the
        bytes of the tensors its first forward is given; ``fixed()``: the bytes of what every
        step holds whatever its inputs (parameters, buffers, gradients, optimizer state),
        asked only when the inputs grew."""
        self.peak = self._take_peak()
        st = self._settle()
        self.budget = st.budget_bytes
        oom = self._ooms is not None and self.ooms > self._ooms
        self._ooms = self.ooms
        line = self.fraction * self.budget
        if first:
            quiet, self.reason = False, "the first step (it finds how the model uses its tensors)"
        elif not self.fraction:
            quiet, self.reason = False, "quiet=False"
        elif oom:
            quiet, self.reason = False, "the device ran out of memory during this model's last step"
        elif self.peak > line:
            quiet, self.reason = False, (f"the previous step's peak, {_mib(self.peak)}, passed "
                                         f"{self.fraction:g} of the budget")
        elif self.quiet or self.peak <= line * REARMED_MARGIN:
            quiet, self.reason = True, ""
        else:
            quiet, self.reason = False, (f"the previous step's peak, {_mib(self.peak)}, is near "
                                         f"{self.fraction:g} of the budget (hysteresis)")
        if quiet and fixed is not None and inputs > self.inputs > 0:
            kept = min(fixed(), self.peak)
            estimate = kept + (self.peak - kept) * inputs / self.inputs
            if estimate > line:
                quiet, self.reason = False, (
                    f"this step's inputs, {_mib(inputs)}, are {inputs / self.inputs:.3g} times "
                    f"the previous step's: its peak, {_mib(self.peak)}, with what is not "
                    f"parameters, gradients or optimizer state scaled as much, "
                    f"{_mib(estimate)}, passes {self.fraction:g} of the budget")
        self.inputs = inputs
        return quiet

    @property
    def line(self) -> int:
        """The bytes under which a step's peak lets the next one run quiet."""
        return int(self.fraction * self.budget)

    def begin(self, quiet: bool) -> None:
        """The step beginning now runs ``quiet`` (as decided, or armed when the handle could
        not make the switch)."""
        self.quiet = quiet
        if quiet:
            self.quiet_steps += 1
        else:
            self.armed_steps += 1
            if not self.reason:
                self.reason = "an activation of an armed step could not come back"
        self.text = self.message() if quiet else ""
        self.claim()

    def claim(self) -> None:
        """This handle's step runs now (its forward, its backward, its optimizer step begins):
        the device's out-of-memory messages carry its note, the quiet explanation, or none
        when it runs armed. Two models trained on one device take turns: an out-of-memory
        error is explained by the step that raised it, not by the other model's, and arms
        that model's next step only."""
        claim = _claims.get(self.device)
        if claim is None or claim[0]() is not self:
            st = self._settle()
            _claims[self.device] = [self._ref, st.ooms]
        note = EVALUATION if self.evaluating else f"{self.text} {self.during}".strip()
        if _notes.get(self.device, "") != note:
            _check(self._lib, self._lib.spill_set_oom_note(self.device, note.encode()))
            _notes[self.device] = note

    def backward_begins(self) -> None:
        """This handle's backward begins (its output's gradient arrived): until it ends, an
        out-of-memory message says which of the bytes it calls never declared swappable were
        so before (spill's count of them now) and what the rest is. The autograd engine runs
        each node with no hook inside: the gradients a node has received and made are in its
        hands, undeclared, until it hands them on (offload declares at points between nodes),
        which a breakdown alone would show as a declaration spill.torch forgot."""
        st = self._stats()
        self.during = (
            f"spill.torch.offload: this happened in a backward. Of what this message calls "
            f"never declared swappable, {_mib(st.unswappable_bytes)} was so when the backward "
            f"began (tensors no hook declares, such as those the training loop's own code "
            f"keeps: made under spill.torch.guard(), they can move); the rest is what the "
            f"backward made since and the autograd engine has not handed on: the gradients the "
            f"running node received and is making, gradients waiting in a node's buffer for "
            f"its other parts, a checkpointed region's recomputation. That is the backward's "
            f"working set, which no hook can declare: raise the budget or use a smaller "
            f"batch.")
        self.claim()

    def evaluation(self, on: bool) -> None:
        """An evaluation forward of this handle begins (True) or has ended (False): its
        out-of-memory messages say what it holds, not the quiet step's explanation (an
        evaluation forward keeps no activations to swap, quiet or armed; before, they advised
        quiet=False, which changed nothing)."""
        if self.evaluating != on:
            self.evaluating = on
            self.claim()

    def oom_note(self) -> str:
        """What a pin's out-of-memory error in this handle's step adds (the note)."""
        return EVALUATION if self.evaluating else self.message()

    def backward_ends(self) -> None:
        """This handle's backward ended (returned or raised), or its next step began."""
        if self.during:
            self.during = ""
            self.claim()

    def message(self) -> str:
        return (f"spill.torch.offload ran this step quiet, without swapping activations: the "
                f"previous step's peak, {_mib(self.peak)}, was under {self.fraction:g} of the "
                f"budget, {_mib(self.budget)}. The next step swaps them again; to swap them in "
                f"every step, pass quiet=False to spill.torch.offload().")

    def forget(self) -> None:
        """The handle is removed: its note goes (another handle's stays)."""
        mine = _notes.get(self.device) == f"{self.text} {self.during}".strip() != ""
        self.text = self.during = ""
        if mine:
            self.claim()

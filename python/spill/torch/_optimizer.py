"""The offload hooks' optimizer step after the first, when nothing forces swapping: the
tensors of the step (every parameter, its gradient and its optimizer state) pinned around the
unchanged step, a few C calls per tensor, instead of the pin-every-op dispatch mode (tens of
microseconds of Python per aten op).

That is done when the step's movable tensors fit in a quarter of the budget (so pinning them
all leaves room for the update's temporaries and everything else) and the optimizer is one of
torch.optim's per-parameter optimizers (SGD, Adam, AdamW, ...), which touch nothing else: the
step runs as it would without spill, so results are bit-identical. Otherwise (budget pressure,
another optimizer, or a step with a closure, which runs the model again) the step runs under
the dispatch mode, which pins each op's tensors around the op (one parameter's tensors at a
time). Pinning parameters in chunks under pressure was tried: the planned steps then had more
demand fetches than with the dispatch mode (docs/BENCHMARKS.md)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ._guard import PinEveryOp
from ._pins import Pinner, components, leaves
from ._state import state

Token = Any  # spill._capi.PinToken

_NAMES = ("SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "ASGD", "NAdam", "RAdam",
          "RMSprop", "Rprop")
# Exact types: a subclass may override step() with work on other tensors.
PER_PARAMETER = frozenset(getattr(torch.optim, n) for n in _NAMES if hasattr(torch.optim, n))


def step_blocks(optimizer: torch.optim.Optimizer, pinner: Pinner,
                limit: int) -> Optional[List[Tuple[int, bool]]]:
    """(block pointer, written by the step) of every movable tensor the step touches, or None
    when they hold more than ``limit`` bytes."""
    blocks: List[Tuple[int, bool]] = []
    seen = set()
    total = 0
    state = optimizer.state
    for group in optimizer.param_groups:
        # The fused kernels (CUDA) may unscale gradients in place; the per-parameter loop
        # only reads them.
        grad_written = bool(group.get("fused"))
        for p in group["params"]:
            tensors = [(p, True)]
            if p.grad is not None:
                tensors.append((p.grad, grad_written))
            st = state.get(p)
            if st:
                tensors += [(v, True) for v in st.values() if isinstance(v, torch.Tensor)]
            for t, wrote in tensors:
                # (a sparse gradient or state tensor: its indices and values)
                tensors += [(c, wrote) for c in components(t)]
                ptr, nbytes = pinner.block(t)
                if ptr and ptr not in seen:
                    seen.add(ptr)
                    blocks.append((ptr, wrote))
                    total += nbytes
                    if total > limit:
                        return None
    return blocks


def pinned_step(optimizer: Optional[torch.optim.Optimizer], pinner: Pinner, limit: int,
                original: Callable[..., Any], args: Any, kwargs: Any) -> Tuple[bool, Any]:
    """Runs ``original(*args, **kwargs)`` (the optimizer's step) with all its tensors pinned
    when that is allowed (see the module docstring): (True, its result); else (False, None)
    and nothing ran."""
    if type(optimizer) not in PER_PARAMETER:
        return False, None
    if kwargs.get("closure", args[0] if args else None) is not None:
        return False, None
    blocks = step_blocks(optimizer, pinner, limit)
    if blocks is None:
        return False, None
    stream = pinner.stream()
    held: List[Tuple[Token, bool]] = []
    try:
        for ptr, wrote in blocks:
            token = pinner.pin(ptr, stream)
            if token is not None:
                held.append((token, wrote))
        return True, original(*args, **kwargs)
    finally:
        for token, wrote in held:
            pinner.unpin(token, stream, wrote)


def per_parameter_loop(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """For spill's run of the optimizer's step: sets its per-parameter loop (``foreach``
    False in every param group that has the key, so that no op takes every parameter's
    tensors at once) and returns what puts the caller's values back, called when the step
    ends, also by an exception: ``param_groups`` and ``state_dict()`` (a checkpoint loaded
    into a plain optimizer) show the caller's setting outside the step."""
    changed = []
    for group in optimizer.param_groups:
        if "foreach" in group and group["foreach"] is not False:
            changed.append((group, group["foreach"]))
            group["foreach"] = False

    def restore() -> None:
        for group, value in changed:
            group["foreach"] = value
    return restore


_makes: Dict[Any, bool] = {}


def _fresh_outputs(func: Any) -> bool:
    """Whether every output of ``func`` is a new tensor (no view, no argument written in
    place: its schema's returns carry no alias annotation)."""
    found = _makes.get(func)
    if found is None:
        returns = func._schema.returns
        found = _makes[func] = bool(returns) and all(r.alias_info is None for r in returns)
    return found


class DeclareMade(PinEveryOp):
    """The mode :func:`load_state` runs ``load_state_dict`` under: every op's tensors pinned
    around the op (as in the window), and what an op makes (an output that is a new tensor)
    declared swappable as soon as the op returns. So the state the optimizer copies from a
    checkpoint (torch 1.13 deep-copies all of it before using any; torch 2 copies each tensor
    with ``.to()``) can move as it is made, instead of all of it staying resident until the
    next step ends; the checkpoint's own tensors, which the ops only read, are left as the
    caller has them."""

    declares = False  # (the base class then pins only)
    # True while an optimizer step runs inside it (SAM's second_step calls its base
    # optimizer's step(), which has pins of its own): ops pass through.
    suspended = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.suspended:
            return func(*args, **(kwargs or {}))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if _fresh_outputs(func) and not state.forked_child:
            pinner = self.pinner
            for t in leaves(out):
                ptr = pinner.movable(t)
                if ptr:
                    pinner.declare(ptr)
        return out


def load_state(pinner: Pinner, original: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Runs ``original(*args, **kwargs)`` (the optimizer's ``load_state_dict``) under
    :class:`DeclareMade`."""
    with DeclareMade(pinner):
        return original(*args, **kwargs)

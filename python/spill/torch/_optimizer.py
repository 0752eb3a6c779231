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
time in the per-parameter loop). Pinning parameters in chunks under pressure was tried: the
planned steps then had more demand fetches than with the dispatch mode (docs/BENCHMARKS.md).

The step runs the implementation plain torch runs (the caller's ``foreach``/``fused`` or
torch's default: on CUDA since torch 2.0 the foreach kernels, which round otherwise than the
per-parameter loop), so its results are plain torch's bits on every device. A group that runs
ops over lists of its tensors is cut into chunks of parameters for spill's run of the step
(:func:`chunked_groups`), so that the foreach ops' temporaries (as large as the state they are
made from) are one chunk's. Left whole, each foreach op of the step would run in chunks under
the dispatch mode (_foreach.py), but the temporaries of every parameter would then live
between ops and be swapped: on the CPU bridge (2-core build machine, 2026-12-04, shared with
other builds) an Adam(foreach=True) over eight 1024-wide layers, 8 steps at a third of the
footprint, moved 2380 MiB out and 2598 MiB in with 177 demand fetches, against 1588 out,
1394 in and 104 with the chunked groups (the per-parameter loop: 1488, 1446 and 115)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.optim import optimizer as torch_optimizer  # (torch 1.13 dels the attribute)

from ._guard import PinEveryOp
from ._pins import Pinner, components, leaves
from ._state import state, torch_version

Token = Any  # spill._capi.PinToken

_NAMES = ("SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "ASGD", "NAdam", "RAdam",
          "RMSprop", "Rprop")
# Exact types: a subclass may override step() with work on other tensors.
PER_PARAMETER = frozenset(getattr(torch.optim, n) for n in _NAMES if hasattr(torch.optim, n))


def param_step_tensors(state: Dict[Any, Any], p: torch.Tensor,
                       grad_written: bool = False) -> List[Tuple[torch.Tensor, bool]]:
    """(tensor, written by the step) of what a per-parameter optimizer's step touches for
    parameter ``p``: the parameter, its gradient, its state's tensors (``state``: the
    optimizer's), and the indices and values of a sparse one."""
    tensors = [(p, True)]
    if p.grad is not None:
        tensors.append((p.grad, grad_written))
    st = state.get(p)
    if st:
        tensors += [(v, True) for v in st.values() if isinstance(v, torch.Tensor)]
    for t, wrote in tensors:
        tensors += [(c, wrote) for c in components(t)]  # (strided: none of their own)
    return tensors


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
            for t, wrote in param_step_tensors(state, p, grad_written):
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


TORCH2 = torch_version() >= (2, 0)


def _listwise_group(group: Dict[str, Any]) -> bool:
    """Whether the optimizer runs this param group with ops over lists of its tensors (the
    foreach or fused implementation): set by the caller, or torch 2's default (foreach for
    CUDA parameters; torch 1.13 defaults to the per-parameter loop)."""
    if group.get("fused"):
        return True
    foreach = group.get("foreach", False)
    if foreach is None:
        return TORCH2 and all(p.is_cuda for p in group["params"])
    return bool(foreach)


# torch 2's step hooks: the optimizer's own, and every optimizer's (torch.optim.optimizer's).
_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
GLOBAL_HOOKS = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")


def _step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether step pre or post hooks (torch 2), which may read ``param_groups``, run around
    the step."""
    return any(getattr(optimizer, name, None) for name in _HOOKS) or any(
        getattr(torch_optimizer, name, None) for name in GLOBAL_HOOKS)


def chunked_groups(optimizer: torch.optim.Optimizer, pinner: Pinner,
                   limit: int) -> Callable[[], None]:
    """For spill's run of the step of a torch.optim per-parameter optimizer whose groups run
    the foreach or fused implementation (the caller's setting or torch's default, as plain
    torch runs it): while the step runs, ``param_groups`` is each such group cut into groups
    of consecutive parameters whose step tensors (parameter, gradient, state) hold at most
    ``limit`` bytes (at least one parameter each), copies of the caller's group otherwise.
    The step then runs its foreach ops over one chunk at a time, so their temporaries
    (Adam's square roots, as large as its state) are a chunk's, as the per-parameter loop's
    are a parameter's; the results are plain torch's bits, since each index of a foreach op
    depends only on that index's tensors. Returns what puts the caller's groups back (called
    when the step ends, also by an exception), with any other key the step set in a chunk's
    group. Nothing changes for another optimizer (LBFGS keeps its own step), with step hooks
    (they would see the chunks), or when every group fits whole."""
    if type(optimizer) not in PER_PARAMETER or _step_hooks(optimizer):
        return lambda: None
    groups = optimizer.param_groups
    state = optimizer.state
    cut: List[Dict[str, Any]] = []
    made: List[Tuple[Dict[str, Any], Dict[str, Any]]] = []
    for group in groups:
        if not _listwise_group(group):
            cut.append(group)
            continue
        bounds: List[List[Any]] = [[]]
        held = 0
        for p in group["params"]:
            size = sum(pinner.block(t)[1] for t, _ in param_step_tensors(state, p))
            if not state.get(p):
                size += 2 * pinner.block(p)[1]  # the state the first step makes (Adam's)
            if bounds[-1] and size and held + size > limit:
                bounds.append([])
                held = 0
            bounds[-1].append(p)
            held += size
        if len(bounds) == 1:
            cut.append(group)
            continue
        for params in bounds:
            part = dict(group)
            part["params"] = params
            cut.append(part)
            made.append((group, part))
    if not made:
        return lambda: None
    optimizer.param_groups = cut

    def restore() -> None:
        optimizer.param_groups = groups
        for group, part in made:
            for key, value in part.items():
                if key != "params" and group.get(key, part) is not value:
                    group[key] = value
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

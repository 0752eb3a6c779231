"""Ops that take lists of tensors and treat each index on its own: torch's foreach ops
(``torch._foreach_norm`` and ``_foreach_mul_``: what ``clip_grad_norm_`` runs on a GPU since
torch 2.0, and the ``foreach`` optimizers), the fused optimizers' kernels (``_fused_adam_``,
``fused=True``) and GradScaler's ``unscale_`` (``_amp_foreach_non_finite_check_and_unscale_``).

Under the pin-every-op dispatch modes (guard, offload's window, offload's optimizer step under
pressure) such an op would pin every tensor of its lists at once: every gradient, to clip or
unscale them, which at a tight budget cannot all be resident. When the movable bytes of its
lists exceed a limit, the mode runs the op in chunks of consecutive indices instead, each
chunk's bytes within the limit (at least one index per chunk). Index i of each list goes with
index i of the others; arguments that are not per-index lists (a scalar, GradScaler's
``found_inf`` and ``inv_scale``, a fused step's ``lr``, a list of another length such as the
empty ``max_exp_avg_sqs`` without amsgrad) go whole to every chunk. The results are the one
call's: each index's result depends only on that index's tensors (on the CPU, torch 1.13 runs
one kernel per index; on CUDA, multi_tensor_apply cuts each tensor into chunks of its own), and
what the ops share (``found_inf``) is only ever set, never cleared.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

_LISTWISE_NAME = re.compile(r"aten::(_foreach_\w+|_amp_foreach_\w+|_fused_(adam|adamw|sgd|adagrad)_?)")


class Listwise:
    """How one op's arguments split: the schema positions and names of its list arguments and
    whether it returns lists (one or several) or nothing."""
    __slots__ = ("lists", "returns")

    def __init__(self, lists: List[Tuple[int, str, bool]], returns: int) -> None:
        self.lists = lists      # (position, name, keyword-only) of each list argument
        self.returns = returns  # how many List[Tensor] it returns (0: nothing)


_known: Dict[Any, Optional[Listwise]] = {}


def listwise(func: Any) -> Optional[Listwise]:
    """The split of ``func`` (an aten OpOverload) when it is a per-index list op, else None
    (cached: the dispatch modes ask for every op)."""
    try:
        return _known[func]
    except KeyError:
        pass
    found = None
    schema = func._schema
    if _LISTWISE_NAME.fullmatch(schema.name):
        args = schema.arguments
        returns = [str(r.type) for r in schema.returns]
        if args and str(args[0].type) == "List[Tensor]" and \
                all(r == "List[Tensor]" for r in returns):
            # A 1-D tensor of one scalar per index (``_foreach_addcdiv_.Tensor``'s
            # ``scalars``) splits too; another tensor (``_foreach_mul_.Tensor``'s factor) is one
            # value for every index.
            lists = [(i, a.name, a.kwarg_only) for i, a in enumerate(args)
                     if str(a.type).startswith("List[")
                     or (a.name == "scalars" and str(a.type) == "Tensor")]
            found = Listwise(lists, len(returns))
    _known[func] = found
    return found


def chunks(split: Listwise, args: Sequence[Any], kwargs: Dict[str, Any],
           block: Callable[[Any], Tuple[int, int]], limit: int
           ) -> Optional[List[Tuple[Tuple[Any, ...], Dict[str, Any]]]]:
    """The (args, kwargs) of each chunk when the movable bytes of the op's lists exceed
    ``limit`` (``block(t)`` gives a tensor's (block pointer, bytes), (0, 0) when it never
    moves), else None: run the op as called."""
    values = []
    for position, name, kwarg_only in split.lists:
        if not kwarg_only and position < len(args):
            values.append((position, None, args[position]))
        elif name in kwargs:
            values.append((None, name, kwargs[name]))
    n = len(values[0][2]) if values else 0
    if n < 2:
        return None
    per_index = [v for v in values if _length(v[2]) == n]
    sizes = [0] * n
    seen = set()
    for _, _, value in per_index:
        if not isinstance(value, (list, tuple)):
            continue  # a tensor of scalars
        for i, t in enumerate(value):
            ptr, nbytes = block(t)
            if ptr and ptr not in seen:
                seen.add(ptr)
                sizes[i] += nbytes
    if sum(sizes) <= limit:
        return None
    bounds = []
    start, held = 0, 0
    for i, size in enumerate(sizes):
        if i > start and held + size > limit:
            bounds.append((start, i))
            start, held = i, 0
        held += size
    bounds.append((start, n))
    out = []
    for lo, hi in bounds:
        a, k = list(args), dict(kwargs)
        for position, name, value in per_index:
            if position is not None:
                a[position] = value[lo:hi]
            else:
                k[name] = value[lo:hi]
        out.append((tuple(a), k))
    return out


def _length(value: Any) -> int:
    """How many indices a list argument has (-1: none, it goes whole to every chunk)."""
    if isinstance(value, (list, tuple)):
        return len(value)
    if getattr(value, "dim", None) is not None and value.dim() == 1:
        return value.shape[0]
    return -1


def joined(split: Listwise, results: List[Any]) -> Any:
    """The one call's result from its chunks' results, in order."""
    if split.returns == 0:
        return None
    if split.returns == 1:
        return [t for r in results for t in r]
    return tuple([t for r in results for t in r[j]] for j in range(split.returns))

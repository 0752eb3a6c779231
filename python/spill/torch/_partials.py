"""Partial gradients: a step whose forwards reach a parameter along more than one edge of
autograd's graphs, because the model is called twice before one backward (siamese and
contrastive losses, consistency regularisation, a discriminator on real and fake).

Autograd then makes the parameter's gradient in parts. The first part to arrive waits in the
input buffer of the parameter's AccumulateGrad node until the last one is added to it, and
each graph's nodes run in turn (later nodes first), so it waits for as long as a whole
graph's backward: a gradient's size per parameter, resident and never declared, which at a
third of the footprint leaves no room for that backward. Here the nodes that send those parts
get a post hook: the first part is declared swappable when it leaves its node, and pinned
when the next part is added to it (right after the next sender's hook, in place or not) and
when AccumulateGrad reads it (the parameter's gradient hook). Each pin lasts until the
handle's next point between nodes.

Examined only from a step's second entry on (offload's entries: the root's forward or a
submodule the training loop calls), each time from the outputs of all the step's entries (one
entry per step costs a weak reference to its outputs). Parameters reached along one edge get
no hook. The hooked nodes are kept (so that a node is hooked once) until the backward or the
step is over, also when the backward raised (the window's Tensor.backward)."""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

from ._pins import Pinner, leaves

Token = Any


class PartialGradients:
    """The graphs of one step's entries and the first parts waiting in autograd's buffers.
    ``persistent``: the storage pointers of the parameters that can move; ``pending``: where
    a pin goes to be released at the next point between nodes (the handle's list)."""

    def __init__(self, pinner: Pinner, persistent: Set[int],
                 pending: Callable[[Token, bool], None]) -> None:
        self.pinner = pinner
        self.persistent = persistent
        self.pending = pending
        # The outputs of the step's entries so far, weakly (a graph goes with the caller's
        # last reference to it, also when its backward raised): None before the first one.
        self.outputs: Optional[List[Any]] = None
        self.hooked: Dict[Tuple[int, int], Any] = {}  # (node id, index) -> node
        self.waiting: Dict[int, int] = {}  # parameter -> block of its first part

    def entry_ended(self, output: Any) -> None:
        """An armed step's entry returned ``output``."""
        refs = [weakref.ref(t) for t in leaves(output)
                if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        if self.outputs is None:  # the step's first entry: examined if another one follows
            self.outputs = refs
            return
        self.outputs += refs
        roots = [t.grad_fn for t in (r() for r in self.outputs) if t is not None]
        visited: Dict[int, Any] = {}  # (the node too: a node's Python object may be made
        # afresh at each access, and a collected one's id reused)
        edges: Dict[int, List[Tuple[Any, int]]] = {}
        movable = self.pinner.movable
        while roots:
            node = roots.pop()
            if id(node) in visited:
                continue
            visited[id(node)] = node
            for i, (nxt, _) in enumerate(node.next_functions):
                if nxt is None:
                    continue
                variable = getattr(nxt, "variable", None)  # an AccumulateGrad node's leaf
                if variable is None:
                    roots.append(nxt)
                    continue
                ptr = movable(variable)
                if ptr and ptr in self.persistent:
                    edges.setdefault(ptr, []).append((node, i))
        for ptr, found in edges.items():
            if len(found) > 1:
                for node, i in found:
                    if (id(node), i) not in self.hooked:  # (kept alive there: ids stay unique)
                        node.register_hook(self._sender(ptr, i))
                        self.hooked[(id(node), i)] = node

    def _sender(self, param: int, index: int) -> Any:
        def hook(grad_inputs: Any, grad_outputs: Any) -> None:
            held = self.waiting.get(param)
            if held is None:  # the first part: next used when the next one is added to it
                ptr = self.pinner.movable(grad_inputs[index])
                if ptr:
                    self.pinner.declare(ptr)
                    self.waiting[param] = ptr
                return
            token = self.pinner.pin(held, self.pinner.stream())
            if token is not None:
                self.pending(token, True)
        return hook

    def accumulating(self, param: int, grad: torch.Tensor) -> None:
        """The parameter's gradient hook (AccumulateGrad is about to read ``grad``): the
        first part, when the others were added to it in place, is pinned for that read."""
        held = self.waiting.pop(param, 0)
        if held and held == self.pinner.movable(grad):
            token = self.pinner.pin(held, self.pinner.stream())
            if token is not None:
                self.pending(token, False)

    def forget(self) -> None:
        """The step (or the backward) is over: a later forward begins new graphs."""
        self.outputs = None
        self.hooked.clear()
        self.waiting.clear()

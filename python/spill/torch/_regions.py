"""The backward of a busy module without children (nn.LSTM, nn.GRU on the CPU: every layer and
time step in one call) runs as its forward does: every op pinned, what it makes declared.

Such a module's backward is hundreds of autograd nodes between its output and its inputs with
no module hook among them, and the gradients they make can wait there for long: nn.LSTM
projects the whole sequence's input at once and unbinds it into the time steps, so the
gradient of each step's gates (a batch of 128, 2048 gates: 1 MiB) waits in UnbindBackward's
input buffer until the last time step's arrives, then all are stacked (32 MiB, and the stack
another 32). Made outside every dispatch mode, none was declared: the second step's backward
ran out of memory with 36 MiB "never declared swappable".

When such a module's armed forward returns, its graph is walked from its outputs back to its
arguments' nodes (the region: its own nodes and its parameters' AccumulateGrad), and each of
its nodes gets a pre hook that pushes a pin-every-op mode declaring what ops make (_optimizer.
DeclareMade). The engine restores the thread's dispatch modes around each node it runs
(engine.cpp: a ThreadLocalStateGuard per node task), so the mode covers that node's ops, its
post hooks and the accumulation of its results into the next nodes' buffers, and is gone for
the next node. At a parameter's AccumulateGrad, the parameter's own tensor hooks (offload's
and the caller's, which pin their own ops) run inside the mode on torch 1.13, but before the
node's pre hooks, so outside it, on torch 2 (engine.cpp runs tensor pre hooks first since 2.0):
a gradient a caller's hook makes there is declared at the next point between nodes instead
(audit 43t F2; reasoned from the source, not run on torch 2). A region node's post hook is a point between nodes (the handle drops its
backward's pins) and makes what it sends out of the region (the module's input gradient, a
gradient for one of its output nodes, which code outside adds to) unswappable again: code
outside runs without the mode. Not covered: a tensor of the module's kept as an attribute
that code outside the module uses in the graph (an edge into the region that the walk does
not see); a backward that makes a graph (create_graph) runs the region without the mode."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Set

import torch

from ._optimizer import DeclareMade
from ._pins import Pinner, components, leaves
from ._state import state
from ._window import _dispatch_stack


class BackwardRegions:
    """Hooks the backward regions of busy modules without children. ``persistent``: the
    storage pointers of the parameters and buffers that can move; ``safe_point``: called
    between nodes (the handle drops its backward's pins)."""

    def __init__(self, pinner: Pinner, persistent: Set[int],
                 safe_point: Callable[[], None]) -> None:
        self.pinner = pinner
        self.persistent = persistent
        self.safe_point = safe_point
        self.mode = DeclareMade(pinner)
        # Pushed without __enter__, whose bookkeeping (torch 2) expects an __exit__.
        self._push = _dispatch_stack()[1]
        self.nodes = 0  # the regions' nodes so far (tests, docs)
        # The parameters' AccumulateGrad nodes outlive the step (the next forward's graph
        # takes the same node): hooked once, held (so their ids stay theirs) with the handles
        # that remove() removes. Hooked again each step, they had k hooks at step k: the mode
        # pushed k times around each gradient's accumulation, its pins nested k deep (a
        # two-layer GRU's steps each recorded four accesses more than the last, so none
        # followed its plan, and its hooks' cost grew without end).
        self._accumulators: Dict[int, Any] = {}
        self._handles: List[Any] = []

    def module_ended(self, output: Any, argument_nodes: Sequence[Any]) -> None:
        """A busy module without children returned ``output`` in an armed training forward;
        ``argument_nodes``: the grad_fn of each of its tensor arguments (outside the region)."""
        roots = [t.grad_fn for t in leaves(output)
                 if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        if not roots:
            return
        # Known by id() and so held, as the region's nodes are: a node object not held may be
        # collected and its id reused by the next one made (an AccumulateGrad of a bias too
        # small to move was taken for outside, dropped, and the next node given its id was
        # skipped as outside with all it reaches: the region of a two-layer GRU had 463 of its
        # 918 nodes, and the engine added gradients of unhooked ones unpinned).
        outside: Dict[int, Any] = {id(n): n for n in argument_nodes}
        entries = {id(n) for n in roots}
        movable, persistent = self.pinner.movable, self.persistent
        region: Dict[int, Any] = {}  # (holding the nodes: a Python node object may be made
        # afresh at each access once none is alive, and a collected one's id reused)
        stack = list(roots)
        while stack:
            node = stack.pop()
            key = id(node)
            if key in region or key in outside:
                continue
            variable = getattr(node, "variable", None)
            if variable is not None:  # AccumulateGrad: the module's parameters' only
                if movable(variable) in persistent:
                    region[key] = node
                else:
                    outside[key] = node
                continue
            region[key] = node
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
        enter = self._enter
        for key, node in region.items():
            if key in self._accumulators:
                continue
            out = [j for j, (nxt, _) in enumerate(node.next_functions)
                   if nxt is not None and (id(nxt) not in region or id(nxt) in entries)]
            pre, post = node.register_prehook(enter), node.register_hook(self._leave(out))
            if getattr(node, "variable", None) is not None:
                self._accumulators[key] = node
                self._handles += [pre, post]
        self.nodes += len(region)

    def remove(self) -> None:
        """Removes the hooks of the nodes that outlive a step (the parameters'
        AccumulateGrad); the others go with their graphs."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._accumulators.clear()

    def _enter(self, grad_outputs: Any) -> None:
        # A backward that makes a graph (create_graph) records these ops: left as they are.
        if not torch.is_grad_enabled() and not state.forked_child:
            self._push(self.mode)  # (popped by the engine after the node: see above)

    def _leave(self, out: List[int]) -> Any:
        pinner, persistent = self.pinner, self.persistent

        def hook(grad_inputs: Any, grad_outputs: Any) -> None:
            self.safe_point()
            for j in out:
                g = grad_inputs[j]
                for t in (g,) + components(g):
                    ptr = pinner.movable(t)
                    if ptr and ptr not in persistent:
                        pinner.declare(ptr, False)
        return hook

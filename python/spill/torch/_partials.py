"""Partial gradients: a step whose graphs reach a node of autograd along more than one edge,
where a gradient waits in parts. Three cases make such graphs, and they are examined only there:
the model called twice before one backward (siamese and contrastive losses, consistency
regularisation, a discriminator on real and fake), from the step's second entry on and again
when the backward begins (an entry's output may be gone by then, its graph alive in a loss); a
gradient penalty (``torch.autograd.grad(out.sum(), x, create_graph=True)``, then
``loss.backward()`` through both graphs), when that call returns (the window's); and a
parameter one forward uses several times (a recurrent layer's weights, used at every time
step; an LM head tied to the embedding), looked for (parameters' nodes only) when the first
armed step's forward returns and, where one was found, when each step's first entry returns.
One more wait is handled the same way, with one edge: a graph made from autograd.grad's
results (second-order MAML's adapted weights ``p - lr * g``) sends its part to a result's
node, where it waits until the backward reaches that graph, made earlier (autograd runs the
nodes made last first): a gradient's size per weight, for the whole of the later graph's
backward (4 MiB of 11 never declared in MAML's outer backward at 13.4 MiB).

The first part to arrive at a node reached along several edges waits in the node's input
buffer until the last one is added to it, and each graph's nodes run in turn (the penalty's
double-backward graph, made later, first), so it waits for as long as a whole graph's
backward: for a parameter, a gradient's size, resident and never declared, which at a third
of the footprint leaves no room for that backward. The receiving node is the parameter's
AccumulateGrad node (the model called twice), or a node of the forward's graph (a penalty on
a Linear sends the weight's part through the forward's ``t()`` node; on a ReLU, zeros to its
output's node). The node sending each part gets a post hook: the first part is declared
swappable when it leaves its node, if that node made it (its storage is none of the node's
inputs' and none of its other outputs', so nothing else holds it; a sender that is a pure
view of its one input, ``t()``, hands on what the node before it made: that one is hooked
instead). A later part, and the receiving node's pre hook, make it unswappable again (back
first if it is on the host) before the engine adds to it or reads it: from there it is an
ordinary gradient, which may flow on through views and pass-through nodes unpinned. A
sender's hook finds the receiving input as last examined (route): a later graph may add an
edge into a view node looked through before (a second ``autograd.grad`` over the first one's
graph), which then is a receiver of its own. The
senders' post hooks are also points between nodes, where the handle drops its backward's pins
(the double-backward graph has no module hooks).

Examined each time from the outputs of all the step's entries and penalty graphs so far (one
entry per step costs a weak reference to its outputs). What was found is forgotten when the
backward or the step is over, also when the backward raised (the window's Tensor.backward).

A node is known by a serial number kept in its metadata, which lives with the C++ node, and is
hooked once for its life: a node outlives a forget() where several graphs share it (a
parameter's AccumulateGrad node, while any graph that reaches the parameter lives; a graph
kept for a later backward, autograd.grad's with create_graph). Before, nodes were known by
the ``id()`` of their Python object, which is made afresh once none is alive, and a
collected one's id is reused: a hook an AccumulateGrad node kept from an earlier step fired
for whichever receiver had its old id now, and took that receiver's first part for gone
(a later part was then declared while the engine added to the first one: a segmentation
fault on the CPU bridge, in second-order MAML at a half, depending on when Python's
collector ran)."""
from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

from ._pins import Pinner, leaves

Key = Tuple[int, int]  # (serial of the receiving node, its input)
Edge = Tuple[Any, int]  # (sending node, its output)

_serials = itertools.count(1)  # node serials (_serial) and PartialGradients' own


def _serial(node: Any) -> int:
    """The node's serial number: kept in its metadata (with the C++ node), never reused."""
    meta = node.metadata
    serial = meta.get("spill_serial")
    if serial is None:
        serial = meta["spill_serial"] = next(_serials)
    return serial


def _first_hook(node: Any, what: Tuple[Any, ...]) -> bool:
    """Whether ``what`` (a hook of one PartialGradients) is not on ``node`` yet; notes it."""
    hooks = node.metadata.setdefault("spill_partials", set())
    if what in hooks:
        return False
    hooks.add(what)
    return True


# Backward nodes whose one output is a view of their one input (they read no bytes).
_VIEWS = frozenset({"TBackward0", "TransposeBackward0", "PermuteBackward0", "UnsqueezeBackward0",
                    "SqueezeBackward0", "SqueezeBackward1", "AliasBackward0"})


class PartialGradients:
    """The graphs of one step's entries (and penalty graphs) and the first parts waiting in
    autograd's buffers. ``persistent``: the storage pointers of the parameters and buffers
    that can move (never declared or undeclared here); ``safe_point``: called between nodes
    (the handle drops its backward's pins)."""

    def __init__(self, pinner: Pinner, persistent: Set[int],
                 safe_point: Callable[[], None]) -> None:
        self.pinner = pinner
        self.persistent = persistent
        self.safe_point = safe_point
        self.serial = next(_serials)  # (its hooks' mark in a node's metadata)
        # The outputs of the step's entries so far, weakly (a graph goes with the caller's
        # last reference to it, also when its backward raised): None before the first one.
        self.outputs: Optional[List[Any]] = None
        self.entries = 0  # the step's entries since the last forget()
        # (sender serial, output) -> the receiver's input its part goes to, as last examined:
        # a view node reached along one edge is looked through (see _examine), and a later
        # graph may add an edge into it, which makes it a receiver of its own.
        self.route: Dict[Key, Key] = {}
        self.keys: Dict[int, List[Key]] = {}  # receiver serial -> its inputs reached twice
        self.arrived: Dict[Key, int] = {}   # a part arrived: the block declared (0: none)
        # Whether one entry's graph reaches a parameter along several edges (an LM head tied
        # to the embedding, a recurrent layer's weights used at every time step): None until
        # the first step's graph was examined. Without, one-entry steps are not examined.
        self.tied: Optional[bool] = None
        # autograd.grad(create_graph=True)'s results, weakly: a later graph made from them
        # (MAML's adapted weights) sends its part to their nodes, where it waits until that
        # backward reaches their graph, made earlier (autograd runs the nodes made last first).
        self.results: Optional[List[Any]] = None

    def entry_ended(self, output: Any) -> None:
        """An armed step's entry returned ``output``."""
        refs = _refs(output)
        self.entries += 1
        if self.outputs is None:  # the step's first entry: examined if another one follows
            self.outputs = refs
            if self.tied is not False:
                found = self._examine(parameters_only=True)
                if self.tied is None:
                    self.tied = found
            return
        self.outputs += refs
        self._examine()

    def backward_begins(self, roots: Any) -> None:
        """A backward from ``roots`` begins after several entries: examined from there too. An
        entry's output often goes before the next entry ends, while its graph lives on in a
        loss made from it (``loss = f(m(x)) + f(m(x2))``: ``m(x)``'s output is freed when
        ``f`` returns), and then that entry's graph was not examined."""
        if self.entries >= 2:
            self.outputs = (self.outputs or []) + _refs(roots)
            self._examine()

    def graph_built(self, results: Any) -> None:
        """``torch.autograd.grad(..., create_graph=True)`` returned ``results`` in an armed
        step: a later backward runs their graph and the step's forwards' together."""
        refs = _refs(results)
        self.outputs = (self.outputs or []) + refs
        self.results = (self.results or []) + refs
        self._examine()

    def _examine(self, parameters_only: bool = False) -> bool:
        """Hooks the senders of the parts of each node input reached along several edges
        (only parameters' AccumulateGrad nodes: ``parameters_only``); whether there was one."""
        roots = [t.grad_fn for t in (r() for r in self.outputs or []) if t is not None]
        visited: Dict[int, Any] = {}  # (the node too: a node's Python object may be made
        # afresh at each access once none is alive, and a collected one's id reused)
        into: Dict[Key, List[Edge]] = {}
        incoming: Dict[int, List[Edge]] = {}
        while roots:
            node = roots.pop()
            if id(node) in visited:
                continue
            visited[id(node)] = node
            for i, (nxt, nr) in enumerate(node.next_functions):
                if nxt is None:
                    continue
                into.setdefault((id(nxt), nr), []).append((node, i))
                incoming.setdefault(id(nxt), []).append((node, i))
                roots.append(nxt)
        found = False
        waiting = {(id(t.grad_fn), t.output_nr) for t in (r() for r in self.results or [])
                   if t is not None and id(t.grad_fn) in visited}
        for (receiver_id, nr), edges in into.items():
            if len(edges) < 2 and (receiver_id, nr) not in waiting:
                continue
            receiver = visited[receiver_id]
            if parameters_only and self.pinner.movable(
                    getattr(receiver, "variable", None)) not in self.persistent:
                continue
            found = True
            serial = _serial(receiver)
            key = (serial, nr)
            if _first_hook(receiver, (self.serial,)):
                receiver.register_prehook(self._reading(serial))
            keys = self.keys.setdefault(serial, [])
            if key not in keys:
                keys.append(key)
            for node, i in edges:
                # A pure view of its one input hands on what the node before it made.
                while node.name() in _VIEWS and len(incoming.get(id(node), ())) == 1:
                    node, i = incoming[id(node)][0]
                edge = (_serial(node), i)
                self.route[edge] = key
                if _first_hook(node, (self.serial, i)):
                    node.register_hook(self._sender(edge))
        return found

    def _sender(self, edge: Key) -> Any:
        index = edge[1]

        def hook(grad_inputs: Any, grad_outputs: Any) -> None:
            self.safe_point()
            key = self.route.get(edge)
            part = grad_inputs[index]
            if part is None or key is None:  # no gradient along this edge: nothing is added
                return
            if key in self.arrived:  # a later part: the first one must be resident for it
                self._resident(key)
                return
            movable = self.pinner.movable
            ptr = movable(part)
            if ptr and ptr not in self.persistent and not any(
                    movable(t) == ptr for t in grad_outputs) and not any(
                    movable(t) == ptr for j, t in enumerate(grad_inputs) if j != index):
                self.pinner.declare(ptr)
                self.arrived[key] = ptr
            else:
                self.arrived[key] = 0
        return hook

    def _reading(self, receiver: int) -> Any:
        def hook(grad_outputs: Any) -> None:
            for key in self.keys.get(receiver, ()):
                self._resident(key)
                self.arrived.pop(key, None)  # (another backward through it begins afresh)
        return hook

    def _resident(self, key: Key) -> None:
        held = self.arrived.get(key)
        if held:
            self.arrived[key] = 0
            self.pinner.declare(held, False)

    def forget(self) -> None:
        """The step (or the backward) is over: a later forward begins new graphs."""
        self.outputs = None
        self.results = None
        self.entries = 0
        self.route.clear()
        self.keys.clear()
        self.arrived.clear()


def _refs(value: Any) -> List[Any]:
    return [weakref.ref(t) for t in leaves(value)
            if isinstance(t, torch.Tensor) and t.grad_fn is not None]

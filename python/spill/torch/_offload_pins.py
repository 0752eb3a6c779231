"""The pins offload's hooks hold: a running module's frame (_Frame) and what its tokens
unpin as (_Read), taking and releasing pins into frames and holds, and the parameter reads by
attribute pinned in a training forward (_getattr_pinned). Mixed into OffloadHandle; the design
is in _offload.py's docstring."""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

import torch

from spill import OutOfMemoryError
from spill._capi import Status

from ._guard import PinEveryOp
from ._pins import TorchOutOfMemoryError
from ._quiet import EVALUATION
from ._recompute import ModuleCall
from ._state import state
from ._window import _dispatch_stack, _function_stack, _leave, stray_optimizer_error

if TYPE_CHECKING:  # (for annotations only: _offload_modes imports this module)
    from ._offload_modes import _NewStorage


Token = Any  # spill._capi.PinToken
_STRIDED = torch.strided  # (a sparse tensor has no storage of its own)


class _Frame:
    """The pins a running module holds until its forward ends. A busy module's frame (see
    OffloadHandle._busy) holds none of what its code makes: its ``ops`` mode pins each op of
    its own code instead."""
    __slots__ = ("module", "tokens", "sequential", "child_outputs", "packed", "inputs", "ops",
                 "functions", "call", "argument_nodes")

    def __init__(self, module: Optional[torch.nn.Module],
                 call: Optional[ModuleCall] = None) -> None:
        self.module = module
        self.call = call  # None for the step's frame (no module call)
        self.tokens: List[Tuple[Token, bool]] = []
        self.sequential = isinstance(module, torch.nn.Sequential)
        self.child_outputs: List[Token] = []
        self.packed: Set[int] = set()
        self.inputs: Set[int] = set()  # storage pointers of the module's tensor arguments
        self.ops: Optional[PinEveryOp] = None
        self.functions: Optional[_NewStorage] = None  # (with ops: a busy module's)
        # A busy module without children in grad mode: its arguments' grad_fn (_regions.py).
        self.argument_nodes: Optional[List[Any]] = None


class _Read:
    """What a pin for reading holds instead of ``wrote=False``: the tensor and its version
    counter then. A forward may write a parameter in place all the same (nn.Embedding with
    ``max_norm`` renormalizes the rows it looks up; code writing a weight under no_grad): an
    unpin saying "not written" would let spill keep a host copy it made before, and the next
    swap-out would drop the write. The unpin says "written" when the version moved."""
    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.version = tensor._version

    def __bool__(self) -> bool:
        return self.tensor._version != self.version


def _evaluation_oom(e: BaseException) -> BaseException:
    """A pin's out-of-memory error in an evaluation forward, saying where it happened (an
    allocation's carries the note already: QuietSteps.evaluation)."""
    text = str(e)
    if EVALUATION in text:
        return e
    code = getattr(e, "code", Status.OUT_OF_MEMORY)
    state.last_oom = (f"{text}\n{EVALUATION}", code)
    return TorchOutOfMemoryError(*state.last_oom)


_module_getattr = torch.nn.Module.__getattr__


def _getattr_pinned(module: torch.nn.Module, name: str) -> Any:
    """``nn.Module.__getattr__`` (which serves parameters, buffers and submodules) once an
    offload handle was made: a parameter or buffer read while a training forward of an
    offloaded model runs on this thread, and its module does not, is pinned until the module
    running then ends (OffloadHandle._read_outside). The first step sees such reads op by op
    (_Discovery) and later steps pin those at the reader's pre-hook; a read it had not seen
    (a parent's code reading a child's weight from the third step on, a forward hook added
    after the first step reading another module's weight) went unpinned, and read the
    weight on the host (audit 36b F1: a segmentation fault on the CPU bridge)."""
    value = _module_getattr(module, name)
    if _in_forward and isinstance(value, torch.Tensor):
        me = threading.get_ident()
        for ref, thread in list(_in_forward.values()):
            handle = ref() if thread == me else None
            if handle is not None:
                handle._read_outside(module, value)
    return value


# The handles whose training forward runs now (id() -> (weak reference, thread)): an entry
# has begun and not ended (OffloadHandle._set_entry). Empty outside forwards, so that every
# other attribute read costs one test.
_in_forward: Dict[int, Tuple[Any, int]] = {}


def _install_getattr() -> None:
    """Puts _getattr_pinned in place of ``nn.Module.__getattr__``; once per process."""
    if torch.nn.Module.__getattr__ is _module_getattr:
        torch.nn.Module.__getattr__ = _getattr_pinned  # type: ignore[assignment]


class _Pins:
    """OffloadHandle's pins: taken into frames and holds, and released."""

    def _release_tokens(self, tokens: List[Tuple[Token, Any]]) -> None:
        stream = self.pinner.stream()
        unpin = self._unpin
        for token, wrote in tokens:
            unpin(token, stream, bool(wrote))  # (a _Read: whether the tensor was written)

    def _hold_until_step_ends(self, tensors: List[torch.Tensor]) -> None:
        """A functorch transform in this handle's forward, in grad mode, read ``tensors`` (made
        before it: weights, activations): the graph the forward records through it saved them
        without the saved-tensor hooks (the transform disables them), so that the backward
        reads them unpinned. They stay pinned until the step ends (_transforms.py)."""
        stream = self.pinner.stream()
        for t in tensors:
            self._hold(self._step_frame.tokens, t, stream, False)

    def _pin(self, t: Any, stream: Optional[int]) -> Optional[Token]:
        ptr = self._movable(t)
        if not ptr:
            return None
        try:
            return self._pin_block(ptr, stream)
        except (torch.cuda.OutOfMemoryError, OutOfMemoryError) as e:
            # A module's weights in an evaluation forward: as its ops do (_EvalOps), it tries
            # again once what the window and such forwards made is declared. (The error is
            # not kept: its traceback's frames would hold the forward's tensors.)
            if self._eval_ops is None:
                named = stray_optimizer_error(self._window, e)
                if named is not None:  # (a replacement optimizer's state fills the budget)
                    raise named from e
                raise
        self._window.declare_made()
        try:
            return self._pin_block(ptr, stream)  # (raises again when nothing could move)
        except (torch.cuda.OutOfMemoryError, OutOfMemoryError) as e:
            raise _evaluation_oom(e) from e

    def _hold_given(self, tokens: List[Tuple[Token, Any]], given: List[torch.Tensor],
                    stream: Optional[int], busy: bool) -> None:
        """A module called by ``torch.func.functional_call`` (torch.nn.utils.stateless in
        torch 1.13) reads the tensors it was given in place of its parameters and buffers
        (MAML's adapted weights, made in the loop's code): pinned around its forward, unless
        its ops pin them (busy), and in a training forward declared swappable as the batch
        is (autograd saves them; they are read only by such forwards, pinned, by the backward,
        unpacked, and by the window's ops). Before, its hooks pinned the module's own
        parameters, which it did not read, and the given tensors stayed resident."""
        declare = (torch.is_grad_enabled() and self._eval_ops is None
                   and self._discovery is None)
        for t in given:
            ptr = self._movable(t)
            if not ptr:
                continue
            if declare and ptr not in self._persistent and self.pinner.declare(ptr):
                self._acts.add(ptr)
            if not busy:
                self._hold(tokens, t, stream, False)

    def _set_entry(self, module: Optional[torch.nn.Module]) -> None:
        """The module whose forward began the forward running now (None: none runs)."""
        self._entry = module
        if module is None:
            _in_forward.pop(id(self), None)
        else:
            _in_forward[id(self)] = (weakref.ref(self), threading.get_ident())

    def _read_outside(self, owner: torch.nn.Module, t: torch.Tensor) -> None:
        """``t``, a parameter or buffer of ``owner`` read by attribute while a training
        forward of this handle's model runs (see _getattr_pinned): pinned in the frame of the
        module running now, until it ends (in a quiet step, the innermost quiet frame's, else
        until the step ends), when ``owner`` is one of the model's and not running (its own
        pre-hook pins its tensors for its call) and no mode pins every op there (the first
        step's, an evaluation forward's, a busy module's)."""
        if self._discovery is not None or self._eval_ops is not None \
                or owner not in self._direct or state.forked_child:
            return
        if self._quiet:
            # (a module without tensors of its own, the root of most models, has no quiet
            # frame: then until the step ends)
            quiet = self._quiet_frames
            if quiet and (quiet[-1][0] is owner or any(m is owner for m, _ in quiet)):
                return
            tokens = quiet[-1][1] if quiet else self._step_frame.tokens
        else:
            frames = self._frames
            if not frames:
                return
            top = frames[-1]
            # (most reads are a module's own, which its pre-hook pinned: the top frame's)
            if top.module is owner or top.ops is not None \
                    or any(f.module is owner for f in frames):
                return
            extra = self._extra.get(top.module)
            if extra and id(t) in extra:
                return  # the first step saw it: pinned by the pre-hook
            tokens = top.tokens
        self._hold(tokens, t, self.pinner.stream(), False)

    def _hold(self, tokens: List[Tuple[Token, Any]], t: Any, stream: Optional[int],
              wrote: bool) -> None:
        token = self._pin(t, stream)
        if token is not None:
            tokens.append((token, wrote or _Read(t)))

    def _release_frame(self, frame: _Frame) -> None:
        if not frame.tokens and not frame.child_outputs:
            return
        self._release_tokens(frame.tokens)
        if frame.child_outputs:
            self._release_tokens([(token, True) for token in frame.child_outputs])
        frame.tokens.clear()
        frame.child_outputs.clear()
        frame.packed.clear()

    def _unwind(self, depth: int) -> None:
        while len(self._frames) > depth:
            frame = self._frames.pop()
            self._leave_ops(frame)
            self._release_frame(frame)

    def _drop_finished(self) -> None:
        """Unwinds the frames of module calls that are over without a post hook: a forward
        raised and its caller caught the exception. Until then their pins stay (safe: a busy
        caller's own code runs under its mode all along, its children's too); from here the
        next module's outputs are its true parent's."""
        frames = self._frames
        depth = len(frames)
        while depth and frames[depth - 1].call is not None \
                and not frames[depth - 1].call.running():
            depth -= 1
        if depth < len(frames):
            self._unwind(depth)

    def _leave_ops(self, frame: _Frame) -> None:
        if frame.ops is not None:
            _leave(frame.ops, *_dispatch_stack())  # (entered: _window._leave)
            frame.ops = None
        if frame.functions is not None:
            _leave(frame.functions, *_function_stack())
            frame.functions = None

"""Lifecycle, budget and steps: spill_init, spill_shutdown, spill_set_budget, spill_*_step."""
from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from typing import Callable, Iterator, List, Optional, Tuple, Union

from . import _args
from ._errors import Error, InvalidArgumentError
from ._lib import call


def configure(conf: Optional[str] = None) -> None:
    """Sets spill's configuration string, e.g. ``"budget:8GiB,host_cap:64GiB"`` (the keys are
    the README's; ``None`` reads ``SPILL_CONF``). Each device's runtime is created from it on
    first use. Calling it again with the same string is fine; with another one while runtimes
    run it raises :class:`spill.Error` (code ``ALREADY_INITIALIZED``): call :func:`shutdown`
    first. A malformed string raises :class:`spill.InvalidArgumentError` naming the key."""
    call("spill_init", _args.text(conf, "conf") if conf is not None else None)


# Run by shutdown(): the checks first (each may raise to refuse it), the others once spill
# has shut down. spill.torch adds its own while spill serves PyTorch's tensors, whose memory
# shutdown would free under them (this package never imports torch, so it cannot look).
_shutdown_checks: List[Callable[[], None]] = []
_after_shutdown: List[Callable[[], None]] = []
# How many times shutdown() ran: memory from before one went with it, and its address may hold
# a block of the next session (spill.cupy's late frees check it). Here, not in a module that
# may be reloaded (a reload started its own count at 0 again).
shutdowns = 0


def shutdown() -> None:
    """Frees every device's runtime: blocks still allocated, cached and swapped-out memory,
    streams from :func:`stream_create`. Waits for queued work. Pointers from before become
    invalid; later calls raise (code ``SHUT_DOWN``) until :func:`configure` starts again.
    Calling it twice is fine. Refused (nothing freed) while spill holds PyTorch's tensors:
    see ``spill.torch.disable``."""
    global shutdowns
    for check in _shutdown_checks:
        check()
    call("spill_shutdown")
    shutdowns += 1
    for done in _after_shutdown:
        done()


def is_simulated(device: int = 0) -> bool:
    """Whether ``device``'s runtime runs on the simulated GPU (creating the runtime now if it
    does not exist yet)."""
    simulated = ctypes.c_int(0)
    call("spill_device_open", _args.device(device), ctypes.byref(simulated))
    return bool(simulated.value)


def parse_size(text: str) -> int:
    """Bytes in a size written the way the configuration string writes them: ``"8GiB"``,
    ``"512MiB"``, ``"1.5GB"``, ``"4096"`` (binary and decimal units, any case but a capital
    prefix before a small b, ``"1Gb"``: bits). Text that is not a size, a fraction of a byte,
    or one past 2**63 bytes, raises :class:`spill.InvalidArgumentError` quoting it. Needs no
    runtime."""
    value = ctypes.c_uint64(0)
    call("spill_parse_size", _args.text(text, "a size to parse"), ctypes.byref(value))
    return value.value


def set_budget(nbytes: Union[int, str], device: int = 0) -> None:
    """Sets ``device``'s budget: the most device bytes spill may map (bytes as an int, or a
    size such as ``"8GiB"``).

    Raising it takes effect at once. Lowering it releases cached memory and evicts swappable
    blocks until the mapped bytes fit; when they cannot, :class:`spill.OutOfMemoryError` says
    what holds them and the budget is unchanged."""
    if isinstance(nbytes, str):
        nbytes = parse_size(nbytes)
    call("spill_set_budget", _args.device(device), _args.size(nbytes, "budget"))


def budget(device: int = 0) -> int:
    """``device``'s budget in bytes."""
    value = ctypes.c_uint64(0)
    call("spill_get_budget", _args.device(device), ctypes.byref(value))
    return value.value


def empty_cache(device: int = 0) -> None:
    """Returns ``device``'s cached (free) memory to the device, after its queued work, and the
    pinned host memory that holds no swapped-out bytes (``host_pinned`` in :func:`stats`), the
    host copies of blocks freed while a copy of theirs was in flight included."""
    call("spill_empty_cache", _args.device(device))


def begin_step(scope: int = 0, device: int = 0) -> None:
    """A training step of ``scope`` (any number the caller picks: a model, a stream) begins on
    ``device``; it becomes the calling thread's current scope. Prefer ``with spill.step():``."""
    call("spill_begin_step", _args.device(device), _args.scope(scope))


def end_step(scope: int = 0, device: int = 0) -> None:
    """The step of ``scope`` on ``device`` ends (with policy ``plan``, the first step is
    recorded and later ones follow the plan made from it)."""
    call("spill_end_step", _args.device(device), _args.scope(scope))


def step_key(key: int, scope: int = 0, device: int = 0) -> None:
    """Says which variant the step of ``scope`` in progress is, by a number of the caller's
    (0 to 2**64 - 1; e.g. a hash of the batch's shapes), for steps whose blocks differ from
    variant to variant (batches of a few lengths, some of whose tensors are under
    ``swap_threshold`` at one length and not at another). The scope keeps a plan for each
    variant (up to 8) and a step follows the one of its key, when the key comes before the
    step's first pin (``spill.step(key=...)`` does that). A key not met before follows the
    plan of the nearest key met: make keys grow with the batch's size. ``spill.torch.offload``
    keys each step by its first forward's tensor arguments (ranks and dtypes, element count,
    exact shapes)."""
    call("spill_step_key", _args.device(device), _args.scope(scope),
         _args.integer(key, "key", 0, 2**64 - 1))


def set_scope_name(name: Optional[str], scope: int = 0, device: int = 0) -> None:
    """Names ``scope`` on ``device`` for traces and ``spill report`` (e.g. after the model it
    trains): shown beside the scope's number in the report's steps; None or "" clears it, and
    ``end_scope`` drops it. Names past 255 bytes are cut. ``spill.torch`` names the scopes it
    makes ("offload GPT", "guard AdamW", ...)."""
    call("spill_set_scope_name", _args.device(device), _args.scope(scope),
         _args.text(name, "name") if name is not None else None)


def begin_op(name: Optional[str] = None, scope: int = 0, device: int = 0) -> None:
    """An op (kernel or layer) named ``name`` starts within the current step of ``scope``
    (a name past 255 bytes of UTF-8 is cut there, between characters)."""
    call("spill_begin_op", _args.device(device), _args.scope(scope),
         _args.text(name, "name") if name is not None else None)


def end_scope(scope: int = 0, device: int = 0) -> None:
    """Ends ``scope`` on ``device`` for good: spill drops its recorded step and plan (kept
    otherwise for the process's life). Call it when the model or loop that used the scope is
    done. A step of the scope in progress is abandoned (not recorded); a later step of the
    same number starts afresh. Ending a scope that holds nothing does nothing."""
    call("spill_end_scope", _args.device(device), _args.scope(scope))


# Per thread: the (device, scope) of each `with spill.step()` open there, outermost first.
_open_steps = threading.local()


@contextlib.contextmanager
def step(scope: int = 0, device: int = 0, key: Optional[int] = None) -> Iterator[None]:
    """``with spill.step():`` brackets one training step of ``scope`` on ``device``; with
    ``key``, the step's variant (see :func:`step_key`).

    The step ends when the block exits, by an exception too; the block's exception is the one
    raised then (should ending the step fail as well, that failure is added to it as a note).
    Two training loops in one process use two scopes so that neither sees the other's steps as
    deviations. A step of another scope may run inside one (an evaluation inside a training
    step): when it ends, the outer scope is the thread's current scope again. A step inside a
    step of the same scope and device on the same thread has no meaning (a step cannot contain
    itself) and raises :class:`spill.InvalidArgumentError` naming the scope."""
    opened = (_args.device(device), _args.scope(scope))
    variant = None if key is None else _args.integer(key, "key", 0, 2**64 - 1)
    stack = _open_steps.__dict__.setdefault("stack", [])
    if opened in stack:
        raise InvalidArgumentError(
            f"spill.step: a step of scope {scope} on device {device} is already open on this "
            "thread (a `with spill.step()` inside another of the same scope): a step cannot "
            "contain itself. End the outer step first, or give the inner loop a scope of its "
            "own (spill.step(scope=...))")
    begin_step(scope, device)
    stack.append(opened)
    if variant is not None:
        try:
            step_key(variant, scope, device)
        except BaseException:
            _end_nested_step(stack, opened)
            raise
    try:
        yield
    except BaseException as body:
        # The block's exception is the one the caller must see; a failure to end the step
        # (spill shut down inside the block, say) only rides along with it.
        try:
            _end_nested_step(stack, opened)
        except Error as failure:
            note = (f"spill.step: ending the step of scope {scope} on device {device} failed "
                    f"too: {failure}")
            if hasattr(body, "add_note"):  # Python 3.11+
                body.add_note(note)
            else:
                logging.getLogger("spill").warning("%s", note)
        raise
    _end_nested_step(stack, opened)


def _end_nested_step(stack: List[Tuple[int, int]], key: Tuple[int, int]) -> None:
    """Ends the step ``key`` (the innermost of ``stack``); an outer step of another scope on
    the same device becomes the thread's current scope again (end_step made ``key``'s
    current, and the outer step's pins would otherwise go to a scope with no step open)."""
    stack.remove(key)
    device, scope = key
    end_step(scope, device)
    outer = [s for d, s in stack if d == device]
    if outer:
        call("spill_set_scope", device, outer[-1])


def write_step_graph(path: _args.PathLike, scope: int = 0, device: int = 0) -> None:
    """Writes the last recorded step of ``scope`` on ``device`` as a graph file for
    ``spill plan`` (docs/graph-format.md). Raises :class:`spill.Error` with code ``NOT_FOUND``
    when no step was recorded (recording needs ``policy:plan`` and a budget)."""
    call("spill_write_step_graph", _args.device(device), _args.scope(scope), _args.path(path))

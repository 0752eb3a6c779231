"""spill.torch.export_step: the step spill recorded in a real run, as a graph for `spill plan`
(internal to spill.torch; the C API writes it, the spill package's ctypes layer calls it)."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from .. import _args
from .._errors import InvalidArgumentError, InvalidArgumentTypeError
from ._state import state
from .capture import _output_path


def export_step(path: Union[str, "os.PathLike[str]"], *, scope: int = 0,
                device: Optional[int] = None) -> str:
    """Writes the training step spill's swapper last recorded (a real run under spill, with
    ``policy:plan`` and a budget) as a graph in the format ``spill.torch.capture`` writes, so
    ``spill plan`` can re-plan the real run for another GPU and link. Its ops carry their
    measured times; it has no batch scaling (plan it at its own batch).

    scope: the step scope the run used: ``handle.scope`` of :func:`offload`, ``guard.scope``
      (before ``remove()`` or the guard's exit, which free it), 0 for ``spill.torch.step()``.
    device: the CUDA device (default: the current one; without CUDA, the CPU bridge's device,
      or 0).
    Returns the path. Checks it as :func:`capture` does, before writing: a missing directory,
    no permission to write, or a file there that is not a spill graph (it would be lost) raises
    :class:`spill.InvalidArgumentError` naming it. Raises ``spill.Error`` with code
    ``NOT_FOUND`` when no step was recorded (at scope 0 the message says that offload and guard
    record under ``handle.scope``).
    """
    import spill  # the ctypes layer over the C API; loads libspill on first use

    cuda = torch.cuda.is_available()
    if device is None:
        device = torch.cuda.current_device() if cuda else state.device
    device = _args.device(device)
    if cuda and device >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise InvalidArgumentError(f"spill.torch.export_step: no CUDA device {device}: this "
                                   f"machine has {count} (0 to {count - 1})")
    if path is None:  # (capture's "write nothing"; here there is nothing else to do)
        raise InvalidArgumentTypeError("spill: spill.torch.export_step: path must be a str or "
                                       "os.PathLike, got None")
    out = _output_path(path, "spill.torch.export_step")
    try:
        spill.write_step_graph(out, scope=scope, device=device)
    except spill.Error as e:
        if e.code != spill.Status.NOT_FOUND:
            raise
        if not cuda and state.started and device != state.device:
            # (every ordinal is a simulated device: one spill.torch did not run on is empty)
            raise type(e)(f"{e} (spill.torch runs on device {state.device}, not {device}: "
                          f"pass device={state.device})", e.code) from None
        if scope != 0:  # (a scope of offload's or guard's: freed by remove() or the exit)
            raise type(e)(f"{e} (offload's handle.remove() and a guard's exit free the step "
                          f"they recorded: export it before)", e.code) from None
        # The default scope is spill.torch.step()'s; a run under offload() or guard() records
        # under a scope of its own, which a reader who left scope out did not ask for.
        raise type(e)(f"{e} (scope 0 is spill.torch.step()'s: spill.torch.offload and "
                      f"spill.torch.guard record under their own scope, so pass "
                      f"scope=handle.scope)", e.code) from None
    return out

"""spill.torch.export_step: the step spill recorded in a real run, as a graph for `spill plan`
(internal to spill.torch; the C API writes it, the spill package's ctypes layer calls it)."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch


def export_step(path: Union[str, "os.PathLike[str]"], *, scope: int = 0,
                device: Optional[int] = None) -> str:
    """Writes the training step spill's swapper last recorded (a real run under spill, with
    ``policy:plan`` and a budget) as a graph in the format ``spill.torch.capture`` writes, so
    ``spill plan`` can re-plan the real run for another GPU and link. Its ops carry their
    measured times; it has no batch scaling (plan it at its own batch).

    scope: the step scope the run used: ``handle.scope`` of :func:`offload`, ``guard.scope``
      (before ``remove()`` or the guard's exit, which free it), 0 for ``spill.torch.step()``.
    device: the CUDA device (default: the current one, or 0 without CUDA).
    Returns the path. Raises ``spill.Error`` with code ``NOT_FOUND`` when no step was recorded
    (at scope 0 the message says that offload and guard record under ``handle.scope``).
    """
    import spill  # the ctypes layer over the C API; loads libspill on first use

    if device is None:
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    out = os.fspath(path)
    try:
        spill.write_step_graph(out, scope=scope, device=device)
    except spill.Error as e:
        if scope != 0 or e.code != spill.Status.NOT_FOUND:
            raise
        # The default scope is spill.torch.step()'s; a run under offload() or guard() records
        # under a scope of its own, which a reader who left scope out did not ask for.
        raise type(e)(f"{e} (scope 0 is spill.torch.step()'s: spill.torch.offload and "
                      f"spill.torch.guard record under their own scope, so pass "
                      f"scope=handle.scope)", e.code) from None
    return out

"""spill for PyTorch.

A one-line drop-in allocator that swaps idle tensors to host memory at the same address, so a
model trains on more memory than the GPU has:

    import spill.torch
    spill.torch.enable("budget:20GiB")               # before the first CUDA tensor
    handle = spill.torch.offload(model, optimizer)   # swapping driven by PyTorch's hooks

``enable(conf, target="cpu")`` is the CPU bridge (spill's simulated device as PyTorch's CPU
allocator), how the integration is tested without a GPU. ``guard()`` pins every aten op for
code the hooks do not cover; ``pin_reads()`` pins the ops of another thread that uses an
offloaded model's tensors (a checkpoint, logging or EMA thread). ``memory_stats``,
``memory_summary``, ``memory_snapshot``, ``reset_peak_memory_stats`` and
``reset_accumulated_memory_stats`` answer PyTorch's questions with spill's figures (by
default ``enable`` makes ``torch.cuda``'s own functions do so too). Out of memory raises ``torch.cuda.OutOfMemoryError`` with spill's message, which
lists the largest named blocks: offload() names parameters, buffers, gradients and optimizer
state by their qualified names, and ``name_tensor(t, name)`` names any tensor's block.
docs/pytorch.md is the guide.

``spill.torch.capture`` records one training step of a model, without data, as a graph that
``spill plan`` answers "does it fit, and how fast" for (docs/estimate.md);
``spill.torch.export_step`` writes the step spill recorded in a real run in the same format.

Importing this module imports torch (``import spill`` alone never does).
"""
from __future__ import annotations

try:
    import torch as _torch
except ImportError as _e:  # pragma: no cover - depends on the machine
    raise ImportError("spill.torch needs PyTorch (>= 1.13), which is not installed "
                      "(Debian: apt-get install python3-torch)") from _e

from ._state import torch_version as _torch_version

if _torch_version() < (1, 13, 0):
    raise ImportError(f"spill.torch needs PyTorch >= 1.13, found {_torch.__version__}")

from spill import step  # noqa: E402

from .capture import CapturedStep, capture  # noqa: E402
from ._export import export_step  # noqa: E402
from ._recorder import CaptureError  # noqa: E402
from ._enable import AllocatorInUseError, disable, enable, is_enabled, pool  # noqa: E402
from ._check import UnpinnedUseError, check_pins  # noqa: E402
from ._guard import guard  # noqa: E402
from ._names import name_tensor  # noqa: E402
from ._offload import OffloadHandle, offload  # noqa: E402
from ._reads import pin_reads  # noqa: E402
from ._stats import (max_memory_allocated, max_memory_reserved, memory_allocated,  # noqa: E402
                     memory_reserved, memory_snapshot, memory_stats, memory_summary,
                     reset_accumulated_memory_stats, reset_peak_memory_stats)

__all__ = [
    "CaptureError", "CapturedStep", "capture", "export_step",
    "AllocatorInUseError", "OffloadHandle",
    "enable", "disable", "is_enabled", "pool", "offload", "guard", "pin_reads", "step",
    "check_pins", "UnpinnedUseError",
    "name_tensor",
    "memory_stats", "memory_summary", "memory_snapshot", "reset_peak_memory_stats",
    "reset_accumulated_memory_stats",
    "memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved",
]

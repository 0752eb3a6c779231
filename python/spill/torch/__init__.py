"""spill for PyTorch.

``spill.torch.capture`` records one training step of a model, without data, as a graph that
``spill plan`` answers "does it fit, and how fast" for (docs/estimate.md);
``spill.torch.export_step`` writes the step spill recorded in a real run in the same format.
Importing this module imports torch (``import spill`` alone never does).
"""
from __future__ import annotations

try:
    import torch as _torch
except ImportError as _e:  # pragma: no cover - depends on the machine
    raise ImportError("spill.torch needs PyTorch (>= 1.13), which is not installed") from _e

if tuple(int(x) for x in _torch.__version__.split(".")[:2] if x.isdigit()) < (1, 13):
    raise ImportError(f"spill.torch needs PyTorch >= 1.13, found {_torch.__version__}")

from .capture import CapturedStep, capture  # noqa: E402
from ._export import export_step  # noqa: E402
from ._recorder import CaptureError  # noqa: E402

__all__ = ["CaptureError", "CapturedStep", "capture", "export_step"]

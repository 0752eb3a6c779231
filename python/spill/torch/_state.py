"""What spill.torch has installed in this process (one allocator target at a time), the
running torch's version, and the fork rule: a child forked after enable() (a DataLoader
worker) never touches the parent's runtime, so every hook is a no-op there."""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional, Tuple

import torch


def torch_version() -> Tuple[int, int, int]:
    """(major, minor, patch) of the running torch; Debian's "1.13.0a0" is (1, 13, 0)."""
    numbers = []
    for part in torch.__version__.split("+")[0].split(".")[:3]:
        leading = re.match(r"\d+", part)
        numbers.append(int(leading.group()) if leading else 0)
    while len(numbers) < 3:
        numbers.append(0)
    return numbers[0], numbers[1], numbers[2]


class State:
    """The process's spill.torch state (see the module docstring)."""

    def __init__(self) -> None:
        self.target: Optional[str] = None      # "cuda" or "cpu" once enable() succeeded
        # Whether enable() or pool() started spill for PyTorch (kept after disable(): tensors
        # spill allocated still live in its memory; cleared by spill.shutdown()). Until then
        # the statistics functions answer without starting a runtime (_stats.py).
        self.started = False
        self.device = 0                        # spill's device ordinal
        self.allocator: Any = None             # the CUDAPluggableAllocator, on CUDA
        self.patched: Dict[Tuple[Any, str], Any] = {}  # (module, name) -> original
        self.forked_child = False
        self.pid = os.getpid()
        # The message and code of the last out-of-memory error spill.torch's hooks raised
        # (_pins._raise): a backward whose engine hands it on as a plain RuntimeError raises
        # it again (_window.py). Not the error itself: its traceback would keep the frames of
        # the failed op, and the tensors in them, alive.
        self.last_oom: Optional[Tuple[str, int]] = None

    @property
    def active(self) -> bool:
        return self.target is not None and not self.forked_child


state = State()


def _after_fork_in_child() -> None:
    if state.target is not None:
        state.forked_child = True


os.register_at_fork(after_in_child=_after_fork_in_child)

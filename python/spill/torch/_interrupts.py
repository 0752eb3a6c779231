"""Ctrl-C (SIGINT) while spill's own Python code runs: delivered once it has returned.

Python raises KeyboardInterrupt at whatever bytecode the main thread is running when the signal
arrives. Inside spill's hooks that can be between a pin and the note of its token (the block
stays pinned for good), or between taking the window's modes off PyTorch's stacks and putting
them back (the loop's code after the caught KeyboardInterrupt then reads swapped-out tensors
unpinned: a segmentation fault on the CPU bridge, a read of unmapped memory on a GPU). While
some offload handle or guard lives, spill's handler stands before the one it found (Python's
``default_int_handler``, or the caller's own): when the main thread is inside spill's code, the
interrupt is put off until the outermost frame of that code returns, and the handler found runs
at the next line of its caller, as it would have there (a trace function on those two frames;
no other frame is traced meanwhile). When a trace function is already set (a debugger,
coverage), the signal is sent again every ``RETRY_S`` instead, until it finds the thread
outside. "Inside": walking out from the running frame past PyTorch's and the standard library's
frames, the first other frame is spill's, or one of them is ``nn.Module``'s call, whose hooks
and forward wrapper spill's state follows (a KeyboardInterrupt between the root module's
forward pre-hook and its forward would leave a region begun). The caller's own code (a forward,
a closure LBFGS's step runs, a tensor hook) is outside: an interrupt there is raised there, as
without spill; a backward or an optimizer step run by spill's wrappers takes the interrupt when
it returns (as a backward without Python hooks does). Only the main thread runs Python's signal
handlers; a handler installed on the main thread is needed (offload() and guard() install it
when called there). The handler found comes back when the last handle and guard go, unless
another handler replaced spill's meanwhile."""
from __future__ import annotations

import os
import signal
import sys
import sysconfig
import threading
from typing import Any, Optional

import torch

RETRY_S = 0.002

_SPILL = os.path.dirname(os.path.dirname(__file__)) + os.sep  # the spill package
_PASSED = tuple(os.path.dirname(p) + os.sep if p.endswith("__init__.py") else p + os.sep
                for p in (torch.__file__, sysconfig.get_paths()["stdlib"])) + ("<frozen ",)
_CALLS = {f.__code__ for f in (getattr(torch.nn.Module, n, None)
                                for n in ("_call_impl", "_wrapped_call_impl"))
          if f is not None and hasattr(f, "__code__")}


def spill_frame(frame: Any) -> Any:
    """The outermost frame of spill's code that ``frame`` (the main thread's, where a signal
    found it) runs in, None when it runs the caller's own code."""
    outer = None
    while frame is not None:
        code = frame.f_code
        name = code.co_filename
        if name.startswith(_SPILL) or code in _CALLS:
            outer = frame
        elif not name.startswith(_PASSED):
            break  # the caller's own code
        frame = frame.f_back
    return outer


def _untraced(frame: Any, event: str, arg: Any) -> None:
    return None


class _Handler:
    """Stands before ``previous``, the SIGINT handler found at installation."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous
        self.waiting = False

    def __call__(self, signum: int, frame: Any) -> Any:
        outer = spill_frame(frame)
        if outer is None:
            self.waiting = False
            return self.previous(signum, frame)
        if self.waiting:  # (pressed again meanwhile: one interrupt)
            return None
        self.waiting = True
        if sys.gettrace() is None and outer.f_back is not None:
            # Delivered at the next line its caller runs once it has returned: trace
            # functions of those two frames only (new frames are not traced meanwhile).
            outer.f_trace_lines = False
            outer.f_trace = self._returned
            sys.settrace(_untraced)
        else:  # (a debugger's or coverage's tracing: left alone; the signal is sent again)
            timer = threading.Timer(RETRY_S, self._send)
            timer.daemon = True
            timer.start()
        return None

    def _returned(self, frame: Any, event: str, arg: Any) -> Any:
        if event != "return":
            return self._returned
        frame.f_trace = None
        caller = frame.f_back
        caller.f_trace_lines = True
        caller.f_trace = self._resumed
        return None

    def _resumed(self, frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace = None
        sys.settrace(None)
        self.waiting = False
        self.previous(signal.SIGINT, frame)  # (Python's raises KeyboardInterrupt here)
        return None

    def _send(self) -> None:
        self.waiting = False
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


_installed: Optional[_Handler] = None
_guards = 0


def guard_entered(entered: bool) -> None:
    """A guard() was entered (True) or exited (False)."""
    global _guards
    _guards += 1 if entered else -1
    update()


def update() -> None:
    """Installs spill's handler while some offload handle or guard lives (on the main thread,
    over a handler Python can call), and takes it away after the last one."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    from ._window import all_handles
    want = _guards > 0 or bool(all_handles())
    current = signal.getsignal(signal.SIGINT)
    if want and _installed is None:
        if callable(current):
            _installed = _Handler(current)
            signal.signal(signal.SIGINT, _installed)
    elif not want and _installed is not None:
        if current is _installed:
            signal.signal(signal.SIGINT, _installed.previous)
        _installed = None


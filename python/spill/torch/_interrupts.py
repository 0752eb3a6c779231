"""Ctrl-C (SIGINT), and any signal the caller handles in Python, while spill's own Python code
runs: delivered once it has returned.

Python runs a signal's handler (for SIGINT, raising KeyboardInterrupt; a handler of the
caller's may raise too: SystemExit on SIGTERM for a preempted job, a timeout on SIGALRM) at
whatever bytecode the main thread is running when the signal arrives. Inside spill's hooks
that can be between a pin and the note of its token (the block stays pinned for good), or
between taking the window's modes off PyTorch's stacks and putting them back (the loop's code
after the caught exception, a checkpoint written in a ``finally``, then reads swapped-out
tensors unpinned: a segmentation fault on the CPU bridge, a read of unmapped memory on a GPU).
While some offload handle or guard lives, spill's handler stands before the one it found for
each of SIGINT, SIGTERM, SIGHUP, SIGALRM, SIGUSR1 and SIGUSR2 that has a Python handler
(Python's ``default_int_handler`` for SIGINT, or the caller's own; a signal left to the
system's default action, which ends the process, or ignored, is left alone): when the main
thread is inside spill's code, the signal is put off until the outermost frame of that code
returns, and the handler found runs at the next line of its caller, as it would have there (a
trace function on those two frames; no other frame is traced meanwhile). When a trace function
is already set (a debugger, coverage, or another signal put off), the signal is sent again
every ``RETRY_S`` instead, until it finds the thread outside. "Inside": walking out from the
running frame past PyTorch's and the standard library's frames, the first other frame is
spill's, or one of them is ``nn.Module``'s call, whose hooks and forward wrapper spill's state
follows (an exception between the root module's forward pre-hook and its forward would leave a
region begun). The caller's own code (a forward, a closure LBFGS's step runs, a tensor hook) is
outside: a signal there is handled there, as without spill; a backward or an optimizer step run
by spill's wrappers takes it when it returns (as a backward without Python hooks does). Only
the main thread runs Python's signal handlers; a handler installed on the main thread is needed
(offload() and guard() install them when called there). The handlers found come back when the
last handle and guard go, except where another handler replaced spill's meanwhile. (SIGPROF
and SIGVTALRM, a sampling profiler's, are not put off: the sample belongs where it fell.)"""
from __future__ import annotations

import os
import signal
import sys
import sysconfig
import threading
from typing import Any, Dict

import torch

RETRY_S = 0.002
# The signals whose Python handlers spill stands before.
SIGNALS = tuple(getattr(signal, name) for name in
                ("SIGINT", "SIGTERM", "SIGHUP", "SIGALRM", "SIGUSR1", "SIGUSR2")
                if hasattr(signal, name))

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
    """Stands before ``previous``, the handler of ``signum`` found at installation."""

    def __init__(self, signum: int, previous: Any) -> None:
        self.signum = signum
        self.previous = previous
        self.waiting = False

    def __call__(self, signum: int, frame: Any) -> Any:
        outer = spill_frame(frame)
        if outer is None:
            self.waiting = False
            return self.previous(signum, frame)
        if self.waiting:  # (sent again meanwhile: one signal, as Python merges pending ones)
            return None
        self.waiting = True
        if sys.gettrace() is None and outer.f_back is not None:
            # Delivered at the next line its caller runs once it has returned: trace
            # functions of those two frames only (new frames are not traced meanwhile).
            outer.f_trace_lines = False
            outer.f_trace = self._returned
            sys.settrace(_untraced)
        else:  # (a debugger's, coverage's or another signal's tracing: left alone; sent again)
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
        self.previous(self.signum, frame)  # (Python's SIGINT handler raises KeyboardInterrupt)
        return None

    def _send(self) -> None:
        self.waiting = False
        signal.pthread_kill(threading.main_thread().ident, self.signum)


_installed: Dict[int, _Handler] = {}
_guards = 0


def guard_entered(entered: bool) -> None:
    """A guard() was entered (True) or exited (False)."""
    global _guards
    _guards += 1 if entered else -1
    update()


def update() -> None:
    """Installs spill's handlers while some offload handle or guard lives (on the main thread,
    over handlers Python can call), and takes them away after the last one."""
    if threading.current_thread() is not threading.main_thread():
        return
    from ._window import all_handles
    want = _guards > 0 or bool(all_handles())
    for signum in SIGNALS:
        current = signal.getsignal(signum)
        installed = _installed.get(signum)
        if want and installed is None:
            if callable(current):
                _installed[signum] = _Handler(signum, current)
                signal.signal(signum, _installed[signum])
        elif not want and installed is not None:
            if current is installed:
                signal.signal(signum, installed.previous)
            del _installed[signum]

"""A fork server for the torch tests on the CPU bridge: imports torch once, then forks a child
per request that runs the request's code as `python -c CODE` (or `python SCRIPT ARGS`) would,
in a process of its own. Starting an interpreter and importing torch costs about a second of
CPU; most bridge scenarios are a few seconds, so this is a large part of CI's time.

The child's life after the fork is an ordinary interpreter's: the request's code runs as
__main__ at this file's top level, so an uncaught exception prints its traceback and exits 1,
SystemExit and KeyboardInterrupt end the process as they would, and interpreter finalization
(atexit, module teardown, C++ static destructors) runs. Children differ from a fresh process
only in what the server imported before the fork (torch and the standard library), in sharing
the server's hash seed, and in environment variables read at interpreter or library start:
the caller (test_torch_bridge.run_code) sends only requests whose environment differs from
the server's in SPILL_* variables, which spill reads when it starts, and pytest's
PYTEST_CURRENT_TEST.

Protocol (one JSON line each way, on stdin and on the descriptor given as argv[1]): the request
{"code" | "script" + "argv", "env", "cwd", "stdout", "stderr"} (files to write the child's output
to); the answers {"pid": N} at the fork, then {"status": S} (os.waitpid's) when it ended, or
{"refused": reason} when the server cannot fork safely (another thread runs in it).
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def serve(answers: int) -> dict:
    """Answers requests until stdin closes (then exits), forking a child for each; returns the
    request in the child. Importing torch starts OpenBLAS's thread, which OpenBLAS stops before
    a fork and starts again when next needed (pthread_atfork); a thread more than the imports
    started refuses the request."""
    reply = os.fdopen(answers, "w", buffering=1)
    imported = _threads()
    for line in sys.stdin:
        request = json.loads(line)
        if _threads() > imported:
            reply.write(json.dumps({"refused": f"{_threads()} threads run in the server"}) + "\n")
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            reply.close()
            return request
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"status": status}) + "\n")
    sys.exit(0)


def become(request: dict) -> None:
    """Turns the forked child into the process the request asks for, up to running its code."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    sys.stdin = open(0, closefd=False)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])


class ForkServer:
    """The test process's end: starts the server with environment ``env`` on first use and
    runs requests through it; ``run`` returns None where a fresh interpreter is needed (the
    environment differs in more than SPILL_* variables and pytest's PYTEST_CURRENT_TEST, or
    the server cannot fork safely)."""

    def __init__(self, env: Dict[str, str]) -> None:
        self.env = dict(env)
        self.proc: Optional[subprocess.Popen] = None
        self.answers = -1
        self.pending = b""
        self.broken = False

    def _start(self) -> bool:
        if self.proc is None and not self.broken:
            read, write = os.pipe()
            try:
                self.proc = subprocess.Popen([sys.executable, __file__, str(write)],
                                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                             env=self.env, pass_fds=(write,), text=True)
            except OSError:
                self.broken = True
            finally:
                os.close(write)
            self.answers = read
            atexit.register(self.close)
        return self.proc is not None and not self.broken

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
            self.proc = None

    def _answer(self, timeout: Optional[float] = None) -> Optional[dict]:
        """The next answer, or None when none came within ``timeout`` seconds."""
        while b"\n" not in self.pending:
            if not select.select([self.answers], [], [], timeout)[0]:
                return None
            chunk = os.read(self.answers, 65536)
            if not chunk:
                self.broken = True
                raise RuntimeError(f"the fork server ended (exit {self.proc.poll()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, env: Dict[str, str], timeout: float, code: Optional[str] = None,
            script: Optional[str] = None, argv: List[str] = ()
            ) -> Optional[subprocess.CompletedProcess]:
        differs = {k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k)}
        if any(not k.startswith(("SPILL_", "PYTEST_")) for k in differs) or not self._start():
            return None
        args = [sys.executable, "-c", code] if script is None else [sys.executable, script, *argv]
        with tempfile.TemporaryDirectory() as tmp:
            outputs = {"stdout": os.path.join(tmp, "out"), "stderr": os.path.join(tmp, "err")}
            request = dict(env=env, cwd=os.getcwd(), **outputs,
                           **({"code": code} if script is None else
                              {"script": script, "argv": list(argv)}))
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            started = self._answer()
            if "refused" in started:
                return None
            ended = self._answer(timeout)
            if ended is None:
                os.kill(started["pid"], signal.SIGKILL)
            status = (ended or self._answer())["status"]
            text = {k: open(v, encoding="utf-8", errors="replace").read()
                    for k, v in outputs.items()}
        if ended is None:
            raise subprocess.TimeoutExpired(args, timeout, text["stdout"], text["stderr"])
        return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status),
                                           text["stdout"], text["stderr"])


if __name__ == "__main__":
    import torch  # noqa: F401  (what the children need first: imported once, here)
    import torch.nn  # noqa: F401
    import torch.nn.functional  # noqa: F401
    _request = serve(int(sys.argv[1]))
    become(_request)
    del serve, become, _threads
    if "script" in _request:
        import runpy
        sys.argv = [_request["script"], *_request["argv"]]
        sys.path[0] = os.path.dirname(os.path.abspath(_request["script"]))
        runpy.run_path(_request["script"], run_name="__main__")
    else:
        import types
        sys.argv = ["-c"]
        sys.path[0] = ""
        _main = types.ModuleType("__main__")
        sys.modules["__main__"] = _main
        exec(compile(_request["code"], "<string>", "exec"), _main.__dict__)

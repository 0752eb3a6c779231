"""Where the benchmark scripts write their results (bench_torch_bridge.py --json,
train_sweep.py --out, gpu/bench_torch_gpt2.py --json).

``check`` runs before the benchmark: a path that is a folder, or whose folder is missing or
not writable, stops the script at once with a message naming the option, not after minutes of
measuring (on a GPU, of a session's scarce time). ``write`` writes the text whole: into a
temporary beside the file, renamed over it, so that an interrupted or failed write keeps the
previous results (a path that is not a regular file, /dev/stdout or a FIFO, is written
directly)."""
from __future__ import annotations

import os
import sys


def check(path: str | None, option: str) -> None:
    if path is None:
        return
    if path == "":
        sys.exit(f"{option}: an empty path")
    if os.path.isdir(path):
        sys.exit(f"{option}: {path!r} is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        sys.exit(f"{option}: {path!r}: there is no folder {folder!r}")
    if os.path.exists(path) and not os.path.isfile(path):
        return  # (a stream: written directly)
    if not os.access(folder, os.W_OK | os.X_OK):
        sys.exit(f"{option}: {path!r}: the folder {folder!r} is not writable")


def write(path: str, text: str) -> None:
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "x", encoding="utf-8") as f:
            f.write(text)
        if os.path.exists(path):
            os.chmod(temporary, os.stat(path).st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise

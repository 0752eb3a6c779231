"""Where the benchmark scripts write their results (bench_torch_bridge.py --json,
train_sweep.py --out, gpu/bench_torch_gpt2.py --json).

``check`` runs before the benchmark: a path that is a folder, or whose folder is missing or
not writable, stops the script at once with a message naming the option, not after minutes of
measuring (on a GPU, of a session's scarce time). ``write`` writes the text whole, as spill's
own outputs are (spill._files: a temporary beside the file, renamed over it, so that an
interrupted or failed write keeps the previous results; /dev/stdout or a FIFO directly)."""
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
    # The package's writer (spill/_files.py, which needs no native library), imported here, at
    # the end, not with this module: importing it at the top put this repo's spill in the
    # modules of every bench process, children included, over the one the benchmark measures
    # (PYTHONPATH's, an installed one; review 39c). A spill imported already serves.
    if "spill" not in sys.modules:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "python"))
        try:
            import spill  # noqa: F401
        finally:
            sys.path.pop(0)
    from spill._files import write_text
    write_text(path, text)

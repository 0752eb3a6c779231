"""The spill command line for tests/python: SPILL_CLI (set by ctest), else build/spill."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess

import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parents[1] / "python") not in sys.path:  # the source package, uninstalled
    sys.path.insert(0, str(HERE.parents[1] / "python"))


def find_spill_cli():
    path = os.environ.get("SPILL_CLI")
    if path:
        return path
    built = HERE.parents[1] / "build" / "spill"
    return str(built) if built.exists() else None


def spill_cli() -> str:
    """The command's path; skips the calling test when it is not built."""
    path = find_spill_cli()
    if path is None:
        pytest.skip("the spill command is not built (set SPILL_CLI)")
    return path


def spill_plan(model, *args):
    """`spill plan MODEL ARGS --json`, parsed; skips when the command is not built."""
    cli = spill_cli()
    out = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"spill-plan-{os.getpid()}.json"
    run = subprocess.run([cli, "plan", model, *args, "--json", str(out)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr + run.stdout
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink()

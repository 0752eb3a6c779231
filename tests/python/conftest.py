"""Shared setup for the Python tests: the source package is importable without installing."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

PYTHON_DIR = pathlib.Path(__file__).resolve().parents[2] / "python"
if str(PYTHON_DIR) not in sys.path:
    sys.path.insert(0, str(PYTHON_DIR))


def run_python(code: str, env: dict | None = None,
               package_dir: pathlib.Path = PYTHON_DIR) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter (a clean import state) with the package found in
    `package_dir`; `env` entries set to None are removed from the environment."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(package_dir)
    full_env.update(env or {})
    for key, value in list(full_env.items()):
        if value is None:
            del full_env[key]
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def python_run():
    return run_python


@pytest.fixture
def package_copy(tmp_path):
    """A copy of the source package in an empty folder: no library beside it, no build tree."""
    dest = tmp_path / "pkg"
    shutil.copytree(PYTHON_DIR / "spill", dest / "spill",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dest


SIM_CONF = "device:sim,sim_capacity:512MiB,budget:32MiB,policy:lru"


@pytest.fixture
def sim():
    """A fresh session of spill on the simulated device (32 MiB budget), shut down after."""
    import spill
    spill.shutdown()
    spill.configure(SIM_CONF)
    yield spill
    spill.shutdown()

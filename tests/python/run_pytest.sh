#!/bin/sh
# ctest's entry to the Python tests: runs pytest on tests/python with the given interpreter.
# Skips (exit 77) with the reason when that interpreter or its pytest is missing; the
# environment (SPILL_LIBRARY, PYTHONPATH) comes from ctest.
# Usage: run_pytest.sh PYTHON [pytest args...]; SPILL_PYTEST_TARGET names a file or folder other
# than tests/python to run.
python=$1
shift
if ! command -v "$python" >/dev/null 2>&1; then
  echo "skip: no Python interpreter at $python (configure with -DSPILL_PYTHON=...)"
  exit 77
fi
if ! "$python" -c "import pytest" 2>/dev/null; then
  echo "skip: $python has no pytest (Debian: python3-pytest; scripts/setup.sh installs it)"
  exit 77
fi
echo "python: $python ($("$python" -c 'import sys, pytest; print(sys.version.split()[0], "pytest", pytest.__version__)'))"
exec "$python" -m pytest -q -rs -p no:cacheprovider "${SPILL_PYTEST_TARGET:-$(dirname "$0")}" "$@"

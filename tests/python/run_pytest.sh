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
# Torch's and OpenBLAS's own thread pools get one thread each unless the caller chose
# (SPILL_PYTEST_THREADS, or OMP_NUM_THREADS / OPENBLAS_NUM_THREADS themselves): ctest runs two
# suites at once on CI's two cores, where a second thread per suite only contends (the torch
# modules and configs suites, side by side: 21% less CPU and 17% less time with one thread;
# AMD EPYC, 2 cores, 2026-12-07). python_torch_copies keeps two, so that torch's intra-op
# threads reading spill's memory stay tested.
threads=${SPILL_PYTEST_THREADS:-1}
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-$threads}"
# glibc's malloc in 2 MiB pages where it maps memory (glibc 2.35+; older ones ignore it): the
# plain-torch runs the tests compare with allocate and free large tensors with mmap, and on a
# virtual machine each first touch of a 4 KiB page after a mapping change is several
# microseconds (the plain mlp's 6 steps: 2.4 -> 0.6 s; AMD EPYC VM, 2026-12-07). Added to
# any tunables the caller set, unless they choose hugetlb themselves.
case ":${GLIBC_TUNABLES:-}" in
  *:glibc.malloc.hugetlb=*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
esac
echo "python: $python ($("$python" -c 'import sys, pytest; print(sys.version.split()[0], "pytest", pytest.__version__)')), threads: OMP $OMP_NUM_THREADS, OpenBLAS $OPENBLAS_NUM_THREADS"
exec "$python" -m pytest -q -rs -p no:cacheprovider "${SPILL_PYTEST_TARGET:-$(dirname "$0")}" "$@"

#!/usr/bin/env bash
# The README's test command: installs what is missing, builds everything (CUDA sources
# included) and runs every test. GPU tests run when a GPU is usable and skip with a reason
# otherwise.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
cd "${SPILL_BUILD_DIR:-$root/build}"
ctest --output-on-failure -j "${SPILL_JOBS:-$(nproc)}" "$@"

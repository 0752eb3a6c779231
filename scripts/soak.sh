#!/usr/bin/env bash
# The swapper's integrity soak: a million random operations per seed (default seeds 1,2,3)
# from 4 threads under chaos, every read checked. Takes a long time; not part of CI.
# Usage: scripts/soak.sh [ops-per-seed] [seeds]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh" tests/test_swapper
SPILL_FUZZ_OPS=${1:-1000000} SPILL_FUZZ_SEEDS=${2:-1,2,3} \
  "${SPILL_BUILD_DIR:-$root/build}/tests/test_swapper" --gtest_filter='Fuzz*'

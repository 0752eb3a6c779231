#!/usr/bin/env bash
# The integrity soaks: a million random operations per seed (default seeds 1,2,3) from 4
# threads under chaos, every read checked: the swapper's own fuzz, then the C API's (malloc,
# free, pins held across frees, declarations, hints through spill/spill.h). Takes a long time;
# not part of CI.
# Usage: scripts/soak.sh [ops-per-seed] [seeds]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh" tests/test_swapper tests/c/test_c_fuzz
build=${SPILL_BUILD_DIR:-$root/build}
export SPILL_FUZZ_OPS=${1:-1000000} SPILL_FUZZ_SEEDS=${2:-1,2,3}
"$build/tests/test_swapper" --gtest_filter='Fuzz*'
"$build/tests/c/test_c_fuzz" four_threads_random_operations

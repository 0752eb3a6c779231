#!/usr/bin/env bash
# Configures and builds spill into build/ (or $SPILL_BUILD_DIR). Extra arguments are targets.
# Environment: SPILL_BUILD_DIR, SPILL_BUILD_TYPE (default RelWithDebInfo), SPILL_CMAKE_ARGS,
# SPILL_JOBS (default: number of cores).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SPILL_BUILD_DIR:-$root/build}
jobs=${SPILL_JOBS:-$(nproc)}
# shellcheck disable=SC2086
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE="${SPILL_BUILD_TYPE:-RelWithDebInfo}" \
  ${SPILL_CMAKE_ARGS:-} >/dev/null
if (($#)); then
  cmake --build "$build" -j "$jobs" --target "$@"
else
  cmake --build "$build" -j "$jobs"
fi

#!/usr/bin/env bash
# The README's main-job command: installs what is missing, builds the `spill` command and runs
# the main job on the default device (a GPU when one is usable, else the simulated device):
# `spill info`, then `spill demo` (a training step three times larger than the budget, swapped
# through pinned host memory, recorded then planned, every block checked). Arguments are
# passed to `spill demo` (e.g. --budget 1GiB --trace demo.json).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh" spill-cli
spill="${SPILL_BUILD_DIR:-$root/build}/spill"
"$spill" info
echo
"$spill" demo "$@"

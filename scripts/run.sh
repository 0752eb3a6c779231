#!/usr/bin/env bash
# The README's main-job command: installs what is missing, builds the `spill` command and runs
# the main job on the default device (a GPU when one is usable, else the simulated device).
# Arguments are passed to the main job.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh" spill-cli
spill="${SPILL_BUILD_DIR:-$root/build}/spill"
"$spill" info
echo
"$spill" device-check "$@"

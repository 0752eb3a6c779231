#!/usr/bin/env bash
# The README's main-job command: installs what is missing, builds the `spill` command and runs
# the main job on the default device (a GPU when one is usable, else the simulated device):
# `spill info`, then `spill train gpt-mini --check --steps 6`: a GPT-style decoder trained with real
# kernels in a third of its memory footprint, weights, optimizer state and activations swapped
# through pinned host memory (or activations remade by running their op again) as the graph
# planner's plan says, with the planner's predictions
# beside each step; then the same steps again with nothing swapped, which must give bit-identical
# losses, weights and optimizer state (6 steps each: 12.9 s of CPU, 12.7 s of wall clock, on the
# 2-core build machine at a load average of 2.1-2.5; about 20 s of CPU and 30 s of wall at a
# load average of 4; both measured 2026-12-07; docs/BENCHMARKS.md).
# Arguments are passed to `spill train` (e.g. --steps 20, --policy plan, --budget 96MiB,
# --trace train.json). `spill demo` (the synthetic step) is
# still a command.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh" spill-cli
spill="${SPILL_BUILD_DIR:-$root/build}/spill"
"$spill" info
echo
"$spill" train gpt-mini --check --steps 6 "$@"

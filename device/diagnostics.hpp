// Self-checks of a Device that both `spill device-check` and the tests run.
#pragma once

#include <cstddef>

#include "device/device.hpp"

namespace spill {

// Runs `trials` rounds in which a writer stream copies a fresh pattern into a device buffer and
// a reader stream copies the buffer back, joined to the writer by an event only when `join`.
// Returns how many rounds the reader saw anything but what was written. Correct (joined) code
// must give 0 on every backend; without the join, chaos mode should expose stale reads.
int count_stale_reads(Device& device, int trials, bool join, std::size_t bytes = 1u << 20);

}  // namespace spill

// GPU versions of core/pattern.hpp: fill and check device memory in place, so GPU tests and
// the link benchmark can verify data without a round trip through the host.
#pragma once

#include <cstddef>
#include <cstdint>

#include "device/device.hpp"

namespace spill::kernels {

// Enqueues a fill of `bytes` at device address `dst` with the pattern of `seed` (CUDA only).
void fill_pattern_async(void* dst, std::size_t bytes, std::uint64_t seed, Stream stream);

// Counts 8-byte words that differ from the pattern; synchronises `stream` (CUDA only).
std::uint64_t count_pattern_mismatches(const void* src, std::size_t bytes, std::uint64_t seed,
                                       Stream stream);

}  // namespace spill::kernels

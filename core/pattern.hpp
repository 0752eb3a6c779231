// Data patterns for integrity checks: a byte sequence determined by (seed, offset) that is
// never all zeros, so a copy that silently did nothing is caught.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define SPILL_HOST_DEVICE __host__ __device__
#else
#define SPILL_HOST_DEVICE
#endif

namespace spill {

// The pattern's 8-byte word at word index `i` (also callable from CUDA kernels).
SPILL_HOST_DEVICE constexpr std::uint64_t pattern_word(std::uint64_t seed, std::uint64_t i) {
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + i + 1;
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x | 1;  // never zero
}

// Fills `bytes` at `dst` with the pattern (a trailing partial word is filled bytewise).
void fill_pattern(void* dst, std::size_t bytes, std::uint64_t seed);

// Returns the offset of the first byte that differs from the pattern, or `bytes` if none.
std::size_t find_pattern_mismatch(const void* src, std::size_t bytes, std::uint64_t seed);

}  // namespace spill

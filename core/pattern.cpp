#include "core/pattern.hpp"

#include <cstring>

namespace spill {

void fill_pattern(void* dst, std::size_t bytes, std::uint64_t seed) {
  auto* out = static_cast<unsigned char*>(dst);
  std::size_t words = bytes / 8;
  for (std::size_t i = 0; i < words; ++i) {
    std::uint64_t w = pattern_word(seed, i);
    std::memcpy(out + i * 8, &w, 8);
  }
  std::uint64_t last = pattern_word(seed, words);
  std::memcpy(out + words * 8, &last, bytes - words * 8);
}

std::size_t find_pattern_mismatch(const void* src, std::size_t bytes, std::uint64_t seed) {
  const auto* in = static_cast<const unsigned char*>(src);
  std::size_t words = bytes / 8;
  for (std::size_t i = 0; i < words; ++i) {
    std::uint64_t w = pattern_word(seed, i), got;
    std::memcpy(&got, in + i * 8, 8);
    if (got != w) {
      for (std::size_t b = 0; b < 8; ++b)
        if (in[i * 8 + b] != reinterpret_cast<const unsigned char*>(&w)[b]) return i * 8 + b;
    }
  }
  std::uint64_t last = pattern_word(seed, words);
  for (std::size_t b = 0; b < bytes - words * 8; ++b)
    if (in[words * 8 + b] != reinterpret_cast<const unsigned char*>(&last)[b]) return words * 8 + b;
  return bytes;
}

}  // namespace spill

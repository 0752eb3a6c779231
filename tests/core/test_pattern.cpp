#include <gtest/gtest.h>

#include <vector>

#include "core/pattern.hpp"

namespace spill {
namespace {

TEST(Pattern, IsNeverZeroAndDependsOnSeed) {
  std::vector<unsigned char> a(1001), b(1001);
  fill_pattern(a.data(), a.size(), 1);
  fill_pattern(b.data(), b.size(), 2);
  EXPECT_NE(a, b);
  for (std::uint64_t i = 0; i < 1000; ++i) EXPECT_NE(pattern_word(7, i), 0u);
}

TEST(Pattern, FindsTheFirstMismatch) {
  std::vector<unsigned char> a(1003);
  fill_pattern(a.data(), a.size(), 5);
  EXPECT_EQ(find_pattern_mismatch(a.data(), a.size(), 5), a.size());
  a[517] ^= 1;
  EXPECT_EQ(find_pattern_mismatch(a.data(), a.size(), 5), 517u);
  a[517] ^= 1;
  a[1002] ^= 0x80;  // the trailing partial word is checked too
  EXPECT_EQ(find_pattern_mismatch(a.data(), a.size(), 5), 1002u);
}

}  // namespace
}  // namespace spill

// Overflow-checked arithmetic for the quantities spill adds and multiplies: sizes, element
// counts, FLOPs and times. Every sum or product of values that came from a file, an option or a
// model shape goes through these, so an absurd input ends in an error naming the quantity
// instead of a wrapped figure. Sizes are bounded by kMaxBytes (2^63 - 1) everywhere, so that any
// size also fits the signed arithmetic of liveness curves and budgets.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

namespace spill {

// The largest byte count spill accepts anywhere: 2^63 - 1 (8 EiB less one byte).
inline constexpr std::uint64_t kMaxBytes =
    static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());

// a + b and a * b, or nothing when the result passes `limit`.
constexpr std::optional<std::uint64_t> add_within(std::uint64_t a, std::uint64_t b,
                                                  std::uint64_t limit = kMaxBytes) {
  std::uint64_t r = 0;
  if (__builtin_add_overflow(a, b, &r) || r > limit) return std::nullopt;
  return r;
}
constexpr std::optional<std::uint64_t> mul_within(std::uint64_t a, std::uint64_t b,
                                                  std::uint64_t limit = kMaxBytes) {
  std::uint64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r) || r > limit) return std::nullopt;
  return r;
}

// a + b and a * b, clamped to `limit` (for figures that are only ever compared or printed).
constexpr std::uint64_t saturating_add(
    std::uint64_t a, std::uint64_t b,
    std::uint64_t limit = std::numeric_limits<std::uint64_t>::max()) {
  auto r = add_within(a, b, limit);
  return r ? *r : limit;
}
constexpr std::uint64_t saturating_mul(
    std::uint64_t a, std::uint64_t b,
    std::uint64_t limit = std::numeric_limits<std::uint64_t>::max()) {
  auto r = mul_within(a, b, limit);
  return r ? *r : limit;
}

// How a limit reads in messages: "2^63 - 1" for kMaxBytes, "2^64 - 1" for the uint64 maximum,
// else the number.
std::string limit_name(std::uint64_t limit);

// a + b / a * b, or throws InvalidArgument: "<what>: <a> + <b> passes <limit>".
std::uint64_t checked_add(std::uint64_t a, std::uint64_t b, std::string_view what,
                          std::uint64_t limit = kMaxBytes);
std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, std::string_view what,
                          std::uint64_t limit = kMaxBytes);

// Signed a + b for running totals (memory counters); throws InvalidArgument naming `what` when
// the total leaves the int64 range.
std::int64_t checked_add_signed(std::int64_t a, std::int64_t b, std::string_view what);

// `v` when it is finite and within [lo, hi]; else throws InvalidArgument naming `what`.
double checked_number(double v, double lo, double hi, std::string_view what);

}  // namespace spill

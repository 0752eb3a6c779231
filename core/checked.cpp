#include "core/checked.hpp"

#include <cmath>
#include <cstdio>

#include "core/errors.hpp"

namespace spill {

std::string limit_name(std::uint64_t limit) {
  if (limit == kMaxBytes) return "2^63 - 1";
  if (limit == std::numeric_limits<std::uint64_t>::max()) return "2^64 - 1";
  return std::to_string(limit);
}

std::uint64_t checked_add(std::uint64_t a, std::uint64_t b, std::string_view what,
                          std::uint64_t limit) {
  if (auto r = add_within(a, b, limit)) return *r;
  throw InvalidArgument(std::string(what) + ": " + std::to_string(a) + " + " + std::to_string(b) +
                        " passes " + limit_name(limit));
}

std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, std::string_view what,
                          std::uint64_t limit) {
  if (auto r = mul_within(a, b, limit)) return *r;
  throw InvalidArgument(std::string(what) + ": " + std::to_string(a) + " x " + std::to_string(b) +
                        " passes " + limit_name(limit));
}

std::int64_t checked_add_signed(std::int64_t a, std::int64_t b, std::string_view what) {
  std::int64_t r = 0;
  if (!__builtin_add_overflow(a, b, &r)) return r;
  throw InvalidArgument(std::string(what) + ": " + std::to_string(a) + " + " + std::to_string(b) +
                        " leaves the range of a signed 64-bit total");
}

double checked_number(double v, double lo, double hi, std::string_view what) {
  if (std::isfinite(v) && v >= lo && v <= hi) return v;
  char buf[160];
  std::snprintf(buf, sizeof buf, ": %.17g is not a finite number in [%.17g, %.17g]", v, lo, hi);
  throw InvalidArgument(std::string(what) + buf);
}

}  // namespace spill

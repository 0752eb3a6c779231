#include "core/units.hpp"

#include <array>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>

#include "core/checked.hpp"
#include "core/errors.hpp"

namespace spill {
namespace {

struct Unit {
  std::string_view name;
  std::uint64_t factor;
};

constexpr std::uint64_t kKB = 1000;
constexpr std::array<Unit, 14> kUnits{{{"B", 1},
                                       {"KiB", KiB},
                                       {"MiB", MiB},
                                       {"GiB", GiB},
                                       {"TiB", TiB},
                                       {"PiB", 1024 * TiB},
                                       {"EiB", 1024 * 1024 * TiB},
                                       {"KB", kKB},
                                       {"MB", kKB * kKB},
                                       {"GB", kKB * kKB * kKB},
                                       {"TB", kKB * kKB * kKB * kKB},
                                       {"PB", kKB * kKB * kKB * kKB * kKB},
                                       {"EB", kKB * kKB * kKB * kKB * kKB * kKB},
                                       {"", 1}}};

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

bool iequal(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) !=
        std::tolower(static_cast<unsigned char>(b[i])))
      return false;
  }
  return true;
}

std::string quoted(std::string_view s) { return "'" + excerpt(s) + "'"; }

}  // namespace

double parse_number(std::string_view text, std::string_view what) {
  std::string_view t = trim(text);
  SPILL_EXPECTS(!t.empty(), std::string(what) + ": expected a number, got nothing");
  double value = 0;
  auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), value);
  SPILL_EXPECTS(ec == std::errc() && end == t.data() + t.size() && std::isfinite(value),
                std::string(what) + ": " + quoted(t) + " is not a number");
  SPILL_EXPECTS(value >= 0, std::string(what) + ": " + quoted(t) + " must not be negative");
  return value;
}

std::uint64_t parse_uint(std::string_view text, std::string_view what) {
  std::string_view t = trim(text);
  std::uint64_t value = 0;
  auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), value);
  SPILL_EXPECTS(!t.empty() && ec == std::errc() && end == t.data() + t.size(),
                std::string(what) + ": " + quoted(t) + " is not a non-negative integer");
  return value;
}

std::uint64_t parse_size(std::string_view text, std::string_view what) {
  std::string_view t = trim(text);
  SPILL_EXPECTS(!t.empty(), std::string(what) + ": expected a size such as 8GiB, got nothing");
  SPILL_EXPECTS(t.front() != '-', std::string(what) + ": " + quoted(t) + " must not be negative");
  std::size_t split = 0;
  while (split < t.size() &&
         (std::isdigit(static_cast<unsigned char>(t[split])) || t[split] == '.'))
    ++split;
  std::string_view number = t.substr(0, split);
  std::string_view unit = trim(t.substr(split));
  SPILL_EXPECTS(!number.empty(), std::string(what) + ": " + quoted(t) +
                                     " does not start with a number (expected e.g. 512MiB)");
  const Unit* found = nullptr;
  for (const Unit& u : kUnits) {
    // Units are matched case-insensitively ("gib", "gb"; "b" = bytes)...
    if (iequal(unit, u.name)) {
      found = &u;
      break;
    }
  }
  SPILL_EXPECTS(found != nullptr,
                std::string(what) + ": unknown unit " + quoted(unit) + " in " + quoted(t) +
                    " (use B, KiB, MiB, GiB, TiB, PiB, EiB, or decimal KB, MB, GB, TB, PB, EB)");
  // ... except a capital prefix before a small b ("Gb", "Mib"): that is how bits are written
  // (a "1Gb" budget read as gigabytes or as bytes would be silently wrong either way).
  const bool capital_prefix = unit.size() > 1 && std::isupper(static_cast<unsigned char>(unit[0]));
  SPILL_EXPECTS(!(capital_prefix && unit.back() == 'b'),
                std::string(what) + ": " + quoted(t) + ": '" + std::string(unit) +
                    "' reads as bits; sizes are in bytes: write " + std::string(number) +
                    std::string(unit.substr(0, unit.size() - 1)) + "B");
  const std::string too_large = std::string(what) + ": " + quoted(t) +
                                " is too large (sizes are limited to 2^63 - 1 bytes, 8 EiB)";
  if (number.find('.') == std::string_view::npos) {
    std::uint64_t n = 0;
    auto [end, ec] = std::from_chars(number.data(), number.data() + number.size(), n);
    SPILL_EXPECTS(ec == std::errc() && end == number.data() + number.size(), too_large);
    auto bytes = mul_within(n, found->factor);
    SPILL_EXPECTS(bytes, too_large);
    return *bytes;
  }
  double v = parse_number(number, what);
  SPILL_EXPECTS(found->factor > 1 || v == std::floor(v),
                std::string(what) + ": " + quoted(t) + " is not a whole number of bytes");
  // Exact enough: a double holds 53 bits, and sizes with a fraction are rounded to bytes.
  long double bytes = std::roundl(static_cast<long double>(v) * found->factor);
  SPILL_EXPECTS(bytes < std::ldexp(1.0L, 63), too_large);  // an integer, so <= 2^63 - 1
  SPILL_EXPECTS(v == 0 || bytes > 0,
                std::string(what) + ": " + quoted(t) + " is less than a byte");
  return static_cast<std::uint64_t>(bytes);
}

std::string format_address(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

std::string format_bytes(std::uint64_t bytes) {
  // Up to EiB, as parse_size reads ("4194304.00 TiB" for 4 EiB before; audit 41b #12).
  static constexpr std::array<const char*, 7> names{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < KiB) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes);
  std::size_t i = 0;
  while (v >= 1024.0 && i + 1 < names.size()) {
    v /= 1024.0;
    ++i;
  }
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.2f %s", v, names[i]);
  return buf;
}

}  // namespace spill

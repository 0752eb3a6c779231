#include "core/errors.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace spill {

std::string excerpt(std::string_view text, std::size_t max) {
  if (text.size() <= max) return std::string(text);
  return std::string(text.substr(0, max)) + "... (" + std::to_string(text.size()) + " characters)";
}

std::string without_source_location(std::string_view message) {
  const std::size_t open = message.rfind(" [");
  if (open == std::string_view::npos || !message.ends_with(']')) return std::string(message);
  const std::string_view inside = message.substr(open + 2, message.size() - open - 3);
  const std::size_t colon = inside.rfind(':');
  if (colon == std::string_view::npos || colon + 1 == inside.size()) return std::string(message);
  const std::string_view file = inside.substr(0, colon), line = inside.substr(colon + 1);
  const bool digits = line.find_first_not_of("0123456789") == std::string_view::npos;
  const bool source = file.ends_with(".cpp") || file.ends_with(".hpp") || file.ends_with(".cu");
  const bool plain = file.find_first_of(" /[]") == std::string_view::npos;
  if (!digits || !source || !plain) return std::string(message);
  return std::string(message.substr(0, open));
}

std::string printable(std::string_view message) {
  std::string out;
  out.reserve(message.size());
  for (const char c : message) {
    const auto u = static_cast<unsigned char>(c);
    if ((u < 0x20 && c != '\n' && c != '\t') || u == 0x7f) {
      char hex[5];
      std::snprintf(hex, sizeof hex, "\\x%02x", u);
      out += hex;
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace spill

namespace spill::detail {

std::string where(const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
}

void throw_invalid(const char* file, int line, const std::string& msg) {
  throw InvalidArgument(msg + " [" + where(file, line) + "]");
}

void throw_oom(const char* file, int line, const std::string& msg) {
  throw OutOfMemory(msg + " [" + where(file, line) + "]");
}

void throw_host_cap(const char* file, int line, const std::string& msg) {
  throw HostCapExceeded(msg + " [" + where(file, line) + "]");
}

void assert_fail(const char* file, int line, const char* cond, const char* msg) noexcept {
  std::fprintf(stderr, "spill: assertion `%s` failed at %s: %s\n", cond, where(file, line).c_str(),
               msg);
  std::abort();
}

}  // namespace spill::detail

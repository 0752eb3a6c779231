#include "core/errors.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace spill {

std::string excerpt(std::string_view text, std::size_t max) {
  if (text.size() <= max) return std::string(text);
  return std::string(text.substr(0, max)) + "... (" + std::to_string(text.size()) + " characters)";
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

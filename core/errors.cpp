#include "core/errors.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace spill {

std::string excerpt(std::string_view text, std::size_t max) {
  if (text.size() <= max) return std::string(text);
  return std::string(text.substr(0, max)) + "... (" + std::to_string(text.size()) + " bytes)";
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

std::string with_more(std::string_view message, std::string_view more) {
  const std::string bare = without_source_location(message);
  return bare + std::string(more) + std::string(message.substr(bare.size()));
}

namespace {

std::string escaped(std::string_view message, bool keep_lines) {
  std::string out;
  out.reserve(message.size());
  auto escape = [&out](std::string_view bytes) {
    for (const char c : bytes) {
      char hex[5];
      std::snprintf(hex, sizeof hex, "\\x%02x", static_cast<unsigned char>(c));
      out += hex;
    }
  };
  for (std::size_t i = 0; i < message.size();) {
    const auto u = static_cast<unsigned char>(message[i]);
    if (u < 0x80) {  // ASCII: C0 controls and DEL escaped (newline and tab as keep_lines says)
      const bool line = u == '\n' || u == '\t';
      if ((u < 0x20 && !(keep_lines && line)) || u == 0x7f) escape(message.substr(i, 1));
      else out += message[i];
      ++i;
      continue;
    }
    // A UTF-8 sequence is kept whole, unless it encodes a C1 control (U+0080..U+009F, which
    // some terminals obey as ESC sequences); a byte that starts no valid sequence (0x9b alone
    // is CSI on a terminal not in UTF-8 mode) is escaped.
    const std::size_t n = u >= 0xf0 && u < 0xf5   ? 4
                          : u >= 0xe0 && u < 0xf0 ? 3
                          : u >= 0xc2 && u < 0xe0 ? 2
                                                  : 0;
    bool valid = n > 0 && i + n <= message.size();
    for (std::size_t k = 1; valid && k < n; ++k)
      valid = (static_cast<unsigned char>(message[i + k]) & 0xc0) == 0x80;
    const std::size_t take = valid ? n : 1;
    if (valid && !(u == 0xc2 && static_cast<unsigned char>(message[i + 1]) < 0xa0))
      out.append(message.substr(i, take));
    else
      escape(message.substr(i, take));  // (a C1 control: both of its bytes)
    i += take;
  }
  return out;
}

}  // namespace

std::string printable(std::string_view message) { return escaped(message, true); }

std::string printable_name(std::string_view name) { return escaped(name, false); }

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

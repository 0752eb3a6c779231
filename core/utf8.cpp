#include "core/utf8.hpp"

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "core/errors.hpp"

namespace spill {

std::size_t invalid_utf8_at(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    std::size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // past U+10FFFF
    } else {
      return i;  // a continuation byte first, an overlong C0/C1 lead, or F5..FF
    }
    if (i + len > n) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
    i += len;
  }
  return std::string_view::npos;
}

void expect_utf8(std::string_view text, std::string_view name) {
  const std::size_t at = invalid_utf8_at(text);
  if (at == std::string_view::npos) return;
  char byte[8];
  std::snprintf(byte, sizeof byte, "0x%02x", static_cast<unsigned char>(text[at]));
  throw InvalidArgument(std::string(name) + " is not valid UTF-8 (byte " + byte + " at offset " +
                        std::to_string(at) + " of " + std::to_string(text.size()) + " bytes)");
}

std::string_view kept_name(const char* text, std::size_t max, std::string_view what) {
  if (text == nullptr) return {};
  const std::string_view kept = utf8_prefix(std::string_view(text, strnlen(text, max + 1)), max);
  expect_utf8(kept, what);
  return kept;
}

std::string_view utf8_prefix(std::string_view text, std::size_t max) {
  if (text.size() <= max) return text;
  std::size_t cut = max;
  // Back off over continuation bytes to the start of the character that the cut splits.
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return text.substr(0, cut);
}

}  // namespace spill

// UTF-8 checks for caller text that spill writes into JSON or hands back as strings (op names,
// OOM notes): the JSON writer refuses invalid UTF-8 and Python decodes strictly, so bad bytes
// are refused where they come in, naming the argument, rather than failing far from the cause.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace spill {

// The offset of the first byte of `text` that does not start or continue a well-formed UTF-8
// character (RFC 3629: no overlong forms, surrogates or code points past U+10FFFF), or npos.
std::size_t invalid_utf8_at(std::string_view text);

// Throws InvalidArgument "<name> is not valid UTF-8 (byte 0xff at offset 3 of 12 bytes)"
// unless `text` is valid UTF-8 (the caller's context goes before it).
void expect_utf8(std::string_view text, std::string_view name);

// The longest prefix of `text` of at most `max` bytes that does not end inside a character
// (a cut at `max` bytes that keeps the text decodable).
std::string_view utf8_prefix(std::string_view text, std::size_t max);

// A caller's C string kept as a name: NULL is "", a longer one is cut at `max` bytes (before a
// character the cut would split), then checked as expect_utf8(kept, what). Reads at most
// max + 1 bytes of `text`.
std::string_view kept_name(const char* text, std::size_t max, std::string_view what);

}  // namespace spill

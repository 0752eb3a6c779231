// Byte sizes as people write them ("8GiB", "1.5 MB", "4096") and back.
// Binary units (KiB..EiB) are powers of 1024, decimal ones (KB..EB) powers of 1000, in any case
// except a capital prefix before a small b ("Gb": bits, refused).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace spill {

inline constexpr std::uint64_t KiB = 1024ull;
inline constexpr std::uint64_t MiB = 1024ull * KiB;
inline constexpr std::uint64_t GiB = 1024ull * MiB;
inline constexpr std::uint64_t TiB = 1024ull * GiB;

// Parses a size; `what` names the input in the error (e.g. "budget").
// Throws InvalidArgument for empty, negative, malformed or unknown-unit input, and for a size
// above 2^63 - 1 bytes (kMaxBytes, core/checked.hpp), the bound of every size in spill.
std::uint64_t parse_size(std::string_view text, std::string_view what = "size");

// Formats with the largest binary unit that keeps the number >= 1, e.g. "1.50 GiB", "512 B".
std::string format_bytes(std::uint64_t bytes);

// A pointer as people read it in messages, e.g. "0x7f3a00000000".
std::string format_address(const void* p);

// Parses a non-negative decimal number (used for bandwidths, scales, probabilities).
double parse_number(std::string_view text, std::string_view what);

// Parses a non-negative integer that fits in 64 bits.
std::uint64_t parse_uint(std::string_view text, std::string_view what);

}  // namespace spill

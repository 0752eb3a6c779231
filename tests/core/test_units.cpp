#include <gtest/gtest.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"

namespace spill {
namespace {

// parse_size(text, what) refuses `text` with a message that contains every one of `mentions`.
void expect_refused(const std::string& text, const char* what,
                    std::initializer_list<std::string> mentions) {
  SCOPED_TRACE(text.substr(0, 40));
  try {
    const std::uint64_t bytes = parse_size(text, what);
    ADD_FAILURE() << "accepted '" << text.substr(0, 40) << "' as " << bytes;
  } catch (const InvalidArgument& e) {
    const std::string message = e.what();
    for (const std::string& m : mentions) EXPECT_NE(message.find(m), std::string::npos) << message;
  }
}

TEST(ParseSize, AcceptsBinaryDecimalAndPlainBytes) {
  EXPECT_EQ(parse_size("4096"), 4096u);
  EXPECT_EQ(parse_size("12B"), 12u);
  EXPECT_EQ(parse_size("1KiB"), 1024u);
  EXPECT_EQ(parse_size("8GiB"), 8ull << 30);
  EXPECT_EQ(parse_size("2TiB"), 2ull << 40);
  EXPECT_EQ(parse_size("1KB"), 1000u);
  EXPECT_EQ(parse_size("3MB"), 3000000u);
  EXPECT_EQ(parse_size("16GB"), 16000000000ull);
  EXPECT_EQ(parse_size("1.5GiB"), 3ull << 29);
  EXPECT_EQ(parse_size(" 512 MiB "), 512ull << 20);
  EXPECT_EQ(parse_size("64gib"), 64ull << 30) << "units are case-insensitive";
  EXPECT_EQ(parse_size("0"), 0u);
  EXPECT_EQ(parse_size("1PiB"), 1ull << 50);
  EXPECT_EQ(parse_size("7EiB"), 7ull << 60);
  EXPECT_EQ(parse_size("2PB"), 2000000000000000ull);
  EXPECT_EQ(parse_size("9EB"), 9000000000000000000ull);
  EXPECT_EQ(parse_size("1kB"), 1000u);
  EXPECT_EQ(parse_size("1gb"), 1000000000u) << "all small: bytes, as documented";
  EXPECT_EQ(parse_size("0.5KiB"), 512u);
}

// A capital prefix before a small b is how bits are written ("1Gb" of a link, "Mib"): refused
// with the size to write instead, never read as bytes (audit 37b L6: "--budget 1Gb" was a
// budget of 1e9 bytes). A fraction of a byte is refused rather than rounded.
TEST(ParseSize, RefusesBitsAndFractionsOfAByte) {
  for (auto [bad, hint] : {std::pair{"1Gb", "write 1GB"}, std::pair{"64Mb", "write 64MB"},
                           std::pair{"2 Kib", "write 2KiB"}, std::pair{"3TIb", "write 3TIB"}})
    expect_refused(bad, "--budget", {"--budget", "reads as bits", hint});
  for (const char* bad : {"0.1B", "1.9999999999B", "1.5", "0.5b"})
    expect_refused(bad, "swap_threshold", {"not a whole number of bytes"});
  EXPECT_EQ(parse_size("2.0B"), 2u);
  for (const char* tiny : {"0.0004KB", "0.0001KiB"})  // rounded to 0 B before
    expect_refused(tiny, "budget", {"less than a byte"});
  EXPECT_EQ(parse_size("0.0KiB"), 0u);
}

TEST(ParseSize, RejectsMalformedInputNamingIt) {
  for (const char* bad : {"", "GiB", "-1GiB", "8XB", "1.2.3MiB", "8 GiB extra", "1e3",
                          "99999999999999999999", "20000000TiB", "0x10", "8ZiB", "8bit"})
    expect_refused(bad, "budget", {"budget"});
}

TEST(ParseSize, SizesStopAt2To63BytesAndFractionsDoNotWrap) {
  EXPECT_EQ(parse_size("9223372036854775807B"), kMaxBytes);
  EXPECT_EQ(parse_size("8388607TiB"), 8388607ull << 40);
  EXPECT_EQ(parse_size("8388607.5TiB"), (8388607ull << 40) + (1ull << 39));
  for (const char* bad : {"9223372036854775808B", "8388608TiB", "9000000.5TiB", "9000000TiB",
                          "18446744073709551615", "16777216TiB", "99999999999999999999.5KiB",
                          "8EiB", "19EB"})
    expect_refused(bad, "--budget", {"--budget", "too large"});
  // A long input is quoted in part only.
  try {
    parse_size(std::string(100000, '7') + "XB", "size");
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_LT(std::string(e.what()).size(), 400u);
  }
}

TEST(FormatBytes, PicksTheLargestUnit) {
  EXPECT_EQ(format_bytes(0), "0 B");
  EXPECT_EQ(format_bytes(1023), "1023 B");
  EXPECT_EQ(format_bytes(1024), "1.00 KiB");
  EXPECT_EQ(format_bytes(3ull << 29), "1.50 GiB");
  EXPECT_EQ(format_bytes(5ull << 40), "5.00 TiB");
  // Past TiB, as parse_size reads them: 4 EiB was "4194304.00 TiB" (audit 41b #12).
  EXPECT_EQ(format_bytes(3ull << 49), "1.50 PiB");
  EXPECT_EQ(format_bytes(4ull << 60), "4.00 EiB");
  EXPECT_EQ(format_bytes(UINT64_MAX), "16.00 EiB");
}

TEST(ParseNumber, RejectsNegativeAndGarbage) {
  EXPECT_DOUBLE_EQ(parse_number("0.25", "x"), 0.25);
  EXPECT_THROW(parse_number("-1", "x"), InvalidArgument);
  EXPECT_THROW(parse_number("abc", "x"), InvalidArgument);
  EXPECT_THROW(parse_number("nan", "x"), InvalidArgument);
  EXPECT_THROW(parse_uint("1.5", "x"), InvalidArgument);
}

}  // namespace
}  // namespace spill

#include <gtest/gtest.h>

#include <string>

#include "core/errors.hpp"
#include "core/utf8.hpp"

namespace spill {
namespace {

constexpr auto npos = std::string_view::npos;

TEST(Utf8, WellFormedTextPasses) {
  EXPECT_EQ(invalid_utf8_at(""), npos);
  EXPECT_EQ(invalid_utf8_at("conv1.weight"), npos);
  EXPECT_EQ(invalid_utf8_at("entr\xc3\xa9" "e \xe2\x86\x92 \xf0\x9f\x94\xa5"), npos);
  EXPECT_EQ(invalid_utf8_at("\xf4\x8f\xbf\xbf"), npos);  // U+10FFFF
}

TEST(Utf8, BadBytesAreFoundWhereTheyStart) {
  EXPECT_EQ(invalid_utf8_at("bad\xff\xfename"), 3u);
  EXPECT_EQ(invalid_utf8_at("cut \xc3"), 4u);              // a character cut off at the end
  EXPECT_EQ(invalid_utf8_at("ab\x80"), 2u);                 // a continuation byte alone
  EXPECT_EQ(invalid_utf8_at("\xc0\xaf"), 0u);               // overlong '/'
  EXPECT_EQ(invalid_utf8_at("\xe0\x80\xaf"), 0u);           // overlong, three bytes
  EXPECT_EQ(invalid_utf8_at("x\xed\xa0\x80"), 1u);          // a surrogate
  EXPECT_EQ(invalid_utf8_at("\xf4\x90\x80\x80"), 0u);       // past U+10FFFF
  EXPECT_EQ(invalid_utf8_at("\xe2\x86x"), 0u);              // a bad continuation
}

TEST(Utf8, ExpectUtf8NamesTheArgumentAndTheByte) {
  EXPECT_NO_THROW(expect_utf8("fine", "name"));
  try {
    expect_utf8("bad\xff", "name");
    FAIL() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_STREQ(e.what(), "name is not valid UTF-8 (byte 0xff at offset 3 of 4 bytes)");
  }
}

TEST(Utf8, PrefixNeverSplitsACharacter) {
  const std::string s = "x\xc3\xa9\xc3\xa9";  // x, e-acute, e-acute: 5 bytes
  EXPECT_EQ(utf8_prefix(s, 10), s);
  EXPECT_EQ(utf8_prefix(s, 5), s);
  EXPECT_EQ(utf8_prefix(s, 4), "x\xc3\xa9");  // the cut falls inside the second e-acute
  EXPECT_EQ(utf8_prefix(s, 3), "x\xc3\xa9");
  EXPECT_EQ(utf8_prefix(s, 2), "x");
  EXPECT_EQ(utf8_prefix(s, 0), "");
  const std::string emoji = "\xf0\x9f\x94\xa5";
  EXPECT_EQ(utf8_prefix(emoji, 3), "");
}

}  // namespace
}  // namespace spill

// The bounded JSON reader every file reader uses: depth limits, positions and reasons for bad
// syntax, number overflow, typed reads with ranges, and messages that stay short.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <string>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "core/json_read.hpp"
#include "tests/hostile_helpers.hpp"

namespace spill {
namespace {

using spill::test::error_of;
using spill::test::expect_mentions;

TEST(ParseJson, NestingPastTheLimitIsAnErrorNotACrash) {
  const std::string deep = "{\"a\": " + std::string(100000, '[') + std::string(100000, ']') + "}";
  std::string msg = error_of([&] { parse_json(deep, "deep.json"); });
  EXPECT_NE(msg.find("deep.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("nested deeper than 64"), std::string::npos) << msg;
  // Exactly at the limit is fine.
  const std::string ok = std::string(kMaxJsonDepth, '[') + std::string(kMaxJsonDepth, ']');
  EXPECT_NO_THROW(parse_json(ok, "ok.json"));
  const std::string over = "[" + ok + "]";
  EXPECT_THROW(parse_json(over, "over.json"), InvalidArgument);
}

TEST(ParseJson, NumberOverflowNamesTheFileAndPosition) {
  std::string msg = error_of([] { parse_json("{\n  \"bytes\": 1e400\n}", "g.json"); });
  EXPECT_NE(msg.find("g.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("1e400"), std::string::npos) << msg;
  EXPECT_NE(msg.find("out of range"), std::string::npos) << msg;
  EXPECT_NE(msg.find("line 2"), std::string::npos) << msg;
  // A huge integer literal overflows too, and its text is cut in the message.
  std::string digits(5000, '9');
  msg = error_of([&] { parse_json("[" + digits + "]", "n.json"); });
  EXPECT_LT(msg.size(), 400u) << msg;
}

TEST(ParseJson, SyntaxErrorsAndTruncationSayWhere) {
  std::string msg = error_of([] { parse_json("{\"a\": 1,\n \"b\": ]}", "x.json"); });
  EXPECT_NE(msg.find("not valid JSON at line 2"), std::string::npos) << msg;
  msg = error_of([] { parse_json("{\"a\": [1, 2", "x.json"); });
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  // An unterminated string of a megabyte: the message quotes a few dozen characters.
  msg = error_of([] { parse_json("[\"" + std::string(1 << 20, 'x'), "big.json"); });
  EXPECT_LT(msg.size(), 400u) << msg.substr(0, 400);
}

TEST(ReadFileText, DirectoriesEmptyFilesAndEndlessDevicesGetClearErrors) {
  std::string msg = error_of([] { read_file_text(::testing::TempDir(), "graph file 'd'"); });
  EXPECT_NE(msg.find("graph file 'd': is a directory"), std::string::npos) << msg;
  msg = error_of([] { read_file_text("/nonexistent/x.json", "trace 'x'"); });
  EXPECT_NE(msg.find("trace 'x': cannot open it"), std::string::npos) << msg;
  const std::string empty = ::testing::TempDir() + "/spill_empty.json";
  std::ofstream(empty).put(' ');
  msg = error_of([&] { parse_json(read_file_text(empty, "e"), "e"); });
  EXPECT_NE(msg.find("e: empty"), std::string::npos) << msg;
  std::remove(empty.c_str());
  // /dev/zero would never end.
  msg = error_of([] { read_file_text("/dev/zero", "link file '/dev/zero'"); });
  EXPECT_NE(msg.find("link file '/dev/zero': is a device"), std::string::npos) << msg;
  // A file over the bound is refused by its size, before reading.
  const std::string big = ::testing::TempDir() + "/spill_big.json";
  std::ofstream(big) << std::string(5 << 20, ' ');
  msg = error_of([&] { read_file_text(big, "b", 4 << 20); });
  EXPECT_NE(msg.find("b: larger than 4 MiB"), std::string::npos) << msg;
  std::remove(big.c_str());
}

TEST(JsonValue, ReadsFieldsWithRangesAndNamesThePath) {
  nlohmann::json j = parse_json(R"({"ops": [{"bytes": -1, "layer": 4294967296, "name": 7,
                                            "t": 1.5, "ok": 12}]})",
                                "g.json");
  JsonValue top(j, "g.json");
  JsonValue op = top.at("ops").at(0);
  EXPECT_EQ(op.path(), "ops[0]");
  EXPECT_EQ(op.uint_field("ok", 0, 100), 12u);
  EXPECT_EQ(op.uint_field("absent", 0, 100, 5), 5u);
  std::string msg = error_of([&] { op.uint_field("bytes", 0, kMaxBytes); });
  EXPECT_NE(
      msg.find("g.json: ops[0].bytes: must be an integer in [0, 9223372036854775807], got -1"),
      std::string::npos)
      << msg;
  msg = error_of([&] { op.int_field("layer", -1, 2147483647); });
  EXPECT_NE(msg.find("ops[0].layer"), std::string::npos) << msg;
  EXPECT_NE(msg.find("4294967296"), std::string::npos) << msg;
  msg = error_of([&] { op.string_field("name"); });
  EXPECT_NE(msg.find("ops[0].name: must be a string, got 7"), std::string::npos) << msg;
  msg = error_of([&] { op.uint_field("t", 0, 10); });
  EXPECT_NE(msg.find("got 1.5 (a floating-point number)"), std::string::npos) << msg;
  EXPECT_DOUBLE_EQ(op.number_field("t", 0, 2), 1.5);
  EXPECT_THROW(op.number_field("t", 0, 1), InvalidArgument);
  msg = error_of([&] { op.uint_field("missing", 0, 1); });
  EXPECT_NE(msg.find("ops[0].missing: missing required field"), std::string::npos) << msg;
  msg = error_of([&] { op.allow_only({"bytes", "layer", "name", "t"}); });
  EXPECT_NE(msg.find("ops[0].ok: unknown field"), std::string::npos) << msg;
  msg = error_of([&] { top.at("ops").at(3); });
  EXPECT_NE(msg.find("has no item 3"), std::string::npos) << msg;
  msg = error_of([&] { JsonValue(nlohmann::json(3), "x").at("a"); });
  EXPECT_NE(msg.find("x: (top): must be an object, got 3"), std::string::npos) << msg;
}

// A whole number written as a float, where an integer is required: "got 64" read like a bug
// (audit 41b #7). The message keeps the ".0" and says it is a float.
TEST(JsonValue, AWholeFloatWhereAnIntegerGoesIsNamedAFloat) {
  nlohmann::json j = parse_json(R"({"version": 1.0, "bytes": 64.0, "layer": -2.0, "big": 1e20})",
                                "g.json");
  JsonValue top(j, "g.json");
  std::string msg = error_of([&] { top.uint_field("version", 0, 5); });
  EXPECT_NE(msg.find("g.json: version: must be an integer in [0, 5], got 1.0 (a floating-point "
                     "number)"),
            std::string::npos)
      << msg;
  msg = error_of([&] { top.uint_field("bytes", 0, kMaxBytes); });
  EXPECT_NE(msg.find("got 64.0 (a floating-point number)"), std::string::npos) << msg;
  msg = error_of([&] { top.int_field("layer", -10, 10); });
  EXPECT_NE(msg.find("got -2.0 (a floating-point number)"), std::string::npos) << msg;
  msg = error_of([&] { top.uint_field("big", 0, UINT64_MAX); });
  EXPECT_NE(msg.find("got 1e+20 (a floating-point number)"), std::string::npos) << msg;
  // Where any number goes, a float is read as one.
  EXPECT_DOUBLE_EQ(top.number_field("bytes", 0, 100), 64.0);
}

// The string bound counts bytes and says so: 600 x "é" (1200 bytes) were "1200 characters"
// (audit 41b #8).
TEST(JsonValue, TheStringBoundIsInBytesAndSaysSo) {
  std::string e;
  for (int i = 0; i < 600; ++i) e += "\xc3\xa9";
  const nlohmann::json j = {{"name", e}};
  JsonValue top(j, "g.json");  // (holds a pointer: not to a temporary)
  const std::string msg = error_of([&] { top.string_field("name"); });
  expect_mentions(msg, {"name: must be a string of at most 1024 bytes (UTF-8)", "(1200 bytes)"});
  EXPECT_EQ(msg.find("characters"), std::string::npos) << msg;
  EXPECT_EQ(top.string_field("name", std::nullopt, 1200), e);
}

TEST(JsonValue, MessagesDescribeValuesNeverDumpThem) {
  nlohmann::json j = {{"s", std::string(100000, 'a')},
                      {"arr", nlohmann::json::array({1, 2, 3})},
                      {"obj", {{"x", 1}}},
                      {std::string(5000, 'k'), 1}};
  JsonValue top(j, "f");
  for (const char* key : {"s", "arr", "obj"}) {
    std::string msg = error_of([&] { top.uint_field(key, 0, 1); });
    EXPECT_LT(msg.size(), 300u) << msg.substr(0, 300);
  }
  EXPECT_NE(error_of([&] { top.uint_field("arr", 0, 1); }).find("an array of 3 items"),
            std::string::npos);
  EXPECT_NE(error_of([&] { top.string_field("s", std::nullopt, 10); }).find("at most 10"),
            std::string::npos);
  std::string msg = error_of([&] { top.allow_only({"s", "arr", "obj"}); });
  EXPECT_LT(msg.size(), 300u) << msg.substr(0, 300);
}

TEST(Checked, AddAndMultiplyRefuseToWrap) {
  EXPECT_EQ(checked_add(1, 2, "x"), 3u);
  EXPECT_EQ(checked_mul(kMaxBytes, 1, "x"), kMaxBytes);
  std::string msg = error_of([] { checked_mul(1ull << 32, 1ull << 31, "tensor bytes"); });
  EXPECT_NE(msg.find("tensor bytes: 4294967296 x 2147483648 passes 2^63 - 1"), std::string::npos)
      << msg;
  EXPECT_THROW(checked_add(kMaxBytes, 1, "x"), InvalidArgument);
  EXPECT_EQ(checked_add(kMaxBytes, 1, "x", UINT64_MAX), kMaxBytes + 1);
  EXPECT_THROW(checked_add(UINT64_MAX, 1, "x", UINT64_MAX), InvalidArgument);
  EXPECT_EQ(saturating_mul(1ull << 40, 1ull << 40), UINT64_MAX);
  EXPECT_EQ(saturating_add(UINT64_MAX, 5), UINT64_MAX);
  EXPECT_THROW(checked_add_signed(INT64_MAX, 1, "counter"), InvalidArgument);
  EXPECT_EQ(checked_add_signed(INT64_MIN + 1, -1, "counter"), INT64_MIN);
  EXPECT_THROW(checked_number(1.0 / 0.0, 0, 1e30, "flops"), InvalidArgument);
  EXPECT_DOUBLE_EQ(checked_number(2.5, 0, 3, "x"), 2.5);
}

}  // namespace
}  // namespace spill

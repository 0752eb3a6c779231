// Traces and snapshots from other machines or other tools: every field is read with its range,
// the tag table cannot be made to allocate or write out of bounds, times cannot wrap, nesting is
// bounded, and the report built from any trace that reads is finite (issue 11). The fuzz test
// feeds mutated traces through the reader, the summary and the HTML report.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <string>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "profiling/chrome_trace.hpp"
#include "profiling/report.hpp"
#include "profiling/snapshot.hpp"
#include "tests/hostile_helpers.hpp"
#include "tests/profiling/synthetic_trace.hpp"

namespace spill::profiling {
namespace {

using spill::test::expect_mentions;

using test::make_event;

std::string small_trace() {
  std::vector<TraceEvent> ev{make_event(1000, EventKind::Map, 0x10000, 4 << 20),
                             make_event(1100, EventKind::Alloc, 0x10000, 3 << 20, 0x7f00, 0, 1),
                             make_event(1500, EventKind::SwapOut, 0x10000, 3 << 20, 0x7f00, 300),
                             make_event(2000, EventKind::Stall, 0x10000, 0, 0x7f00, 150),
                             make_event(2000, EventKind::SwapIn, 0x10000, 3 << 20, 0x7f00, 120),
                             make_event(2500, EventKind::Free, 0x10000, 3 << 20, 0x7f00, 0, 2)};
  return chrome_trace_text(ev, [](std::uint32_t t) { return "tag" + std::to_string(t); },
                           {{"command", "test"}});
}

// The small trace with `edit` applied to its JSON.
std::string edited(const std::function<void(nlohmann::json&)>& edit) {
  nlohmann::json j = nlohmann::json::parse(small_trace());
  edit(j);
  return j.dump();
}

nlohmann::json& first_event_args(nlohmann::json& j) {
  for (auto& e : j["traceEvents"])
    if (e.contains("args") && e["args"].contains("kind")) return e["args"];
  throw std::logic_error("no spill event");
}

std::string trace_error(const std::string& text) {
  try {
    parse_chrome_trace(text, "trace 'x.json'");
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  ADD_FAILURE() << "accepted";
  return "";
}

TEST(HostileTrace, TagKeysMustBeTagIds) {
  for (const char* key : {"-1", "abc", "0", "4294967296", "1e3", " 7", ""}) {
    SCOPED_TRACE(key);
    std::string msg =
        trace_error(edited([&](nlohmann::json& j) { j["otherData"]["tags"][key] = "x"; }));
    expect_mentions(msg, {"x.json", "otherData.tags", "decimal integer in [1, 4294967295]"});
  }
  // A large id is fine and costs one entry, not a table of twenty million.
  ParsedTrace t = parse_chrome_trace(
      edited([](nlohmann::json& j) { j["otherData"]["tags"]["20000000"] = "far"; }), "t");
  EXPECT_EQ(t.tag_names.at(20000000), "far");
  EXPECT_EQ(t.tag_names.size(), 3u);
  std::string msg = trace_error(edited([](nlohmann::json& j) { j["otherData"]["tags"]["5"] = 5; }));
  expect_mentions(msg, {"otherData.tags.5", "must be a string"});
}

TEST(HostileTrace, VersionAndFieldsAreReadWithTheirRanges) {
  expect_mentions(
      trace_error(edited([](nlohmann::json& j) { j["otherData"]["version"] = 4294967297ull; })),
      {"x.json", "version 4294967297 is not supported"});
  expect_mentions(trace_error(edited([](nlohmann::json& j) { j["otherData"]["version"] = "1"; })),
                  {"otherData.version", "must be an integer"});
  struct Case {
    const char* field;
    nlohmann::json value;
    const char* expect;
  };
  const Case cases[] = {
      {"bytes", -1, "must be an integer in [0, 9223372036854775807], got -1"},
      {"bytes", 18446744073709551615ull, "got 18446744073709551615"},
      {"time_ns", 18446744073709551605ull, "args.time_ns"},
      {"tag", 4294967296ull, "args.tag"},
      {"thread", -3, "args.thread"},
      {"device", 1 << 24, "args.device"},
      {"addr", "-0x1", "args.addr: must be a hex number"},
      {"addr", "0x1ffffffffffffffff", "args.addr"},
      {"stream", 12, "args.stream: must be a string"},
      {"kind", "explode", "args.kind: unknown event kind"},
      {"kind", nlohmann::json::array(), "args.kind: must be a string"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.field);
    std::string msg =
        trace_error(edited([&](nlohmann::json& j) { first_event_args(j)[c.field] = c.value; }));
    expect_mentions(msg, {"x.json': traceEvents[", c.expect});
  }
}

TEST(HostileTrace, TimesCannotWrapPast2To63) {
  std::string msg = trace_error(edited([](nlohmann::json& j) {
    auto& a = first_event_args(j);
    a["time_ns"] = 9223372036854775800ull;
    a["duration_ns"] = 100;
  }));
  expect_mentions(msg, {"args.duration_ns", "time_ns + duration_ns passes 2^63 - 1"});
  // Times that large but in range make a finite report.
  std::vector<TraceEvent> ev{
      make_event(1ull << 62, EventKind::Alloc, 0x10, 4096),
      make_event((1ull << 62) + 5, EventKind::SwapOut, 0x10, 4096, 0, 1ull << 61),
      make_event((1ull << 62) + 9, EventKind::Free, 0x10, 4096)};
  ParsedTrace t = parse_chrome_trace(chrome_trace_text(ev), "t");
  ReportSummary s = summarize(t);
  EXPECT_NEAR(s.duration_ms, double(1ull << 61) / 1e6, 1.0);
  EXPECT_NE(render_report(t, "t").find("swap-bandwidth"), std::string::npos);
}

TEST(HostileTrace, CountersThatLeaveTheInt64RangeAreRefused) {
  // Written with small sizes (the writer replays counters too), then made huge in the text.
  auto huge = [](std::vector<TraceEvent> ev) {
    std::string text = chrome_trace_text(ev);
    for (auto at = text.find("\"bytes\":7,"); at != std::string::npos;
         at = text.find("\"bytes\":7,", at))
      text.replace(at, 10, "\"bytes\":4611686018427387904,");
    return text;
  };
  std::vector<TraceEvent> ev;
  for (int i = 0; i < 3; ++i)
    ev.push_back(make_event(1000 + i, EventKind::Alloc, 0x1000 * (i + 1), 7));
  std::string msg = trace_error(huge(ev));
  expect_mentions(msg, {"x.json': traceEvents[", "allocated bytes", "range"});
  // Swapping out the same block again and again passes 2^63 in the summary's sum.
  std::vector<TraceEvent> again;
  for (int i = 0; i < 3; ++i)
    again.push_back(make_event(1000 + i, EventKind::SwapOut, 0x1000, 7, 0, 1));
  ParsedTrace t = parse_chrome_trace(huge(again), "t");
  EXPECT_THROW(summarize(t), InvalidArgument);
}

TEST(HostileTrace, DeepMetadataIsRefusedWhileParsing) {
  std::string text = small_trace();
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  auto at = text.find("\"command\":\"test\"");
  ASSERT_NE(at, std::string::npos);
  text.replace(at, 16, "\"command\":" + deep);
  expect_mentions(trace_error(text), {"x.json", "nested deeper than 64"});
  expect_mentions(trace_error(edited([](nlohmann::json& j) { j["otherData"]["metadata"] = 3; })),
                  {"otherData.metadata: must be an object"});
}

TEST(HostileTrace, SnapshotVersionIsReadWithItsRange) {
  const std::string path = ::testing::TempDir() + "/hostile_snapshot.json";
  for (auto [version, expect] : {std::pair{nlohmann::json(4294967297ull), "version 4294967297"},
                                 {nlohmann::json(-1), "spill.version"},
                                 {nlohmann::json("1"), "spill.version"}}) {
    std::ofstream(path)
        << nlohmann::json{{"spill", {{"format", "spill-snapshot"}, {"version", version}}}}.dump();
    try {
      read_snapshot(path);
      ADD_FAILURE() << "accepted version " << version.dump();
    } catch (const InvalidArgument& e) {
      expect_mentions(e.what(), {path.c_str(), expect});
    }
  }
  std::ofstream(path) << "{\"spill\": {\"format\": 7}}";
  EXPECT_THROW(read_snapshot(path), InvalidArgument);
  std::remove(path.c_str());
}

TEST(HostileTrace, FuzzedTracesReadAndReportCleanly) {
  const std::vector<std::string> seeds{small_trace(),
                                       chrome_trace_text(test::synthetic_step(4, 3))};
  spill::test::FuzzCounts n =
      spill::test::fuzz_reader(seeds, 77, 3000, 6.0, [](const std::string& text) {
        ParsedTrace t = parse_chrome_trace(text, "trace 'fuzz.json'");
        ReportSummary s = summarize(t);
        EXPECT_GE(s.duration_ms, 0.0);
        EXPECT_LT(s.duration_ms, 1e13);
        std::string page = render_report(t, "fuzz.json");
        EXPECT_NE(page.find("</html>"), std::string::npos);
      });
  EXPECT_GT(n.accepted, 0);
  EXPECT_GT(n.rejected, 0);
}

}  // namespace
}  // namespace spill::profiling

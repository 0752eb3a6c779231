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
  // Times that large make a finite report while the trace spans at most 30 days.
  const std::uint64_t day = 86'400'000'000'000ull;
  std::vector<TraceEvent> ev{
      make_event(1ull << 62, EventKind::Alloc, 0x10, 4096),
      make_event((1ull << 62) + 5, EventKind::SwapOut, 0x10, 4096, 0, 29 * day),
      make_event((1ull << 62) + 9, EventKind::Free, 0x10, 4096)};
  ParsedTrace t = parse_chrome_trace(chrome_trace_text(ev), "t");
  ReportSummary s = summarize(t);
  EXPECT_NEAR(s.duration_ms, double(29 * day + 5) / 1e6, 1.0);
  EXPECT_NE(render_report(t, "t").find("swap-bandwidth"), std::string::npos);
}

// What the events mean (audit 31b #5): a trace that reads can still be impossible. Each case is
// refused naming the file, the event (traceEvents index and kind) and what is wrong.
std::string meaning_error(const std::vector<TraceEvent>& ev, const nlohmann::json& meta) {
  return trace_error(chrome_trace_text(ev, {}, meta));
}

const nlohmann::json kStartsEmpty = {
    {"baseline", {{"allocated", 0}, {"mapped", 0}, {"on_host", 0}, {"host_pinned", 0}}},
    {"dropped_events", 0}};

TEST(HostileTrace, AnEventFarAfterTheFirstIsRefused) {
  // One event at 2^62 ns among events near 0: a garbage time, not 146 years of trace.
  std::vector<TraceEvent> ev{make_event(1000, EventKind::Alloc, 0x10, 4096),
                             make_event(1ull << 62, EventKind::Mark, 0, 0),
                             make_event(2000, EventKind::Free, 0x10, 4096)};
  expect_mentions(meaning_error(ev, nlohmann::json::object()),
                  {"x.json': traceEvents[", "(mark at 4611686018427387904 ns)", "30 days"});
  // A stall lasting 2^62 ns likewise.
  ev[1] = make_event(1500, EventKind::Stall, 0x10, 0, 0, 1ull << 62);
  expect_mentions(meaning_error(ev, nlohmann::json::object()),
                  {"x.json': traceEvents[", "(stall at 1500 ns)", "30 days"});
}

TEST(HostileTrace, EventsAreOrderedByTimeNotByFileOrder) {
  // Written reversed: the free first in the file, the alloc (earlier in time) after it.
  std::vector<TraceEvent> ev{make_event(2000, EventKind::Free, 0x10, 4096),
                             make_event(1000, EventKind::Alloc, 0x10, 4096)};
  ParsedTrace t = parse_chrome_trace(chrome_trace_text(ev, {}, kStartsEmpty), "t");
  ASSERT_EQ(t.events.size(), 2u);
  EXPECT_EQ(t.events[0].kind, EventKind::Alloc);
  EXPECT_GT(t.source_index[0], t.source_index[1]) << "errors name an event by its place in the file";
  EXPECT_EQ(summarize(t).peak.allocated, 4096);
}

TEST(HostileTrace, ACompleteTraceMayNotFreeOrMoveWhatItNeverAllocated) {
  // A free of an unknown block.
  std::vector<TraceEvent> ev{make_event(1000, EventKind::Free, 0x40000000, 1ull << 30),
                             make_event(2000, EventKind::Alloc, 0x10, 4096)};
  expect_mentions(meaning_error(ev, kStartsEmpty),
                  {"x.json': traceEvents[", "(free at 1000 ns)", "never allocated", "0x40000000"});
  // A double free.
  ev = {make_event(1000, EventKind::Alloc, 0x10, 4096), make_event(2000, EventKind::Free, 0x10, 4096),
        make_event(3000, EventKind::Free, 0x10, 4096)};
  expect_mentions(meaning_error(ev, kStartsEmpty),
                  {"traceEvents[", "(free at 3000 ns)", "already freed"});
  // A swap-out (and a swap-in) of a block never allocated.
  for (EventKind k : {EventKind::SwapOut, EventKind::SwapIn, EventKind::Evict}) {
    ev = {make_event(1000, EventKind::Alloc, 0x10, 4096), make_event(2000, k, 0x20, 1ull << 40, 0, 5)};
    expect_mentions(meaning_error(ev, kStartsEmpty),
                    {"traceEvents[", to_string(k), "moves a block the trace never allocated"});
  }
  // A swap-out slice sorted after its block's free (the simulated clock) is fine.
  ev = {make_event(1000, EventKind::Alloc, 0x10, 4096), make_event(2000, EventKind::Free, 0x10, 4096),
        make_event(2500, EventKind::SwapOut, 0x10, 4096, 0, 5)};
  EXPECT_NO_THROW(parse_chrome_trace(chrome_trace_text(ev, {}, kStartsEmpty), "t"));
  // So is one sorted before its block's alloc at the same time (the simulated clock gives a
  // copy the time its block was allocated at; threads' events of one time have no order: a
  // Python trace exported after an eviction was refused). At a later time it is refused.
  ev = {make_event(1000, EventKind::SwapOut, 0x10, 4096, 0, 5),
        make_event(1000, EventKind::Alloc, 0x10, 4096), make_event(2000, EventKind::Free, 0x10, 4096)};
  EXPECT_NO_THROW(parse_chrome_trace(chrome_trace_text(ev, {}, kStartsEmpty), "t"));
  ev[1].time_ns = 1001;
  expect_mentions(meaning_error(ev, kStartsEmpty),
                  {"traceEvents[", "(swap_out at 1000 ns)", "moves a block the trace never allocated"});
}

// A complete trace's swaps move their block, no more: a swap-out 1000x its block gave "1.34 TiB
// copied to the host" with 866 MiB allocated (audit 41b #11). The event is named.
TEST(HostileTrace, ACompleteTraceMayNotMoveMoreThanItsBlock) {
  for (EventKind k : {EventKind::SwapOut, EventKind::SwapIn, EventKind::Evict}) {
    std::vector<TraceEvent> ev{make_event(1000, EventKind::Alloc, 0x10, 4096),
                               make_event(2000, k, 0x10, 4096000, 0, 5),
                               make_event(3000, EventKind::Free, 0x10, 4096)};
    const std::string event = "(" + std::string(to_string(k)) + " at 2000 ns)";
    expect_mentions(meaning_error(ev, kStartsEmpty),
                    {"traceEvents[", event.c_str(),
                     "moves 4096000 bytes of the block at 0x10, which has 4096"});
  }
  // The block's own bytes pass, also from a slice sorted after its free and after a smaller
  // block's alloc at that address, or before its alloc at the same time.
  std::vector<TraceEvent> ev{make_event(1000, EventKind::Alloc, 0x10, 8192),
                             make_event(2000, EventKind::Free, 0x10, 8192),
                             make_event(2000, EventKind::Alloc, 0x10, 4096),
                             make_event(2500, EventKind::SwapOut, 0x10, 8192, 0, 5),
                             make_event(3000, EventKind::Free, 0x10, 4096),
                             make_event(4000, EventKind::SwapOut, 0x20, 4096, 0, 5),
                             make_event(4000, EventKind::Alloc, 0x20, 4096),
                             make_event(5000, EventKind::Free, 0x20, 4096)};
  EXPECT_NO_THROW(parse_chrome_trace(chrome_trace_text(ev, {}, kStartsEmpty), "t"));
  // A trace that is not complete may have blocks from before it: not checked.
  ev = {make_event(1000, EventKind::SwapOut, 0x30, 1 << 20, 0, 5)};
  EXPECT_NO_THROW(parse_chrome_trace(chrome_trace_text(ev, {}), "t"));
}

TEST(HostileTrace, CountersBelowZeroFromTheBaselineAreRefused) {
  const nlohmann::json meta = {
      {"baseline", {{"allocated", 4096}, {"mapped", 1 << 20}, {"on_host", 0}, {"host_pinned", 0}}}};
  struct Case {
    TraceEvent e;
    const char* expect;
  } cases[] = {
      {make_event(1000, EventKind::Unmap, 0x10, 1ull << 40), "mapped bytes go below zero"},
      {make_event(1000, EventKind::Free, 0x10, 8192), "allocated bytes go below zero"},
      {make_event(1000, EventKind::HostFree, 0x10, 4096), "pinned host bytes go below zero"},
      {make_event(1000, EventKind::SwapIn, 0x10, 4096, 0, 5), "bytes on host go below zero"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.expect);
    expect_mentions(meaning_error({make_event(500, EventKind::Mark, 0, 0), c.e}, meta),
                    {"x.json': traceEvents[", (std::string("(") + to_string(c.e.kind) + " at 1000 ns)").c_str(),
                     c.expect});
  }
  // Not a complete trace (something was allocated before it): a free of a block allocated
  // before it is what a mid-run trace holds.
  EXPECT_NO_THROW(parse_chrome_trace(
      chrome_trace_text({make_event(1000, EventKind::Free, 0x10, 4096)}, {}, meta), "t"));
}

TEST(HostileTrace, MetadataFiguresMustBeNonNegativeIntegers) {
  std::vector<TraceEvent> ev{make_event(1000, EventKind::Alloc, 0x10, 4096)};
  for (const nlohmann::json& bad : {nlohmann::json{{"budget_bytes", -1}},
                                    nlohmann::json{{"budget_bytes", "x"}},
                                    nlohmann::json{{"budget_bytes", 1.5}}})
    expect_mentions(meaning_error(ev, bad), {"x.json'", "metadata.budget_bytes"});
  expect_mentions(meaning_error(ev, {{"dropped_events", -3}}), {"metadata.dropped_events"});
  expect_mentions(meaning_error(ev, {{"baseline", {{"mapped", "a lot"}}}}),
                  {"metadata.baseline.mapped"});
  expect_mentions(meaning_error(ev, {{"baseline", 7}}), {"metadata.baseline"});
  ParsedTrace t = parse_chrome_trace(chrome_trace_text(ev, {}, {{"budget_bytes", 1 << 24}}), "t");
  EXPECT_EQ(t.budget_bytes, std::optional<std::uint64_t>(1 << 24));
}

TEST(HostileTrace, ATraceWithoutABaselineThatFreesTheUnknownGetsTheLeastBaseline) {
  // An older trace, or another tool's, beginning mid-run: not refused; its figures start from
  // the least state that keeps every counter non-negative, and the report says they are lower
  // bounds.
  std::vector<TraceEvent> ev{make_event(1000, EventKind::Free, 0x40000000, 1 << 20),
                             make_event(1500, EventKind::Unmap, 0x40000000, 2 << 20),
                             make_event(2000, EventKind::Alloc, 0x10, 4096)};
  ParsedTrace t = parse_chrome_trace(chrome_trace_text(ev), "t");
  EXPECT_FALSE(t.has_baseline);
  EXPECT_TRUE(t.baseline_inferred);
  EXPECT_EQ(t.baseline, (MemoryCounters{1 << 20, 2 << 20, 0, 0}));
  EXPECT_EQ(summarize(t).peak.allocated, 1 << 20);
  expect_mentions(render_report(t, "t"), {"seems to begin mid-run", "lower bounds"});
  // One that starts from nothing gets no such note.
  ParsedTrace whole = parse_chrome_trace(chrome_trace_text({ev[2]}), "t");
  EXPECT_FALSE(whole.baseline_inferred);
  EXPECT_EQ(render_report(whole, "t").find("mid-run"), std::string::npos);
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

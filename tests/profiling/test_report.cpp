// The HTML report: what it shows for a synthetic step, what it says for an empty trace. The
// rendering itself is checked in headless Chromium by report_renders.sh (a CTest).
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <vector>

#include "profiling/chrome_trace.hpp"
#include "profiling/report.hpp"
#include "tests/profiling/synthetic_trace.hpp"

namespace spill::profiling {
namespace {

ParsedTrace synthetic() {
  ParsedTrace t;
  t.events = test::synthetic_step();
  for (std::uint32_t l = 1; l <= 12; ++l) t.tag_names[l] = "layer" + std::to_string(l) + ".act";
  t.metadata = {{"device", "SimDevice"}};
  return t;
}

TEST(Report, SummarizesTheStep) {
  ReportSummary s = summarize(synthetic());
  EXPECT_EQ(s.swap_outs, 8u);
  EXPECT_EQ(s.swap_ins, 8u);
  EXPECT_EQ(s.swapped_out_bytes, s.swapped_in_bytes);
  EXPECT_GT(s.stalls, 0u);
  EXPECT_GT(s.stall_ms, 0.0);
  EXPECT_GT(s.peak.allocated, s.peak.mapped) << "swapped-out blocks stay allocated, unmapped";
  EXPECT_GT(s.peak.on_host, 0);
  EXPECT_GT(s.duration_ms, 50.0);
}

TEST(Report, ShowsEverySection) {
  std::string html = render_report(synthetic(), "step.json");
  for (const char* label :
       {"Memory timeline", "Top allocations at peak", "Swap bandwidth", "Stalls",
        "Fragmentation", "id='memory-timeline'", "id='swap-bandwidth'", "layer12.act",
        "swap-out (D2H)", "pinned host", "step.json"}) {
    EXPECT_NE(html.find(label), std::string::npos) << label;
  }
  EXPECT_EQ(html.find("<script"), std::string::npos) << "the page must need no scripts";
  EXPECT_EQ(html.find("http"), std::string::npos) << "the page must fetch nothing";
  // Lets report_renders.sh (CTest) render the same page in headless Chromium.
  if (const char* path = std::getenv("SPILL_WRITE_REPORT")) std::ofstream(path) << html;
}

// Events over `span_ns` with a swap-out in the middle, on a simulated clock.
ParsedTrace spanning(std::uint64_t span_ns) {
  ParsedTrace t;
  t.events = {test::make_event(0, EventKind::Alloc, 0x10, 1 << 30),
              test::make_event(span_ns / 3, EventKind::SwapOut, 0x10, 1 << 30, 0, span_ns / 3),
              test::make_event(span_ns, EventKind::Free, 0x10, 1 << 30)};
  t.clock = "simulated (SimDevice, link model pcie4)";
  return t;
}

TEST(Report, TimeAxisHasRoundTicksInAFittingUnit) {
  struct Case {
    std::uint64_t span_ns;
    const char* label;
    std::vector<const char*> ticks;
  };
  const Case cases[] = {
      {8'840'000'000, "time (s, simulated)", {">0<", ">2<", ">4<", ">6<", ">8<"}},
      {150'000'000'000, "time (min, simulated)", {">0.0<", ">0.5<", ">1.0<", ">2.5<"}},
      {35'000'000, "time (ms, simulated)", {">0<", ">10<", ">30<"}},
      {1'200'000, "time (\u00b5s, simulated)", {">0<", ">500<", ">1000<"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.label);
    std::string html = render_report(spanning(c.span_ns), "t.json");
    EXPECT_NE(html.find(c.label), std::string::npos);
    for (const char* tick : c.ticks) EXPECT_NE(html.find(tick), std::string::npos) << tick;
    EXPECT_EQ(html.find("e+0"), std::string::npos) << "no exponent on any axis";
    EXPECT_NE(html.find("simulated (SimDevice, link model pcie4)"), std::string::npos)
        << "the summary says which clock";
  }
}

// A trace exported mid-run (spill.trace() after warm-up): 8 MiB allocated and 10 MiB mapped
// when it began. The peaks count them, the page says so, and the budget is drawn.
ParsedTrace mid_run() {
  using test::make_event;
  const std::uint64_t MiB = 1 << 20;
  std::vector<TraceEvent> ev{make_event(1000, EventKind::Map, 0x90000000, 4 * MiB),
                             make_event(1100, EventKind::Alloc, 0x90000000, 4 * MiB),
                             make_event(2000, EventKind::Free, 0x80000000, 2 * MiB),
                             make_event(2100, EventKind::Unmap, 0x80000000, 2 * MiB),
                             make_event(3000, EventKind::Free, 0x90000000, 4 * MiB)};
  return parse_chrome_trace(
      chrome_trace_text(ev, {},
                        {{"source", "spill C API"},
                         {"baseline",
                          {{"allocated", 8 * MiB}, {"mapped", 10 * MiB}, {"on_host", 0},
                           {"host_pinned", 0}}},
                         {"dropped_events", 0},
                         {"budget_bytes", 16 * MiB}}),
      "mid.json");
}

TEST(Report, AMidRunTraceStartsFromItsBaseline) {
  const ParsedTrace t = mid_run();
  ReportSummary s = summarize(t);
  EXPECT_EQ(s.peak.allocated, 12 << 20);
  EXPECT_EQ(s.peak.mapped, 14 << 20);
  EXPECT_NEAR(s.fragmentation, 14.0 / 12.0, 1e-9);
  const std::string html = render_report(t, "mid.json");
  for (const char* text : {"begins mid-run", "8.00 MiB allocated, 10.00 MiB mapped",
                           "missing from the top allocations", "id='budget'",
                           "budget 16.00 MiB", "class='level'"})
    EXPECT_NE(html.find(text), std::string::npos) << text;
  EXPECT_EQ(html.find("id='dropped'"), std::string::npos) << "nothing was dropped";
}

TEST(Report, SaysWhenEventsWereDropped) {
  ParsedTrace t = mid_run();
  t.dropped_events = 4700;
  const std::string html = render_report(t, "mid.json");
  EXPECT_NE(html.find("4700 events were lost"), std::string::npos);
}

TEST(Report, EmptyTraceSaysSo) {
  ParsedTrace empty;
  std::string html = render_report(empty, "empty.json");
  EXPECT_NE(html.find("This trace is empty"), std::string::npos);
  EXPECT_EQ(html.find("Memory timeline"), std::string::npos);
}

// The top-allocations table names a block by its latest name (a Name event, also one after
// the peak), not by a name an earlier block at the address had.
TEST(Report, TopAllocationsShowBlockNames) {
  using test::make_event;
  ParsedTrace t;
  t.events = {make_event(0, EventKind::Alloc, 0x10000, 8 << 20),
              make_event(100, EventKind::Name, 0x10000, 8 << 20, 0, 0, 1),
              make_event(200, EventKind::Free, 0x10000, 8 << 20),
              make_event(300, EventKind::Alloc, 0x10000, 4 << 20),
              make_event(400, EventKind::Alloc, 0x90000, 6 << 20),
              make_event(500, EventKind::Free, 0x90000, 6 << 20),
              make_event(600, EventKind::Name, 0x10000, 4 << 20, 0, 0, 2)};
  t.tag_names[1] = "stale name";
  t.tag_names[2] = "exp_avg of fc1.weight";
  const std::string html = render_report(t, "names.json");
  const std::string table = html.substr(html.find("id='top-allocations'"));
  EXPECT_NE(table.find("exp_avg of fc1.weight"), std::string::npos);
  EXPECT_EQ(table.find("stale name"), std::string::npos);
}

TEST(Report, EscapesNames) {
  ParsedTrace t = synthetic();
  t.tag_names[12] = "<b>&evil";
  std::string html = render_report(t, "x<y>.json");
  EXPECT_EQ(html.find("<b>&evil"), std::string::npos);
  EXPECT_NE(html.find("&lt;b&gt;&amp;evil"), std::string::npos);
}

}  // namespace
}  // namespace spill::profiling

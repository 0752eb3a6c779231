// The HTML report: what it shows for a synthetic step, what it says for an empty trace. The
// rendering itself is checked in headless Chromium by report_renders.sh (a CTest).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <vector>

#include "core/units.hpp"
#include "profiling/chrome_trace.hpp"
#include "profiling/counters.hpp"
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

// Audit 31b #8: the summary says what its bytes count. Swapped out: the copies (swap_out
// events); evicted: every eviction, a clean one (no copy: its host copy is current) included.
TEST(Report, SaysWhatItsBytesCount) {
  ParsedTrace t;
  t.events = {test::make_event(0, EventKind::Alloc, 0x10, 4 << 20),
              test::make_event(0, EventKind::Alloc, 0x20, 2 << 20),
              test::make_event(10, EventKind::Evict, 0x10, 4 << 20),
              test::make_event(10, EventKind::SwapOut, 0x10, 4 << 20, 0, 100),
              test::make_event(20, EventKind::Evict, 0x20, 2 << 20),  // clean: no copy
              test::make_event(300, EventKind::SwapIn, 0x10, 4 << 20, 0, 100)};
  const ReportSummary s = summarize(t);
  EXPECT_EQ(s.swap_outs, 1u);
  EXPECT_EQ(s.swapped_out_bytes, 4u << 20);
  EXPECT_EQ(s.swapped_in_bytes, 4u << 20);
  EXPECT_EQ(s.evictions, 2u);
  EXPECT_EQ(s.evicted_bytes, 6u << 20);
  const std::string html = render_report(t, "t.json");
  const std::string row = "</th><td>";
  for (const std::string& text :
       {"swapped out" + row + "4.00 MiB in 1 copies to the host",
        "swapped in" + row + "4.00 MiB in 1 copies back",
        std::string("evicted</th><td id='evicted'>6.00 MiB in 2 evictions, with a copy or without"),
        std::string("id='copies'>Swapped out and in: every copy in the trace"),
        std::string("set-up before step 1")})
    EXPECT_NE(html.find(text), std::string::npos) << text;
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

// A long run: `steps` synthetic steps one after the other (about 100 events each), each with
// its own sizes, so one step holds the peak.
ParsedTrace long_run(int steps) {
  ParsedTrace t;
  std::uint64_t offset = 0;
  for (int i = 0; i < steps; ++i) {
    std::vector<TraceEvent> step = test::synthetic_step(12, static_cast<unsigned>(i + 1));
    for (TraceEvent& e : step) e.time_ns += offset;
    offset = step.back().time_ns + 1'000'000;
    t.events.insert(t.events.end(), step.begin(), step.end());
  }
  for (std::uint32_t l = 1; l <= 12; ++l) t.tag_names[l] = "layer" + std::to_string(l) + ".act";
  t.clock = "simulated (SimDevice, link model pcie4)";
  return t;
}

// The points of the memory timeline's line named `series`.
std::vector<std::string> line_points(const std::string& html, const std::string& series) {
  const std::size_t at = html.find("data-series='" + series + "'");
  EXPECT_NE(at, std::string::npos) << series;
  if (at == std::string::npos) return {};
  const std::size_t from = html.find("points='", at) + 8, to = html.find('\'', from);
  std::vector<std::string> points;
  for (std::size_t p = from; p < to;) {
    std::size_t space = html.find(' ', p);
    if (space > to) space = to;
    if (space > p) points.push_back(html.substr(p, space - p));
    p = space + 1;
  }
  return points;
}

std::string exact(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

// Issue 31 #11: a page for a long trace stays small (the lines are downsampled to a few points
// per pixel column), and every figure it states is the one computed from every event.
TEST(Report, ALongTraceMakesABoundedPageWithTheFullFigures) {
  const ParsedTrace t = long_run(2100);
  ASSERT_GT(t.events.size(), 200'000u);
  const std::string html = render_report(t, "long.json");
  EXPECT_LT(html.size(), 1u << 20) << "the page does not grow with the events";
  // The figures, computed here from every event.
  CounterReplay replay;
  std::uint64_t out_bytes = 0, in_bytes = 0;
  std::size_t outs = 0, ins = 0, stalls = 0;
  double stall_ms = 0;
  for (const TraceEvent& e : t.events) {
    replay.apply(e);
    if (e.kind == EventKind::SwapOut) ++outs, out_bytes += e.bytes;
    if (e.kind == EventKind::SwapIn) ++ins, in_bytes += e.bytes;
    if (e.kind == EventKind::Stall) ++stalls, stall_ms += e.duration_ns / 1e6;
  }
  const MemoryCounters peak = replay.peak();
  const std::string row = "</th><td>";
  for (const std::string& figure :
       {"<th class='l'>events" + row + std::to_string(t.events.size()) + "</td>",
        "peak allocated" + row + format_bytes(peak.allocated) + "</td>",
        "peak mapped" + row + format_bytes(peak.mapped) + "</td>",
        "peak on host" + row + format_bytes(peak.on_host) + "</td>",
        "peak pinned host" + row + format_bytes(peak.host_pinned) + "</td>",
        "swapped out" + row + format_bytes(out_bytes) + " in " + std::to_string(outs) + " copies",
        "swapped in" + row + format_bytes(in_bytes) + " in " + std::to_string(ins) + " copies"})
    EXPECT_NE(html.find(figure), std::string::npos) << figure;
  char total[128];
  std::snprintf(total, sizeof total, "<th class='l'>total</th><th>%zu</th><th>%.3f</th>", stalls,
                stall_ms);
  EXPECT_NE(html.find(total), std::string::npos) << total;
  // Each line's highest point drawn is the counter's peak, exactly; its points are bounded.
  const std::pair<const char*, std::int64_t> lines[] = {{"allocated", peak.allocated},
                                                        {"mapped", peak.mapped},
                                                        {"on host", peak.on_host},
                                                        {"pinned host", peak.host_pinned}};
  for (auto [name, value] : lines) {
    SCOPED_TRACE(name);
    EXPECT_NE(html.find(std::string("data-series='") + name + "' data-max='" +
                        exact(static_cast<double>(value)) + "'"),
              std::string::npos);
    const std::size_t n = line_points(html, name).size();
    EXPECT_GT(n, 670u);
    EXPECT_LE(n, 4u * 670u) << "at most 4 points per pixel column";
  }
}

TEST(Report, AShortTraceKeepsEveryPointOfItsLines) {
  const ParsedTrace t = synthetic();
  CounterReplay replay;
  std::size_t changes = 0;
  for (const TraceEvent& e : t.events) changes += replay.apply(e) ? 1 : 0;
  const std::string html = render_report(t, "step.json");
  for (const char* name : {"allocated", "mapped", "on host", "pinned host"})
    EXPECT_EQ(line_points(html, name).size(), 1 + 2 * changes) << name;
}

TEST(Report, StallsOfManyStreamsFitInABoundedTable) {
  ParsedTrace t;
  for (std::uint64_t s = 1; s <= 500; ++s)
    t.events.push_back(test::make_event(s * 1000, EventKind::Stall, 0x10, 0, s, s * 10));
  const std::string html = render_report(t, "streams.json");
  const std::size_t from = html.find("id='stalls'"), to = html.find("</table>", from);
  std::size_t rows = 0;
  for (std::size_t p = html.find("<tr>", from); p < to; p = html.find("<tr>", p + 1)) ++rows;
  EXPECT_EQ(rows, 1 + 20 + 1 + 1) << "header, the 20 longest, the others, the total";
  EXPECT_NE(html.find("0x1f4"), std::string::npos) << "the longest stream is shown";
  EXPECT_NE(html.find("480 other streams</td><td>480</td>"), std::string::npos);
  EXPECT_NE(html.find("<th class='l'>total</th><th>500</th>"), std::string::npos);
}

}  // namespace
}  // namespace spill::profiling

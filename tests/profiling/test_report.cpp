// The HTML report: what it shows for a synthetic step, what it says for an empty trace. The
// rendering itself is checked in headless Chromium by report_renders.sh (a CTest).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
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

// Tag 100 is the step marks', the others name layers.
std::string step_tags(std::uint32_t tag) {
  return tag == 100 ? std::string("step begins") : "layer" + std::to_string(tag) + ".act";
}

// `steps` synthetic steps one after the other, each begun by a step mark of `scope` (as
// Swapper::begin_step records it: address the scope, bytes the step's number), read back from
// the trace text spill writes.
ParsedTrace stepped(int steps, std::uint64_t scope = 0) {
  std::vector<TraceEvent> ev;
  std::uint64_t offset = 0;
  for (int i = 0; i < steps; ++i) {
    ev.push_back(test::make_event(offset, EventKind::Mark, scope, static_cast<std::uint64_t>(i + 1),
                                  kHostStream, 0, 100));
    std::vector<TraceEvent> step = test::synthetic_step(12, static_cast<unsigned>(i + 1));
    for (TraceEvent& e : step) e.time_ns += offset + 1000;
    offset = step.back().time_ns + 1'000'000;
    ev.insert(ev.end(), step.begin(), step.end());
  }
  return parse_chrome_trace(chrome_trace_text(ev, step_tags, {{"device", "SimDevice"}}),
                            "steps.json");
}

TEST(Report, ShowsEverySection) {
  std::string html = render_report(stepped(3), "step.json");
  for (const char* label :
       {"Memory timeline", "Top allocations at peak", "Swap bandwidth", "Stalls",
        "Fragmentation", "id='memory-timeline'", "id='swap-bandwidth'", "layer12.act",
        "swap-out (D2H)", "pinned host", "step.json", "Steps", "id='steps'",
        "class='step-marks'", "step begins"}) {
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

// Among blocks of one size the table shows the earliest allocated first (then the lower
// address), so the same trace always gives the same rows: it listed them in hash-map order
// before, and which 15 of many equal blocks were shown changed from run to run with the
// addresses (a CLI test looking for the first conv's output failed now and then).
TEST(Report, TopAllocationsOfOneSizeAreListedOldestFirst) {
  using test::make_event;
  ParsedTrace t;
  // 20 blocks of 2 MiB, allocated at times 1000, 999, ... (the earliest at the highest
  // address), then one of 4 MiB: all live at the peak.
  for (int i = 0; i < 20; ++i)
    t.events.push_back(make_event(1000 - static_cast<std::uint64_t>(i), EventKind::Alloc,
                                  0x100000 + static_cast<std::uint64_t>(i) * 0x200000, 2 << 20));
  std::sort(t.events.begin(), t.events.end(),
            [](const TraceEvent& a, const TraceEvent& b) { return a.time_ns < b.time_ns; });
  t.events.push_back(make_event(2000, EventKind::Alloc, 0x9000000, 4 << 20));
  const std::string html = render_report(t, "ties.json");
  const std::string table = html.substr(html.find("id='top-allocations'"));
  // The 4 MiB block first, then the 14 oldest 2 MiB blocks, oldest (highest address) first.
  std::vector<std::size_t> at;
  at.push_back(table.find("0x9000000"));
  for (int i = 19; i >= 6; --i) {
    std::ostringstream address;
    address << "0x" << std::hex << 0x100000 + i * 0x200000;
    at.push_back(table.find(address.str() + "<"));
  }
  for (std::size_t k = 0; k < at.size(); ++k) {
    ASSERT_NE(at[k], std::string::npos) << "row " << k;
    if (k > 0) EXPECT_LT(at[k - 1], at[k]) << "row " << k;
  }
  for (int i = 0; i < 6; ++i) {
    std::ostringstream address;
    address << "0x" << std::hex << 0x100000 + i * 0x200000;
    EXPECT_EQ(table.find(address.str() + "<"), std::string::npos) << address.str();
  }
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

// The html of the element that starts at `marker` up to `close` (inclusive).
std::string element(const std::string& html, const std::string& marker, const std::string& close) {
  const std::size_t from = html.find(marker);
  if (from == std::string::npos) return "";
  return html.substr(from, html.find(close, from) + close.size() - from);
}

// A row of the steps table, by scope and step number.
std::string step_row(const std::string& html, std::uint64_t scope, std::uint64_t step) {
  return element(html,
                 "<tr class='step' data-scope='" + std::to_string(scope) + "' data-step='" +
                     std::to_string(step) + "'>",
                 "</tr>");
}

// What a step holds, computed here from the events: those between its mark and its scope's
// next one (by time), the counters replayed over every event.
struct Expected {
  MemoryCounters peak;
  std::uint64_t out = 0, in = 0;
  std::size_t outs = 0, ins = 0, stalls = 0;
};
std::vector<Expected> expected_steps(const ParsedTrace& t, std::uint64_t scope) {
  std::vector<std::uint64_t> begins;
  for (const TraceEvent& e : t.events)
    if (e.kind == EventKind::Mark && e.address == scope) begins.push_back(e.time_ns);
  std::vector<Expected> out(begins.size());
  CounterReplay replay(t.baseline);
  for (const TraceEvent& e : t.events) {
    replay.apply(e);
    const auto after = std::upper_bound(begins.begin(), begins.end(), e.time_ns);
    if (after == begins.begin()) continue;
    Expected& x = out[static_cast<std::size_t>(after - begins.begin() - 1)];
    const MemoryCounters& c = replay.current();
    x.peak.allocated = std::max(x.peak.allocated, c.allocated);
    x.peak.mapped = std::max(x.peak.mapped, c.mapped);
    if (e.kind == EventKind::SwapOut) x.out += e.bytes, ++x.outs;
    if (e.kind == EventKind::SwapIn) x.in += e.bytes, ++x.ins;
    if (e.kind == EventKind::Stall) ++x.stalls;
  }
  return out;
}

void expect_step_figures(const std::string& html, const ParsedTrace& t, std::uint64_t scope) {
  const std::vector<Expected> steps = expected_steps(t, scope);
  ASSERT_FALSE(steps.empty());
  for (std::size_t i = 0; i < steps.size(); ++i) {
    SCOPED_TRACE("scope " + std::to_string(scope) + ", step " + std::to_string(i + 1));
    const std::string row = step_row(html, scope, i + 1);
    ASSERT_FALSE(row.empty());
    const Expected& x = steps[i];
    for (const std::string& cell :
         {"<td>" + format_bytes(x.peak.allocated) + "</td><td>" + format_bytes(x.peak.mapped) +
              "</td><td>" + format_bytes(x.out) + " (" + std::to_string(x.outs) + ")</td><td>" +
              format_bytes(x.in) + " (" + std::to_string(x.ins) + ")</td><td>" +
              std::to_string(x.stalls) + "</td>"})
      EXPECT_NE(row.find(cell), std::string::npos) << cell << "\nin " << row;
  }
}

// Steps differ (each synthetic step draws its own sizes), so each step's peak is its own.
TEST(Report, StepMarksAndPerStepFiguresMatchTheEvents) {
  const ParsedTrace t = stepped(4, 7);
  const std::string html = render_report(t, "steps.json");
  expect_step_figures(html, t, 7);
  // Each step's figures differ from the next's: the rows are not the whole trace's figures.
  EXPECT_NE(step_row(html, 7, 1).substr(40), step_row(html, 7, 2).substr(40));
  // The chart: a line and a label per step (4 steps fit), under the lines.
  const std::string chart = element(html, "id='memory-timeline'", "</svg>");
  const std::string marks = element(chart, "<g class='step-marks'", "</g></g>");
  ASSERT_FALSE(marks.empty());
  EXPECT_NE(marks.find("data-scope='7' data-steps='4' data-lines='4' data-labels='4'"),
            std::string::npos)
      << marks;
  for (const char* label : {">1</text>", ">2</text>", ">3</text>", ">4</text>"})
    EXPECT_NE(marks.find(label), std::string::npos) << label;
  EXPECT_LT(chart.find("class='step-marks'"), chart.find("<polyline")) << "marks under lines";
  EXPECT_NE(html.find("<td id='step-count'>4 (scope 7)</td>"), std::string::npos);
  // The last step runs to the trace's end, and says so; its duration is exact.
  const std::string last = step_row(html, 7, 4);
  std::uint64_t begin = 0, end = 0;
  for (const TraceEvent& e : t.events) {
    if (e.kind == EventKind::Mark && e.bytes == 4) begin = e.time_ns;
    end = std::max(end, e.time_ns + e.duration_ns);
  }
  char duration[64];
  std::snprintf(duration, sizeof duration, "<td>%.3f*</td>", (end - begin) / 1e6);
  EXPECT_NE(last.find(duration), std::string::npos) << duration << "\nin " << last;
  EXPECT_NE(html.find("<tr class='steps-gathered' data-scope='7' data-steps='4'>"),
            std::string::npos)
      << "a row of all the steps";
}

// Two training loops in one process (scopes 1 and 2, their steps interleaved): each scope's
// steps run from its marks, with the events between them.
TEST(Report, StepsOfSeveralScopesAreFollowedEachOnItsOwn) {
  ParsedTrace one = stepped(3, 1);
  std::vector<TraceEvent> ev = one.events;
  // Scope 2 begins its steps half-way through scope 1's.
  std::uint64_t begins[3] = {0, 0, 0};
  int n = 0;
  for (const TraceEvent& e : one.events)
    if (e.kind == EventKind::Mark) begins[n++] = e.time_ns;
  for (int i = 0; i < 3; ++i) {
    const std::uint64_t at = (i < 2 ? (begins[i] + begins[i + 1]) / 2 : begins[2] + 5'000'000) + 7;
    ev.push_back(test::make_event(at, EventKind::Mark, 2, static_cast<std::uint64_t>(i + 1),
                                  kHostStream, 0, 100));
  }
  std::sort(ev.begin(), ev.end(), [](auto& a, auto& b) { return a.time_ns < b.time_ns; });
  const ParsedTrace t = parse_chrome_trace(chrome_trace_text(ev, step_tags), "scopes.json");
  const std::string html = render_report(t, "scopes.json");
  expect_step_figures(html, t, 1);
  expect_step_figures(html, t, 2);
  EXPECT_NE(html.find("<th>scope</th>"), std::string::npos);
  EXPECT_NE(html.find("3 (scope 1), 3 (scope 2)"), std::string::npos);
  EXPECT_NE(html.find("data-scope='1' data-steps='3'"), std::string::npos);
  EXPECT_NE(html.find("data-scope='2' data-steps='3'"), std::string::npos);
  EXPECT_NE(html.find("steps, scope 2"), std::string::npos) << "the legend names each scope";
}

// Scopes named (spill_set_scope_name: a scope_name event before each of its step marks) show
// their latest name beside their number, escaped: in the summary, the legend and the table. A
// name cleared (tag 0) leaves the number alone; a name event of a scope with no steps is no
// scope of the report. Read back from the trace text spill writes.
TEST(Report, NamedScopesAreShownByTheirLatestName) {
  using test::make_event;
  const std::uint64_t gpt = (std::uint64_t{1} << 63) + 1, adam = gpt + 1;
  std::map<std::uint32_t, std::string> names = {{9, "step begins"},
                                                {20, "offload GPT<'&>"},
                                                {21, "first name"},
                                                {22, "guard AdamW"},
                                                {23, "a\u202Eb"}};  // a right-to-left override
  std::vector<TraceEvent> ev = {make_event(0, EventKind::ScopeName, adam, 0, kHostStream, 0, 21),
                                make_event(1, EventKind::ScopeName, 77, 0, kHostStream, 0, 22),
                                make_event(2, EventKind::ScopeName, 5, 0, kHostStream, 0, 22)};
  for (std::uint64_t i = 1; i <= 2; ++i) {
    const std::uint64_t at = i * 1000;
    ev.push_back(make_event(at, EventKind::ScopeName, gpt, 0, kHostStream, 0, 20));
    ev.push_back(make_event(at, EventKind::Mark, gpt, i, kHostStream, 0, 9));
    ev.push_back(make_event(at + 100, EventKind::ScopeName, adam, 0, kHostStream, 0, 22));
    ev.push_back(make_event(at + 100, EventKind::Mark, adam, i, kHostStream, 0, 9));
    ev.push_back(make_event(at + 200, EventKind::ScopeName, 5, 0, kHostStream, 0, 0));
    ev.push_back(make_event(at + 200, EventKind::Mark, 5, i, kHostStream, 0, 9));
    ev.push_back(make_event(at + 300, EventKind::ScopeName, 6, 0, kHostStream, 0, 23));
    ev.push_back(make_event(at + 300, EventKind::Mark, 6, i, kHostStream, 0, 9));
  }
  const auto tags = [&](std::uint32_t tag) { return names.count(tag) ? names[tag] : ""; };
  const ParsedTrace t = parse_chrome_trace(chrome_trace_text(ev, tags), "named.json");
  const std::string html = render_report(t, "named.json");
  const std::string g = std::to_string(gpt), a = std::to_string(adam);
  EXPECT_NE(html.find("<td id='step-count'>2 (scope 5), 2 (a\uFFFDb (scope 6)), 2 (offload "
                      "GPT&lt;&#39;&amp;&gt; (scope " + g + ")), 2 (guard AdamW (scope " + a +
                      "))</td>"),
            std::string::npos)
      << element(html, "<td id='step-count'>", "</td>");
  EXPECT_NE(html.find("steps, guard AdamW (scope " + a + ")"), std::string::npos)
      << "the legend names each scope";
  const std::string table = element(html, "<table id='steps'>", "</table>");
  EXPECT_NE(table.find("<td>offload GPT&lt;&#39;&amp;&gt; (scope " + g + ")</td>"),
            std::string::npos)
      << table;
  EXPECT_NE(table.find("<td>scope 5</td>"), std::string::npos) << "its name was cleared";
  EXPECT_EQ(table.find("first name"), std::string::npos) << "the latest name";
  EXPECT_EQ(html.find("scope 77"), std::string::npos) << "a name is no scope";
  EXPECT_EQ(html.find("\u202E"), std::string::npos) << "no override reorders the page";
}

// Marks carry no device: two swappers beginning the same step of scope 0 record its number
// twice, and the step is one.
TEST(Report, AStepMarkedTwiceIsOneStep) {
  using test::make_event;
  ParsedTrace t;
  t.tag_names[5] = "step begins";
  t.events = {make_event(0, EventKind::Mark, 0, 1, kHostStream, 0, 5),
              make_event(10, EventKind::Mark, 0, 1, kHostStream, 0, 5),
              make_event(20, EventKind::Alloc, 0x10, 4096),
              make_event(30, EventKind::Free, 0x10, 4096),
              make_event(1000, EventKind::Mark, 0, 2, kHostStream, 0, 5),
              make_event(1010, EventKind::Mark, 0, 2, kHostStream, 0, 5),
              make_event(2000, EventKind::Alloc, 0x10, 8192)};
  const std::string html = render_report(t, "two.json");
  EXPECT_NE(html.find("<td id='step-count'>2 (scope 0)</td>"), std::string::npos);
  EXPECT_NE(step_row(html, 0, 1).find("<td>0.001</td><td>4.00 KiB</td>"), std::string::npos)
      << step_row(html, 0, 1);
  EXPECT_NE(step_row(html, 0, 2).find("<td>8.00 KiB</td>"), std::string::npos);
}

// The labels drawn above the memory timeline: (x, text) of each.
std::vector<std::pair<double, std::string>> mark_labels(const std::string& html) {
  const std::string marks = element(html, "<g class='step-marks'", "</g></g>");
  std::vector<std::pair<double, std::string>> out;
  for (std::size_t p = marks.find("<text x='"); p != std::string::npos;
       p = marks.find("<text x='", p + 1)) {
    const double x = std::stod(marks.substr(p + 9));
    const std::size_t from = marks.find('>', p) + 1;
    out.emplace_back(x, marks.substr(from, marks.find('<', from) - from));
  }
  return out;
}

std::size_t count(const std::string& s, const std::string& what) {
  std::size_t n = 0;
  for (std::size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

// 5,000 steps: a line per pixel column at most, labels of every k-th step that never overlap,
// and a table of the first and last steps with the others gathered.
TEST(Report, ManyStepsKeepThePageBounded) {
  using test::make_event;
  ParsedTrace t;
  t.tag_names[9] = "step begins";
  for (std::uint64_t i = 0; i < 5000; ++i) {
    const std::uint64_t at = i * 1'000'000;
    t.events.push_back(make_event(at, EventKind::Mark, 0, i + 1, kHostStream, 0, 9));
    t.events.push_back(make_event(at + 100, EventKind::Alloc, 0x10, (i % 7 + 1) << 20));
    t.events.push_back(make_event(at + 200, EventKind::SwapOut, 0x10, (i % 7 + 1) << 20, 0, 50));
    t.events.push_back(make_event(at + 900, EventKind::Free, 0x10, (i % 7 + 1) << 20));
  }
  const std::string html = render_report(t, "many.json");
  EXPECT_LT(html.size(), 1u << 20) << "the page does not grow with the steps";
  const std::string marks = element(html, "<g class='step-marks'", "</g></g>");
  ASSERT_FALSE(marks.empty());
  EXPECT_NE(marks.find("data-steps='5000'"), std::string::npos);
  const std::size_t lines = count(marks, "M");
  EXPECT_GT(lines, 600u);
  EXPECT_LE(lines, 670u) << "a line per pixel column at most";
  const auto labels = mark_labels(html);
  EXPECT_GE(labels.size(), 10u);
  EXPECT_LE(labels.size(), 100u);
  // So dense, a line across the plot would grey it: the labelled steps get one, others a tick.
  EXPECT_NE(marks.find("data-dense='1'"), std::string::npos);
  EXPECT_EQ(count(marks, "V"), labels.size());
  for (std::size_t i = 1; i < labels.size(); ++i) {
    // A label is about 5.5 px a digit wide: the next starts after this one ends.
    const double half_widths = 5.5 * (labels[i - 1].second.size() + labels[i].second.size()) / 2;
    EXPECT_GE(labels[i].first - labels[i - 1].first, half_widths)
        << labels[i - 1].second << " and " << labels[i].second << " overlap";
    EXPECT_EQ(std::stoull(labels[i].second) % 100, 0u) << "every k-th step, k round";
  }
  const std::string table = element(html, "<table id='steps'>", "</table>");
  EXPECT_EQ(count(table, "<tr class='step' "), 20u) << "the first and last 10";
  EXPECT_NE(table.find("4980 steps (11&ndash;4990)"), std::string::npos);
  EXPECT_NE(table.find("all 5000"), std::string::npos);
  EXPECT_NE(step_row(html, 0, 4995).find("<td>" + format_bytes((4994 % 7 + 1) << 20) + "</td>"),
            std::string::npos)
      << step_row(html, 0, 4995);
  // The gathered rows' totals: every step's swap-out.
  std::uint64_t out = 0;
  for (std::uint64_t i = 0; i < 5000; ++i) out += (i % 7 + 1) << 20;
  EXPECT_NE(table.find(format_bytes(out) + " (5000)"), std::string::npos);
}

// Marks as no swapper records them: a thousand scopes of one mark each, numbers that go
// back or reach 2^63 - 1, the largest scope. The page is finite and says what it leaves out.
TEST(Report, OddStepMarksMakeAFinitePage) {
  using test::make_event;
  ParsedTrace t;
  t.tag_names[9] = "step begins";
  const std::uint64_t big = (std::uint64_t{1} << 63) - 1;
  for (std::uint64_t i = 0; i < 1000; ++i)
    t.events.push_back(make_event(i * 10, EventKind::Mark, 1000 + i, 1, kHostStream, 0, 9));
  std::uint64_t at = 20'000;
  for (std::uint64_t n : std::vector<std::uint64_t>{5, 3, big, 1, big})
    t.events.push_back(make_event(at += 100, EventKind::Mark, ~0ull, n, kHostStream, 0, 9));
  std::stable_sort(t.events.begin(), t.events.end(),
                   [](auto& a, auto& b) { return a.time_ns < b.time_ns; });
  const std::string html = render_report(t, "odd.json");
  EXPECT_LT(html.size(), 1u << 20);
  EXPECT_NE(html.find("data-scope='18446744073709551615' data-steps='5'"), std::string::npos);
  EXPECT_NE(html.find("997 step marks of 997 other scopes"), std::string::npos);
  EXPECT_NE(html.find(">9223372036854775807<"), std::string::npos);
  for (const char* bad : {"'nan", "'-nan", "'inf", "'-inf", ">nan", ">inf", "-nan", ",inf", " inf"})
    EXPECT_EQ(html.find(bad), std::string::npos) << bad;
}

TEST(Report, NoStepMarksNoStepSection) {
  ParsedTrace t = synthetic();
  // A user's mark of another name is no step.
  t.events.insert(t.events.begin(), test::make_event(0, EventKind::Mark, 0, 1, kHostStream, 0, 3));
  const std::string html = render_report(t, "step.json");
  for (const char* absent : {"<h2>Steps", "id='steps'", "step-marks", "step-count", "step begins"})
    EXPECT_EQ(html.find(absent), std::string::npos) << absent;
}

// Issue 31b: the memory axis was always in GiB ("0.00" ticks for a trace of a few MiB).
TEST(Report, MemoryAxisIsInTheUnitThatFits) {
  using test::make_event;
  struct Case {
    std::uint64_t bytes;
    const char* unit;
    std::vector<const char*> ticks;
  };
  const Case cases[] = {
      {3 << 20, "MiB", {">0<", ">1<", ">2<", ">3<"}},
      {600 << 10, "KiB", {">0<", ">200<", ">400<", ">600<"}},
      {700, "B", {">0<", ">200<", ">600<"}},
      {3ull << 30, "GiB", {">0<", ">1<", ">3<"}},
      {5ull << 40, "TiB", {">0<", ">2<", ">4<"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.unit);
    ParsedTrace t;
    t.events = {make_event(0, EventKind::Map, 0x10, c.bytes),
                make_event(10, EventKind::Alloc, 0x10, c.bytes),
                make_event(35'000'000, EventKind::Free, 0x10, c.bytes)};  // ticks 0, 10, 20, 30
    const std::string chart = element(render_report(t, "small.json"), "id='memory-timeline'",
                                      "</svg>");
    EXPECT_NE(chart.find(std::string("data-unit='") + c.unit + "'"), std::string::npos);
    EXPECT_NE(chart.find(std::string(">") + c.unit + "</text>"), std::string::npos);
    for (const char* tick : c.ticks) EXPECT_NE(chart.find(tick), std::string::npos) << tick;
    EXPECT_EQ(chart.find(">0.00<"), std::string::npos);
  }
}

// A demand fetch stalls its stream, and the host's wait for room inside the same fetch is a
// second stall on the host's row: the total and the step count the time they cover once (audit
// 41b #1: summed, spill demo's first step stalled 221 ms in 149), the rows each their own.
TEST(Report, OverlappingStallsOfTwoRowsCountTheirTimeOnce) {
  using test::make_event;
  const std::vector<TraceEvent> ev = {
      make_event(0, EventKind::Mark, 0, 1, kHostStream, 0, 100),  // step 1 of scope 0
      make_event(1'000'000, EventKind::Stall, 0x10, 0, 0, 10'000'000),
      make_event(3'000'000, EventKind::Stall, 0x10, 0, kHostStream, 10'000'000),
      make_event(4'000'000, EventKind::Stall, 0x20, 0, kHostStream, 2'000'000),
      make_event(20'000'000, EventKind::Stall, 0x30, 0, 0, 5'000'000)};
  const ParsedTrace t = parse_chrome_trace(
      chrome_trace_text(ev, step_tags, {{"device", "SimDevice"}}), "overlap.json");
  const ReportSummary s = summarize(t);
  EXPECT_EQ(s.stalls, 4u);
  EXPECT_DOUBLE_EQ(s.stall_ms, 17.0);  // 1-13 ms and 20-25 ms; the rows sum to 27
  const std::string html = render_report(t, "overlap.json");
  const std::string table = element(html, "id='stalls'", "</table>");
  EXPECT_NE(table.find("<td class='l'>default</td><td>2</td><td>15.000</td>"), std::string::npos)
      << table;
  EXPECT_NE(table.find("<td class='l'>host</td><td>2</td><td>12.000</td>"), std::string::npos)
      << table;
  EXPECT_NE(table.find("<th class='l'>total</th><th>4</th><th>17.000</th>"), std::string::npos)
      << table;
  const std::string row = step_row(html, 0, 1);
  EXPECT_NE(row.find("<td>4</td><td>17.000</td>"), std::string::npos) << row;
}

// Audit 31b #13: the host's waits are on kHostStream, which read as 0xffffffffffffffff.
TEST(Report, TheHostsStallsAreNamed) {
  using test::make_event;
  ParsedTrace t;
  t.events = {make_event(0, EventKind::Stall, 0x10, 0, kHostStream, 500),
              make_event(10, EventKind::Stall, 0x10, 0, 0, 500),
              make_event(20, EventKind::Stall, 0x10, 0, 0x7f00, 500)};
  const std::string table = element(render_report(t, "host.json"), "id='stalls'", "</table>");
  EXPECT_NE(table.find("<td class='l'>host</td>"), std::string::npos) << table;
  EXPECT_NE(table.find("<td class='l'>default</td>"), std::string::npos);
  EXPECT_NE(table.find("<td class='l'>0x7f00</td>"), std::string::npos);
  EXPECT_EQ(table.find("0xffffffffffffffff"), std::string::npos);
}

}  // namespace
}  // namespace spill::profiling

#include "profiling/report.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <sstream>
#include <unordered_map>
#include <vector>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"
#include "profiling/counters.hpp"
#include "profiling/downsample.hpp"
#include "profiling/report_html.hpp"
#include "profiling/steps.hpp"

namespace spill::profiling {
namespace {

using namespace report_html;

// A stream as the trace names it: the default stream (0), the host (kHostStream: the
// swapper's waits on the host), else the stream handle's value.
std::string stream_name(std::uint64_t stream) {
  if (stream == 0) return "default";
  if (stream == kHostStream) return "host";
  return hex(stream);
}

std::string tag_of(const ParsedTrace& t, std::uint32_t tag) {
  auto it = t.tag_names.find(tag);
  return it != t.tag_names.end() ? it->second : "";
}

// Rows of a per-stream table, and metadata keys, shown at most (the rest are summed or counted).
constexpr std::size_t kMaxStreamRows = 20, kMaxMetadataKeys = 32;

std::string counters_text(const MemoryCounters& c) {
  return format_bytes(c.allocated) + " allocated, " + format_bytes(c.mapped) + " mapped, " +
         format_bytes(c.on_host) + " on host, " + format_bytes(c.host_pinned) + " pinned host";
}

// What the figures start from, said plainly: a trace that begins mid-run (an export after
// earlier ones) starts from its baseline; one without a baseline that frees what it never
// allocated gets an inferred one and lower bounds; events lost to full rings.
std::string starting_note(const ParsedTrace& t) {
  std::string out;
  if (t.has_baseline && !(t.baseline == MemoryCounters{})) {
    out += "<p class='note' id='mid-run'>This trace begins mid-run: when its first event "
           "happened, " + counters_text(t.baseline) + " were already there. The figures start "
           "from there; blocks allocated before the trace are missing from the top "
           "allocations.</p>";
  } else if (t.baseline_inferred) {
    out += "<p class='note' id='mid-run'>This trace seems to begin mid-run: it holds no "
           "starting state, and its events free or move memory it never saw allocated. The "
           "figures start from the least state that explains them (at least " +
           counters_text(t.baseline) + " when it began), so they are lower bounds; blocks "
           "allocated before the trace are missing from the top allocations.</p>";
  }
  if (t.dropped_events > 0) {
    out += "<p class='note' id='dropped'>" + std::to_string(t.dropped_events) +
           " events were lost before this trace was written (a thread's trace ring, 65,536 "
           "events, overwrote its oldest): figures around them are approximate. Export more "
           "often (spill.trace()) to keep every event.</p>";
  }
  return out;
}

}  // namespace

ReportSummary summarize(const ParsedTrace& trace) {
  ReportSummary s;
  s.events = trace.events.size();
  s.baseline = trace.baseline;
  s.peak = trace.baseline;
  if (trace.events.empty()) return s;
  CounterReplay replay(trace.baseline);
  std::uint64_t t0 = trace.events.front().time_ns, t1 = t0;
  for (const TraceEvent& e : trace.events) {
    replay.apply(e);
    t0 = std::min(t0, e.time_ns);
    t1 = std::max(t1, e.time_ns + e.duration_ns);
    s.count(e, "trace: bytes swapped");
    if (e.kind == EventKind::Evict)
      ++s.evictions,
          s.evicted_bytes = checked_add(s.evicted_bytes, e.bytes, "trace: bytes evicted");
    if (e.kind == EventKind::Oom) ++s.ooms;
  }
  s.duration_ms = (t1 - t0) / 1e6;
  s.peak = replay.peak();
  s.fragmentation = s.peak.allocated > 0
                        ? static_cast<double>(s.peak.mapped) / static_cast<double>(s.peak.allocated)
                        : 0.0;
  return s;
}

std::string render_report(const ParsedTrace& trace, const std::string& source) {
  std::ostringstream o;
  o << "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>spill report: "
    << esc(source) << "</title><style>"
    << "body{font-family:sans-serif;margin:24px;color:#222;max-width:1000px}"
    << "table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;"
    << "padding:4px 10px;text-align:right}th{background:#eee}td.l,th.l{text-align:left}"
    << "h2{margin-top:28px;border-bottom:1px solid #ddd}.note{color:#666;font-size:13px}"
    << "#steps{font-size:13px}#steps td{white-space:nowrap}"
    << "</style></head><body>";
  o << "<h1>spill report</h1><p class='note'>trace: " << esc(source) << "</p>";
  if (!trace.metadata.empty()) {
    o << "<p class='note'>";
    std::size_t shown = 0;
    for (auto& [k, v] : trace.metadata.items()) {
      if (shown++ == kMaxMetadataKeys) {
        o << "and " << trace.metadata.size() - kMaxMetadataKeys << " more keys";
        break;
      }
      std::string text = v.is_string() ? v.get<std::string>() : v.dump();
      if (text.size() > 200) text = text.substr(0, 200) + "...";
      o << esc(k.size() > 64 ? k.substr(0, 64) + "..." : k) << ": " << esc(text) << "; ";
    }
    o << "</p>";
  }
  if (trace.events.empty()) {
    o << "<h2>Empty trace</h2><p id='empty'>This trace is empty: it holds no events, so there "
      << "is no memory timeline to show. Was recording switched off (trace:off)?</p>"
      << "</body></html>";
    return o.str();
  }
  ReportSummary s = summarize(trace);
  const TraceSteps steps = trace_steps(trace, kMaxStepScopes);
  std::string steps_text;
  for (const ScopeSteps& scope : steps.scopes)
    steps_text += (steps_text.empty() ? "" : ", ") + std::to_string(scope.steps.size()) + " (" +
                  scope.label() + ")";
  if (steps.other_scopes > 0)
    steps_text += "; " + std::to_string(steps.other_marks) + " step marks of " +
                  std::to_string(steps.other_scopes) + " other scopes, not shown";
  // Which clock the times are on: simulated device time, or the host's wall clock.
  const bool simulated = trace.clock.rfind("simulated", 0) == 0;
  const std::string x_note = simulated ? ", simulated" : "";
  const std::uint64_t t0 = std::min_element(trace.events.begin(), trace.events.end(),
                                            [](auto& a, auto& b) { return a.time_ns < b.time_ns; })
                               ->time_ns;
  auto ms = [&](std::uint64_t ns) { return (static_cast<double>(ns) - t0) / 1e6; };

  o << "<h2>Summary</h2><table id='summary'>"
    << "<tr><th class='l'>events</th><td>" << s.events << "</td></tr>"
    << "<tr><th class='l'>duration</th><td>" << fmt("%.3f ms", s.duration_ms) << "</td></tr>"
    << "<tr><th class='l'>time base</th><td id='clock'>"
    << esc(trace.clock.empty() ? "not recorded (host steady clock)" : excerpt(trace.clock, 200))
    << "</td></tr>"
    << "<tr><th class='l'>peak allocated</th><td>" << format_bytes(s.peak.allocated) << "</td></tr>"
    << "<tr><th class='l'>peak mapped</th><td>" << format_bytes(s.peak.mapped) << "</td></tr>"
    << "<tr><th class='l'>peak on host</th><td>" << format_bytes(s.peak.on_host) << "</td></tr>"
    << "<tr><th class='l'>peak pinned host</th><td>" << format_bytes(s.peak.host_pinned)
    << "</td></tr><tr><th class='l'>swapped out</th><td>" << format_bytes(s.swapped_out_bytes)
    << " in " << s.swap_outs << " copies to the host</td></tr><tr><th class='l'>swapped in</th>"
    << "<td>" << format_bytes(s.swapped_in_bytes) << " in " << s.swap_ins << " copies back</td>"
    << "</tr><tr><th class='l'>evicted</th><td id='evicted'>" << format_bytes(s.evicted_bytes)
    << " in " << s.evictions << " evictions, with a copy or without</td></tr>"
    << "<tr><th class='l'>out-of-memory errors</th><td>" << s.ooms << "</td></tr>";
  if (!steps_text.empty())
    o << "<tr><th class='l'>steps</th><td id='step-count'>" << esc(steps_text) << "</td></tr>";
  if (trace.budget_bytes)
    o << "<tr><th class='l'>budget</th><td id='budget'>" << format_bytes(*trace.budget_bytes)
      << "</td></tr>";
  o << "</table><p class='note' id='copies'>Swapped out and in: every copy in the trace (its "
    << "swap_out and swap_in events), in a training step or not: a trace of spill train also "
    << "holds the copies of its set-up before step 1 (the weights and optimizer state written, "
    << "some evicted at once) and of --check's read-back of the state, which spill train prints "
    << "apart from its steps' (its run figures are these). Evicted: every eviction, those "
    << "copied out and those without a copy (a block whose host copy is current is unmapped "
    << "without one).</p>"
    << starting_note(trace);

  // Memory timeline: each counter as a step series.
  std::vector<Series> mem{{"allocated", "#2c7be5", {}}, {"mapped", "#e67e22", {}},
                          {"on host", "#27ae60", {}}, {"pinned host", "#8e44ad", {}}};
  // Two points a change (before and after, at the event's end), downsampled as they come.
  std::vector<ColumnDownsampler> lines(4, ColumnDownsampler(0, s.duration_ms, kPlotColumns));
  CounterReplay replay(trace.baseline);
  {
    const MemoryCounters& b = trace.baseline;
    const std::int64_t v[4] = {b.allocated, b.mapped, b.on_host, b.host_pinned};
    for (int i = 0; i < 4; ++i) lines[i].add(0, static_cast<double>(v[i]));
  }
  for (const TraceEvent& e : trace.events) {
    MemoryCounters before = replay.current();
    if (!replay.apply(e)) continue;
    double t = ms(e.time_ns + e.duration_ns);
    const MemoryCounters& c = replay.current();
    std::int64_t b[4] = {before.allocated, before.mapped, before.on_host, before.host_pinned};
    std::int64_t a[4] = {c.allocated, c.mapped, c.on_host, c.host_pinned};
    for (int i = 0; i < 4; ++i) {
      lines[i].add(t, static_cast<double>(b[i]));
      lines[i].add(t, static_cast<double>(a[i]));
    }
  }
  for (int i = 0; i < 4; ++i) mem[i].points = lines[i].points();
  std::vector<Level> levels;
  if (trace.budget_bytes)
    levels.push_back({"budget " + format_bytes(*trace.budget_bytes), "#c0392b",
                      static_cast<double>(*trace.budget_bytes)});
  std::vector<StepMarks> marks;
  for (std::size_t i = 0; i < steps.scopes.size(); ++i) {
    const ScopeSteps& scope = steps.scopes[i];
    StepMarks m{steps.scopes.size() == 1 ? std::string("step begins")
                                         : "steps, " + scope.label(),
                kStepColours[i % std::size(kStepColours)], scope.scope, {}};
    m.marks.reserve(scope.steps.size());
    for (const StepFigures& f : scope.steps) m.marks.emplace_back(ms(f.begin_ns), f.number);
    marks.push_back(std::move(m));
  }
  o << "<h2>Memory timeline</h2>"
    << svg_chart(mem, 0, s.duration_ms, x_note, ValueAxis{"", 1, true}, "memory-timeline",
                 levels, marks);
  if (!steps.empty()) o << steps_section(steps, ms);

  // Largest live allocations when allocated bytes peaked.
  // First the event at which allocated bytes first peak, then the blocks live there (copying
  // the live set at every new peak would be quadratic in a trace that only grows).
  std::size_t peak_at = 0;
  {
    CounterReplay allocated(trace.baseline);
    std::int64_t best = std::numeric_limits<std::int64_t>::min();
    for (std::size_t i = 0; i < trace.events.size(); ++i) {
      allocated.apply(trace.events[i]);
      if (allocated.current().allocated > best) best = allocated.current().allocated, peak_at = i;
    }
  }
  std::unordered_map<std::uint64_t, const TraceEvent*> at_peak;
  for (std::size_t i = 0; i <= peak_at; ++i) {
    const TraceEvent& e = trace.events[i];
    if (e.kind == EventKind::Alloc) at_peak[e.address] = &e;
    if (e.kind == EventKind::Free) at_peak.erase(e.address);
  }
  // The names those blocks were given (Name events), before the peak or after it, while the
  // address still held the same block.
  std::unordered_map<std::uint64_t, std::uint32_t> named;
  {
    std::unordered_map<std::uint64_t, const TraceEvent*> live;
    for (const TraceEvent& e : trace.events) {
      if (e.kind == EventKind::Alloc) live[e.address] = &e;
      if (e.kind == EventKind::Free) live.erase(e.address);
      if (e.kind != EventKind::Name) continue;
      auto now = live.find(e.address);
      auto then = at_peak.find(e.address);
      if (now != live.end() && then != at_peak.end() && now->second == then->second)
        named[e.address] = e.tag;
    }
  }
  std::vector<const TraceEvent*> top;
  for (auto& [a, e] : at_peak) top.push_back(e);
  const std::size_t shown = std::min<std::size_t>(top.size(), 15);
  // Largest first; among equal sizes the longest-lived (earliest allocated), then the lower
  // address: the same trace always shows the same rows, whatever order the map holds them in.
  std::partial_sort(top.begin(), top.begin() + static_cast<std::ptrdiff_t>(shown), top.end(),
                    [](auto* a, auto* b) {
                      if (a->bytes != b->bytes) return a->bytes > b->bytes;
                      if (a->time_ns != b->time_ns) return a->time_ns < b->time_ns;
                      return a->address < b->address;
                    });
  top.resize(shown);
  o << "<h2>Top allocations at peak</h2><p class='note'>" << at_peak.size()
    << " blocks live when allocated memory peaked at " << format_bytes(s.peak.allocated)
    << (trace.baseline.allocated > 0
            ? " (besides the blocks allocated before the trace began, " +
                  format_bytes(trace.baseline.allocated) + (trace.baseline_inferred ? " or more" : "") +
                  ", which it cannot name)"
            : std::string())
    << "</p><table id='top-allocations'><tr><th class='l'>address</th><th>size</th>"
    << "<th class='l'>tag</th><th>allocated at (ms)</th></tr>";
  for (const TraceEvent* e : top) {
    o << "<tr><td class='l'>" << hex(e->address) << "</td><td>" << format_bytes(e->bytes)
      << "</td><td class='l'>"
      << esc(tag_of(trace, named.count(e->address) ? named[e->address] : e->tag)) << "</td><td>"
      << fmt("%.3f", ms(e->time_ns)) << "</td></tr>";
  }
  o << "</table>";

  // Swap bandwidth: each copy's bytes spread over its duration, in bins.
  const int bins = 60;
  double width = std::max(s.duration_ms / bins, 1e-6);
  std::vector<double> out_bytes(bins, 0), in_bytes(bins, 0);
  for (const TraceEvent& e : trace.events) {
    if (e.kind != EventKind::SwapOut && e.kind != EventKind::SwapIn) continue;
    auto& v = e.kind == EventKind::SwapOut ? out_bytes : in_bytes;
    double a = ms(e.time_ns), b = ms(e.time_ns + e.duration_ns);
    if (b <= a) {
      v[std::min(bins - 1, static_cast<int>(a / width))] += e.bytes;
      continue;
    }
    for (int i = std::max(0, static_cast<int>(a / width)); i < bins && i * width < b; ++i) {
      double overlap = std::min(b, (i + 1) * width) - std::max(a, i * width);
      if (overlap > 0) v[i] += e.bytes * overlap / (b - a);
    }
  }
  std::vector<Series> bw{{"swap-out (D2H)", "#e67e22", {}}, {"swap-in (H2D)", "#27ae60", {}}};
  for (int i = 0; i < bins; ++i) {
    double gbps_out = out_bytes[i] / (width * 1e-3) / 1e9, gbps_in = in_bytes[i] / (width * 1e-3) / 1e9;
    bw[0].points.emplace_back(i * width, gbps_out);
    bw[0].points.emplace_back((i + 1) * width, gbps_out);
    bw[1].points.emplace_back(i * width, gbps_in);
    bw[1].points.emplace_back((i + 1) * width, gbps_in);
  }
  o << "<h2>Swap bandwidth</h2><p class='note'>Each copy's bytes are spread over its slice, "
    << "from when it could start (its issue, or the end of the copy before it on the same copy "
    << "stream) to its end; a swap-out that waits for its block's last use shows below the "
    << "link's rate.</p>"
    << svg_chart(bw, 0, s.duration_ms, x_note, ValueAxis{"GB/s", 1.0, false}, "swap-bandwidth");

  // Stalls per stream.
  std::map<std::uint64_t, std::pair<std::size_t, double>> stalls;
  for (const TraceEvent& e : trace.events) {
    if (e.kind != EventKind::Stall) continue;
    stalls[e.stream].first++;
    stalls[e.stream].second += e.duration_ns / 1e6;
  }
  // What the trace marks: waits for a block's bytes to come back, and the host's waits for
  // room. `spill train`'s and `spill demo`'s stall columns are another measure (the step's
  // time less its compute), neither always more nor always less (audit 41b #1).
  o << "<h2>Stalls</h2><p class='note'>Waits for a swapped-out block's bytes to come back (a "
    << "pin that found it on the host or still landing), per stream; the host's row also "
    << "holds its waits for a swap-out to finish (room for an allocation), which may overlap "
    << "a stream's stall: the total counts the time any of them stalled once, so it can be "
    << "less than the rows' sum. spill train's and spill demo's stall columns are another "
    << "measure, the step's time less its compute: they also count late prefetches, and not "
    << "the host's waits hidden behind queued work.</p>"
    << "<table id='stalls'><tr><th class='l'>stream</th><th>stalls</th>"
    << "<th>time (ms)</th></tr>";
  // The streams that stalled longest (in stream order), the others summed in one row.
  std::vector<std::pair<std::uint64_t, std::pair<std::size_t, double>>> rows(stalls.begin(),
                                                                               stalls.end());
  std::size_t other_streams = 0, other_stalls = 0;
  double other_ms = 0;
  if (rows.size() > kMaxStreamRows) {
    std::stable_sort(rows.begin(), rows.end(),
                     [](auto& a, auto& b) { return a.second.second > b.second.second; });
    for (std::size_t i = kMaxStreamRows; i < rows.size(); ++i)
      ++other_streams, other_stalls += rows[i].second.first, other_ms += rows[i].second.second;
    rows.resize(kMaxStreamRows);
    std::sort(rows.begin(), rows.end());
  }
  for (auto& [stream, v] : rows) {
    o << "<tr><td class='l'>" << stream_name(stream) << "</td><td>" << v.first
      << "</td><td>" << fmt("%.3f", v.second) << "</td></tr>";
  }
  if (other_streams > 0)
    o << "<tr><td class='l'>" << other_streams << " other streams</td><td>" << other_stalls
      << "</td><td>" << fmt("%.3f", other_ms) << "</td></tr>";
  o << "<tr><th class='l'>total</th><th>" << s.stalls << "</th><th>" << fmt("%.3f", s.stall_ms)
    << "</th></tr></table>";

  o << "<h2>Fragmentation</h2><p id='fragmentation'>peak mapped / peak allocated = "
    << (s.peak.allocated > 0 ? fmt("%.3f", s.fragmentation) : std::string("n/a (nothing allocated)"))
    << " (1.0 means every mapped byte was handed out at the peak)</p>";
  o << "</body></html>";
  return o.str();
}

}  // namespace spill::profiling

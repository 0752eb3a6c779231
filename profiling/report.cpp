#include "profiling/report.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
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

namespace spill::profiling {
namespace {

std::string esc(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

std::string hex(std::uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string tag_of(const ParsedTrace& t, std::uint32_t tag) {
  auto it = t.tag_names.find(tag);
  return it != t.tag_names.end() ? it->second : "";
}

// Round axis ticks: a step of 1, 2 or 5 times a power of ten giving about `target` intervals
// over [0, span], so labels read 0, 2, 4 ... rather than 0, 2.21, 4.42 or 8.84e+03.
double nice_step(double span, int target = 5) {
  if (!(span > 0) || !std::isfinite(span)) return 1;
  const double raw = span / target;
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * p >= raw) return m * p;
  return 10 * p;
}

// A tick value with as many decimals as the step needs (none for steps of 1 or more).
std::string tick_label(double v, double step) {
  const int decimals = step >= 1 ? 0 : static_cast<int>(std::ceil(-std::log10(step) - 1e-9));
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", std::min(decimals, 9), v);
  return buf;
}

// The time unit that fits a span of `span_ms`: microseconds, milliseconds, seconds or minutes,
// the largest one in which the span is at least 2.
struct TimeUnit {
  const char* name;
  double ms;
};
TimeUnit time_unit(double span_ms) {
  for (TimeUnit u : {TimeUnit{"min", 60000.0}, {"s", 1000.0}, {"ms", 1.0}})
    if (span_ms / u.ms >= 2) return u;
  return {"\u00b5s", 1e-3};
}

// The chart's plot area: 900 px wide less its margins. A line keeps at most 4 points per pixel
// column of it (ColumnDownsampler), so a page stays the same size whatever the trace's length.
constexpr double kChartWidth = 900, kChartLeft = 70, kChartRight = 160;
constexpr std::size_t kPlotColumns =
    static_cast<std::size_t>(kChartWidth - kChartLeft - kChartRight);
// Rows of a per-stream table, and metadata keys, shown at most (the rest are summed or counted).
constexpr std::size_t kMaxStreamRows = 20, kMaxMetadataKeys = 32;

// A line chart of step series over [t0, t1] ms, with axes, round ticks and a legend.
struct Series {
  std::string name, colour;
  std::vector<std::pair<double, double>> points;  // (ms, value)
};

// A level drawn across the chart as a dashed line (a budget), named in the legend.
struct Level {
  std::string name, colour;
  double value;
};

std::string svg_chart(const std::vector<Series>& series, double t0, double t1,
                      const std::string& x_note, const std::string& y_label, double y_scale,
                      const std::string& id, const std::vector<Level>& levels = {}) {
  const double w = kChartWidth, h = 260, left = kChartLeft, right = kChartRight, top = 15,
               bottom = 40;
  double y_max = 0;
  for (const Series& s : series)
    for (auto& p : s.points) y_max = std::max(y_max, p.second / y_scale);
  for (const Level& l : levels) y_max = std::max(y_max, l.value / y_scale);
  if (!(y_max > 0) || !std::isfinite(y_max)) y_max = 1;
  const double y_step = nice_step(y_max, 4);
  y_max = std::ceil(y_max / y_step - 1e-9) * y_step;  // the top line is a round tick
  if (t1 <= t0) t1 = t0 + 1;
  const TimeUnit unit = time_unit(t1 - t0);
  const double x_span = (t1 - t0) / unit.ms, x_step = nice_step(x_span);
  auto x = [&](double t) { return left + (t - t0) / (t1 - t0) * (w - left - right); };
  auto y = [&](double v) { return top + (1 - v / y_scale / y_max) * (h - top - bottom); };
  std::ostringstream o;
  o << "<svg id='" << id << "' viewBox='0 0 " << w << " " << h << "' width='" << w
    << "' height='" << h << "' role='img'>";
  o << "<rect x='" << left << "' y='" << top << "' width='" << w - left - right << "' height='"
    << h - top - bottom << "' fill='#fafafa' stroke='#999'/>";
  for (int i = 0; i * y_step <= y_max * (1 + 1e-9) && i <= 20; ++i) {
    const double v = i * y_step;
    const double yy = top + (1 - v / y_max) * (h - top - bottom);
    o << "<line x1='" << left << "' x2='" << w - right << "' y1='" << yy << "' y2='" << yy
      << "' stroke='#ddd'/><text x='" << left - 6 << "' y='" << yy + 4
      << "' text-anchor='end' font-size='11'>" << tick_label(v, y_step) << "</text>";
  }
  for (int i = 0; i * x_step <= x_span * (1 + 1e-9) && i <= 40; ++i) {
    const double tt = t0 + i * x_step * unit.ms;
    o << "<line x1='" << x(tt) << "' x2='" << x(tt) << "' y1='" << h - bottom << "' y2='"
      << h - bottom + 4 << "' stroke='#999'/><text x='" << x(tt) << "' y='" << h - bottom + 16
      << "' text-anchor='middle' font-size='11'>" << tick_label(i * x_step, x_step)
      << "</text>";
  }
  o << "<text x='" << (left + w - right) / 2 << "' y='" << h - 6
    << "' text-anchor='middle' font-size='12'>time (" << unit.name << x_note << ")</text>";
  o << "<text x='14' y='" << (top + h - bottom) / 2 << "' font-size='12' transform='rotate(-90 14 "
    << (top + h - bottom) / 2 << ")' text-anchor='middle'>" << esc(y_label) << "</text>";
  int row = 0;
  for (const Series& s : series) {
    if (s.points.empty()) continue;
    // data-max: the highest value drawn, exactly (a downsampled line keeps its extremes).
    double drawn_max = s.points.front().second;
    for (auto& p : s.points) drawn_max = std::max(drawn_max, p.second);
    o << "<polyline fill='none' stroke-width='2' stroke='" << s.colour << "' data-series='"
      << esc(s.name) << "' data-max='" << fmt("%.17g", drawn_max) << "' points='";
    for (auto& [t, v] : s.points) o << x(t) << "," << y(v) << " ";
    o << "'/>";
    double ly = top + 14 + 18 * row++;
    o << "<rect x='" << w - right + 12 << "' y='" << ly - 9 << "' width='12' height='12' fill='"
      << s.colour << "'/><text x='" << w - right + 30 << "' y='" << ly + 1
      << "' font-size='12'>" << esc(s.name) << "</text>";
  }
  for (const Level& l : levels) {
    const double yy = y(l.value);
    o << "<line class='level' x1='" << left << "' x2='" << w - right << "' y1='" << yy
      << "' y2='" << yy << "' stroke='" << l.colour << "' stroke-width='1.5' "
      << "stroke-dasharray='6 4'/>";
    double ly = top + 14 + 18 * row++;
    o << "<line x1='" << w - right + 12 << "' x2='" << w - right + 24 << "' y1='" << ly - 3
      << "' y2='" << ly - 3 << "' stroke='" << l.colour << "' stroke-width='2' "
      << "stroke-dasharray='4 2'/><text x='" << w - right + 30 << "' y='" << ly + 1
      << "' font-size='12'>" << esc(l.name) << "</text>";
  }
  o << "</svg>";
  return o.str();
}

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
    if (e.kind == EventKind::SwapOut)
      ++s.swap_outs, s.swapped_out_bytes = checked_add(s.swapped_out_bytes, e.bytes,
                                                       "trace: bytes swapped out");
    if (e.kind == EventKind::SwapIn)
      ++s.swap_ins, s.swapped_in_bytes = checked_add(s.swapped_in_bytes, e.bytes,
                                                     "trace: bytes swapped in");
    if (e.kind == EventKind::Evict)
      ++s.evictions,
          s.evicted_bytes = checked_add(s.evicted_bytes, e.bytes, "trace: bytes evicted");
    if (e.kind == EventKind::Stall) ++s.stalls, s.stall_ms += e.duration_ns / 1e6;
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
  o << "<h2>Memory timeline</h2>"
    << svg_chart(mem, 0, s.duration_ms, x_note, "GiB", 1024.0 * 1024 * 1024, "memory-timeline",
                 levels);

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
  std::partial_sort(top.begin(), top.begin() + static_cast<std::ptrdiff_t>(shown), top.end(),
                    [](auto* a, auto* b) { return a->bytes > b->bytes; });
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
    << svg_chart(bw, 0, s.duration_ms, x_note, "GB/s", 1.0, "swap-bandwidth");

  // Stalls per stream.
  std::map<std::uint64_t, std::pair<std::size_t, double>> stalls;
  for (const TraceEvent& e : trace.events) {
    if (e.kind != EventKind::Stall) continue;
    stalls[e.stream].first++;
    stalls[e.stream].second += e.duration_ns / 1e6;
  }
  // What the trace marks: waits for a block's bytes to come back. `spill train`'s stall column
  // is wider (the step's time less its compute: room waits and late prefetches too).
  o << "<h2>Stalls</h2><p class='note'>Waits for a swapped-out block's bytes to come back (a "
    << "pin that found it on the host or still landing), per stream. spill train's stall "
    << "column counts more: its step time less its compute.</p>"
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
    o << "<tr><td class='l'>" << (stream ? hex(stream) : "default") << "</td><td>" << v.first
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

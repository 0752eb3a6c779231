// The report's SVG line chart and HTML text helpers (profiling/report_html.hpp).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <sstream>

#include "profiling/report_html.hpp"

namespace spill::profiling::report_html {

std::string esc(const std::string& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    // Bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069) in a
    // caller's name would reorder the rest of the page's line: shown as U+FFFD instead.
    const auto u = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
    if (u(0) == 0xE2 && i + 2 < s.size() &&
        ((u(1) == 0x80 && u(2) >= 0xAA && u(2) <= 0xAE) ||
         (u(1) == 0x81 && u(2) >= 0xA6 && u(2) <= 0xA9))) {
      out += "\xEF\xBF\xBD";
      i += 2;
      continue;
    }
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;  // attributes are quoted either way
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

std::pair<const char*, double> byte_unit(double max_bytes) {
  static constexpr const char* names[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  if (!(max_bytes > 0) || !std::isfinite(max_bytes)) return {"GiB", 1024.0 * 1024 * 1024};
  double scale = 1;
  std::size_t i = 0;
  while (i + 1 < std::size(names) && max_bytes / (scale * 1024) >= 1) scale *= 1024, ++i;
  return {names[i], scale};
}

namespace {

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

// A label's width in pixels at font size 9, and the room kept between two.
double label_width(std::uint64_t n) {
  return 5.5 * static_cast<double>(std::to_string(n).size()) + 6;
}

// The marks of one scope: a line in each pixel column that holds a mark (the first there),
// and labels of every k-th step (k = 1, 2, 5, 10, 20 ... such that the labels fit the width),
// each at least its width after the last one drawn, so labels never overlap and a page holds
// at most a line per column and a label per few columns, whatever the number of steps. Marks
// denser than one per 4 columns would grey the plot: then only the labelled steps get a line
// across it, the others a tick at its top.
std::string draw_step_marks(const StepMarks& m, const std::function<double(double)>& x,
                            double plot_left, double plot_right, double y_top,
                            double y_bottom, double label_y) {
  std::uint64_t widest = 1;
  for (auto& [t, n] : m.marks) widest = std::max(widest, n);
  const double width = plot_right - plot_left;
  std::uint64_t every = 1;
  for (std::uint64_t p = 1; p <= (std::uint64_t{1} << 60); p *= 10) {
    bool found = false;
    for (std::uint64_t k : {p, 2 * p, 5 * p}) {
      if (static_cast<double>(m.marks.size()) / static_cast<double>(k) * label_width(widest) <=
          width) {
        every = k, found = true;
        break;
      }
    }
    if (found) break;
  }
  struct Drawn {
    double x;
    std::uint64_t n;
    bool labelled;
  };
  std::vector<Drawn> drawn;  // one a column, labelled where a label fits
  std::vector<Drawn> labelled;
  double free_from = -1e18;
  long last_column = -1;
  for (auto& [t, n] : m.marks) {
    const double xx = x(t), w = label_width(n);
    const bool label =
        n % every == 0 && xx - w / 2 >= free_from && xx + w / 2 <= plot_right + 20;
    if (label) free_from = xx + w / 2, labelled.push_back({xx, n, true});
    const long column = static_cast<long>(std::floor(xx - plot_left));
    if (column == last_column) {
      if (label) drawn.back().labelled = true;
      continue;
    }
    last_column = column;
    drawn.push_back({xx, n, label});
  }
  const bool dense = static_cast<double>(drawn.size()) > width / 4;
  std::ostringstream lines, ticks, text;
  for (const Drawn& d : drawn) {
    if (!dense || d.labelled)
      lines << 'M' << fmt("%.1f", d.x) << ' ' << y_top << 'V' << y_bottom;
    else
      ticks << 'M' << fmt("%.1f", d.x) << ' ' << y_top << 'v' << 5;
  }
  for (const Drawn& d : labelled)
    text << "<text x='" << fmt("%.1f", d.x) << "' y='" << label_y << "'>" << d.n << "</text>";
  std::ostringstream o;
  o << "<g class='step-marks' data-scope='" << m.scope << "' data-steps='" << m.marks.size()
    << "' data-lines='" << drawn.size() << "' data-labels='" << labelled.size()
    << "' data-label-every='" << every << "'" << (dense ? " data-dense='1'" : "")
    << "><path fill='none' stroke='" << m.colour << "' stroke-width='1' stroke-opacity='0.55' d='"
    << lines.str() << ticks.str() << "'/><g font-size='9' fill='" << m.colour
    << "' text-anchor='middle'>" << text.str() << "</g></g>";
  return o.str();
}

}  // namespace

std::string svg_chart(const std::vector<Series>& series, double t0, double t1,
                      const std::string& x_note, ValueAxis axis, const std::string& id,
                      const std::vector<Level>& levels, const std::vector<StepMarks>& steps) {
  const double label_rows = static_cast<double>(steps.size());
  const double w = kChartWidth, h = 260 + 11 * label_rows, left = kChartLeft,
               right = kChartRight, top = 15 + 11 * label_rows, bottom = 40;
  double y_max = 0;
  for (const Series& s : series)
    for (auto& p : s.points) y_max = std::max(y_max, p.second);
  for (const Level& l : levels) y_max = std::max(y_max, l.value);
  if (axis.bytes) {
    auto [name, scale] = byte_unit(y_max);
    axis.label = name;
    axis.scale = scale;
  }
  const double y_scale = axis.scale;
  y_max /= y_scale;
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
    << "' height='" << h << "' role='img' data-unit='" << esc(axis.label) << "'>";
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
    << (top + h - bottom) / 2 << ")' text-anchor='middle'>" << esc(axis.label) << "</text>";
  // Step marks under the lines, their labels in rows above the plot.
  for (std::size_t i = 0; i < steps.size(); ++i)
    o << draw_step_marks(steps[i], x, left, w - right, top, h - bottom,
                         15 + 11 * static_cast<double>(i) + 6);
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
  for (const StepMarks& m : steps) {
    double ly = top + 14 + 18 * row++;
    o << "<line x1='" << w - right + 18 << "' x2='" << w - right + 18 << "' y1='" << ly - 9
      << "' y2='" << ly + 3 << "' stroke='" << m.colour << "' stroke-width='1'/><text x='"
      << w - right + 30 << "' y='" << ly + 1 << "' font-size='12'>" << esc(m.name) << "</text>";
  }
  o << "</svg>";
  return o.str();
}

}  // namespace spill::profiling::report_html

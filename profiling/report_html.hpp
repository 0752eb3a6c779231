// Pieces of the report page (profiling/report.cpp): HTML text helpers, the SVG line chart
// (round ticks in the unit that fits, step marks thinned to the pixel columns) and the steps
// table. Internal to the report; every figure they draw is given to them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "profiling/steps.hpp"

namespace spill::profiling::report_html {

std::string esc(const std::string& s);
std::string fmt(const char* f, double v);  // snprintf of one double
std::string hex(std::uint64_t v);          // "0x..."

// The chart's plot area: 900 px wide less its margins. A line keeps at most 4 points per pixel
// column of it (ColumnDownsampler), so a page stays the same size whatever the trace's length.
inline constexpr double kChartWidth = 900, kChartLeft = 70, kChartRight = 160;
inline constexpr std::size_t kPlotColumns =
    static_cast<std::size_t>(kChartWidth - kChartLeft - kChartRight);

// A step series of a line chart, in (ms, value) points.
struct Series {
  std::string name, colour;
  std::vector<std::pair<double, double>> points;
};

// A level drawn across the chart as a dashed line (a budget), named in the legend.
struct Level {
  std::string name, colour;
  double value;
};

// The value axis: a fixed unit (`label`, values divided by `scale`), or bytes in the binary
// unit that fits the highest value drawn (B, KiB, MiB, GiB, TiB).
struct ValueAxis {
  std::string label;
  double scale = 1;
  bool bytes = false;
};

// The binary unit that fits `max_bytes` and its size: the largest unit in which it is at least
// 1 (GiB for nothing at all: a flat line at zero says nothing of its unit).
std::pair<const char*, double> byte_unit(double max_bytes);

// Vertical lines where a scope's steps begin, each labelled with its step number in a row above
// the plot (a row per scope).
struct StepMarks {
  std::string name, colour;
  std::uint64_t scope = 0;
  std::vector<std::pair<double, std::uint64_t>> marks;  // (ms, step number), in time order
};

// A line chart over [t0, t1] ms with axes, round ticks, a legend, dashed levels and step marks.
// Marks are thinned: a line in each pixel column that holds a step's beginning, labels of every
// k-th step (k = 1, 2, 5, 10, 20 ...: as many as fit) that never overlap.
std::string svg_chart(const std::vector<Series>& series, double t0, double t1,
                      const std::string& x_note, ValueAxis axis, const std::string& id,
                      const std::vector<Level>& levels = {},
                      const std::vector<StepMarks>& steps = {});

// Steps: the scopes shown (those with the most marks) and their colours.
inline constexpr std::size_t kMaxStepScopes = 4;
inline constexpr const char* kStepColours[] = {"#555555", "#b03a2e", "#117a65", "#6c3483"};

// The "Steps" section: per scope, its first and last steps one by one, those between gathered
// in a row, and all of them gathered. `ms` turns a trace time into the page's milliseconds.
std::string steps_section(const TraceSteps& steps,
                          const std::function<double(std::uint64_t)>& ms);

}  // namespace spill::profiling::report_html

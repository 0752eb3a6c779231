#include "profiling/downsample.hpp"

#include <algorithm>
#include <cmath>


namespace spill::profiling {

ColumnDownsampler::ColumnDownsampler(double x0, double x1, std::size_t columns)
    : x0_(x0), width_(x1 - x0), columns_(std::max<std::size_t>(columns, 1)) {}

std::size_t ColumnDownsampler::column_of(double x) const {
  if (!(width_ > 0) || !std::isfinite(width_)) return 0;
  const double at = (x - x0_) / width_ * static_cast<double>(columns_.size());
  if (!(at > 0)) return 0;  // and NaN
  if (at >= static_cast<double>(columns_.size())) return columns_.size() - 1;
  return static_cast<std::size_t>(at);
}

void ColumnDownsampler::add(double x, double value) {
  const Kept k{added_++, {x, value}};
  if (added_ <= 4 * columns_.size()) {
    whole_.push_back(k.p);
  } else if (!whole_.empty()) {
    whole_.clear();
    whole_.shrink_to_fit();
  }
  Column& c = columns_[column_of(x)];
  if (!c.used) {
    c = {true, k, k, k, k};
    return;
  }
  // Strict comparisons: the first of equal extremes is kept.
  if (value < c.low.p.second) c.low = k;
  if (value > c.high.p.second) c.high = k;
  c.last = k;
}

std::vector<ColumnDownsampler::Point> ColumnDownsampler::points() const {
  if (added_ <= 4 * columns_.size()) return whole_;
  std::vector<Kept> kept;
  for (const Column& c : columns_) {
    if (!c.used) continue;
    const Kept four[] = {c.first, c.low, c.high, c.last};
    for (std::size_t i = 0; i < 4; ++i) {
      bool seen = false;
      for (std::size_t j = 0; j < i; ++j) seen = seen || four[j].seq == four[i].seq;
      if (!seen) kept.push_back(four[i]);
    }
  }
  std::sort(kept.begin(), kept.end(), [](const Kept& a, const Kept& b) { return a.seq < b.seq; });
  std::vector<Point> out;
  out.reserve(kept.size());
  for (const Kept& k : kept) out.push_back(k.p);
  return out;
}

std::vector<ColumnDownsampler::Point> downsample_line(
    const std::vector<ColumnDownsampler::Point>& points, double x0, double x1,
    std::size_t columns) {
  ColumnDownsampler d(x0, x1, columns);
  for (const auto& [x, v] : points) d.add(x, v);
  return d.points();
}

}  // namespace spill::profiling

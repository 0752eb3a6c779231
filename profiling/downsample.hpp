// A line of many points drawn with a bounded number of them. A line of at most 4 points per
// column on average is kept whole; a longer one keeps, of the points falling in one pixel
// column, the first, lowest, highest and last, in the order they were given: a subsequence of
// the full line whose extremes, first and last points are the full line's own (a peak drawn is
// the peak stated). Memory and output grow with the columns, not with the points added.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace spill::profiling {

class ColumnDownsampler {
 public:
  using Point = std::pair<double, double>;  // (x, value)
  // Columns split [x0, x1] evenly; a point outside goes to the nearest end column.
  ColumnDownsampler(double x0, double x1, std::size_t columns);

  void add(double x, double value);
  std::uint64_t added() const { return added_; }
  // The kept points, in the order they were added: every point while there are at most
  // 4 * columns of them, else at most 4 per column.
  std::vector<Point> points() const;

 private:
  struct Kept {
    std::uint64_t seq;
    Point p;
  };
  struct Column {
    bool used = false;
    Kept first, low, high, last;
  };
  std::size_t column_of(double x) const;

  double x0_, width_;
  std::vector<Column> columns_;
  std::vector<Point> whole_;  // every point, until there are more than 4 * columns
  std::uint64_t added_ = 0;
};

// Downsamples a whole line (for lines built in one piece).
std::vector<ColumnDownsampler::Point> downsample_line(
    const std::vector<ColumnDownsampler::Point>& points, double x0, double x1,
    std::size_t columns);

}  // namespace spill::profiling

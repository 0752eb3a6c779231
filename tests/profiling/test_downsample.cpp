// The report's lines are drawn downsampled (issue 31 #11: a million-event trace made a 107 MB
// page): a long line keeps at most 4 points per pixel column, a subsequence of the full line
// with its first and last points and each column's lowest and highest, so the peaks drawn are
// exact; a short one (4 points a column on average) is kept whole.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "profiling/downsample.hpp"

namespace spill::profiling {
namespace {

using Point = ColumnDownsampler::Point;

// A random walk of `n` steps over [0, span], as a memory counter: two points per change.
std::vector<Point> walk(std::size_t n, double span, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::vector<Point> line{{0, 1000}};
  double v = 1000;
  for (std::size_t i = 1; i < n; ++i) {
    const double x = span * static_cast<double>(i) / static_cast<double>(n);
    line.emplace_back(x, v);
    v = std::max(0.0, v + static_cast<double>(static_cast<int>(rng() % 201) - 100));
    line.emplace_back(x, v);
  }
  return line;
}

bool is_subsequence(const std::vector<Point>& part, const std::vector<Point>& whole) {
  std::size_t j = 0;
  for (const Point& p : whole)
    if (j < part.size() && part[j] == p) ++j;
  return j == part.size();
}

TEST(Downsample, KeepsExtremesFirstAndLastAndBoundsThePoints) {
  const std::size_t columns = 670;
  const std::vector<Point> line = walk(500'000, 1234.5, 7);
  const std::vector<Point> kept = downsample_line(line, 0, 1234.5, columns);
  EXPECT_LE(kept.size(), 4 * columns);
  EXPECT_GT(kept.size(), columns) << "every column holds points, most of them four";
  EXPECT_EQ(kept.front(), line.front());
  EXPECT_EQ(kept.back(), line.back());
  EXPECT_TRUE(is_subsequence(kept, line)) << "only points of the line, in its order";
  auto by_value = [](const Point& a, const Point& b) { return a.second < b.second; };
  EXPECT_EQ(std::max_element(kept.begin(), kept.end(), by_value)->second,
            std::max_element(line.begin(), line.end(), by_value)->second);
  EXPECT_EQ(std::min_element(kept.begin(), kept.end(), by_value)->second,
            std::min_element(line.begin(), line.end(), by_value)->second);
  // Each column's own extremes, not only the line's.
  std::vector<double> lo(columns, 1e300), hi(columns, -1e300), klo = lo, khi = hi;
  auto col = [&](double x) { return std::min<std::size_t>(columns - 1, x / 1234.5 * columns); };
  for (const Point& p : line)
    lo[col(p.first)] = std::min(lo[col(p.first)], p.second),
    hi[col(p.first)] = std::max(hi[col(p.first)], p.second);
  for (const Point& p : kept)
    klo[col(p.first)] = std::min(klo[col(p.first)], p.second),
    khi[col(p.first)] = std::max(khi[col(p.first)], p.second);
  EXPECT_EQ(lo, klo);
  EXPECT_EQ(hi, khi);
}

TEST(Downsample, AShortLineIsKeptWhole) {
  const std::vector<Point> line = walk(1340, 10.0, 3);  // 2679 points over 670 columns
  ASSERT_LE(line.size(), 4u * 670);
  EXPECT_EQ(downsample_line(line, 0, 10.0, 670), line);
  // In one column, four points stay; a fifth inside their range goes.
  const std::vector<Point> four{{1, 5}, {1, 9}, {1, 2}, {1, 6}};
  EXPECT_EQ(downsample_line(four, 0, 10, 1), four);
  std::vector<Point> five = four;
  five.insert(five.begin() + 2, {1, 7});
  EXPECT_EQ(downsample_line(five, 0, 10, 1), four);
}

TEST(Downsample, PointsOutsideTheSpanAndAnEmptySpanAreKeptAtTheEnds) {
  std::vector<Point> line{{-5, 1}, {0, 2}, {20, 3}, {1e300, 4}};
  for (int i = 0; i < 8; ++i) line.insert(line.begin() + 2, {5.5, 2.5});
  const std::vector<Point> kept = downsample_line(line, 0, 10, 2);  // 12 points, 2 columns
  EXPECT_EQ(kept, (std::vector<Point>{{-5, 1}, {0, 2}, {5.5, 2.5}, {1e300, 4}}));
  std::vector<Point> same_time;
  for (int i = 0; i < 1000; ++i) same_time.emplace_back(3.0, i % 7 == 0 ? 100 + i : i % 5);
  const std::vector<Point> one = downsample_line(same_time, 3.0, 3.0, 100);  // a zero span
  EXPECT_LE(one.size(), 4u);
  EXPECT_EQ(one.front(), same_time.front());
  EXPECT_EQ(one.back(), same_time.back());
  EXPECT_NE(std::find(one.begin(), one.end(), Point{3.0, 100 + 994}), one.end());
}

}  // namespace
}  // namespace spill::profiling

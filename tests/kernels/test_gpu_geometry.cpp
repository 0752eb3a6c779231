// The launch geometry of the CUDA column sums (kernels/gpu_geometry.hpp), checked on the CPU:
// every grid dimension within CUDA's limits for any row count an int holds, every chunk of
// rows covered once by the blocks' chunk loop, the scratch size without overflow.
#include <gtest/gtest.h>

#include <climits>
#include <vector>

#include "kernels/gpu_geometry.hpp"

namespace spill::test {
namespace {

using kernels::gpu::column_sum_geometry;
using kernels::gpu::ColumnSumGeometry;
using kernels::gpu::kColumnChunkRows;
using kernels::gpu::kColumnThreads;
using kernels::gpu::kMaxGridY;

TEST(GpuGeometry, ColumnSumsStayWithinCudasGridLimitsForAnyRowCount) {
  const int old_limit = int(kMaxGridY) * kColumnChunkRows;  // 4,194,240 rows
  for (int rows : {1, 63, 64, 65, old_limit - 1, old_limit, old_limit + 1, 5'000'000,
                   100'000'000, INT_MAX - 63, INT_MAX}) {
    for (int cols : {1, 3, 256, 257, 4096}) {
      SCOPED_TRACE(testing::Message() << rows << " x " << cols);
      const ColumnSumGeometry g = column_sum_geometry(rows, cols);
      EXPECT_GE(g.grid_y, 1u);
      EXPECT_LE(g.grid_y, kMaxGridY);
      EXPECT_GE(std::size_t(g.grid_x) * kColumnThreads, std::size_t(cols));
      EXPECT_LT(std::size_t(g.grid_x - 1) * kColumnThreads, std::size_t(cols));
      ASSERT_GT(g.chunks, 0);
      EXPECT_GE(std::size_t(g.chunks) * kColumnChunkRows, std::size_t(rows));  // all rows
      EXPECT_LT(std::size_t(g.chunks - 1) * kColumnChunkRows, std::size_t(rows));
      EXPECT_EQ(g.partials, std::size_t(g.chunks) * std::size_t(cols));
      if (rows > old_limit) {
        EXPECT_EQ(g.grid_y, kMaxGridY) << "more chunks than blocks";
      }
    }
  }
  // No rows or no columns: nothing to launch across (sums of no rows are zeros).
  EXPECT_EQ(column_sum_geometry(0, 5).chunks, 0);
  EXPECT_EQ(column_sum_geometry(0, 5).grid_y, 1u);
  EXPECT_EQ(column_sum_geometry(7, 0).grid_x, 0u);
}

// The kernel's loop (block y takes chunks y, y + grid_y, ...) covers every chunk exactly once.
TEST(GpuGeometry, TheBlocksChunkLoopCoversEveryChunkOnce) {
  for (int rows : {1, 640, int(kMaxGridY) * kColumnChunkRows + 1, 9'000'000}) {
    const ColumnSumGeometry g = column_sum_geometry(rows, 1);
    std::vector<int> seen(std::size_t(g.chunks), 0);
    for (unsigned y = 0; y < g.grid_y; ++y)
      for (long long k = y; k < g.chunks; k += g.grid_y) ++seen[std::size_t(k)];
    for (int k = 0; k < g.chunks; ++k)
      ASSERT_EQ(seen[std::size_t(k)], 1) << rows << " rows, chunk " << k;
  }
}

}  // namespace
}  // namespace spill::test

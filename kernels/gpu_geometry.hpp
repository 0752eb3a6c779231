// Launch geometry of spill's CUDA column sums (gpu_reduce.cu), in plain C++ so that the CPU
// tests check it on machines without a GPU.
#pragma once

#include <algorithm>
#include <cstddef>

namespace spill::kernels::gpu {

inline constexpr int kColumnThreads = 256;     // threads per block, one column each
inline constexpr int kColumnChunkRows = 64;    // rows per partial of a column sum
inline constexpr unsigned kMaxGridY = 65535;   // CUDA's limit on gridDim.y (and z)

// A column sum of a rows x cols matrix: partial sums of fixed row chunks (added in chunk
// order afterwards, so the result does not depend on the grid). Blocks go across the columns
// (x) and down the chunks (y): block y sums chunks y, y + grid_y, ... . The grid's y once was
// the chunk count, which passes CUDA's 65535 above 4,194,240 rows (the launch failed).
struct ColumnSumGeometry {
  unsigned grid_x = 0;    // blocks across the columns (kColumnThreads each); 0 when cols is 0
  unsigned grid_y = 1;    // blocks down the chunks, at most kMaxGridY
  int chunks = 0;         // row chunks: partial sums per column
  std::size_t partials = 0;  // floats of scratch for one set of partials (chunks x cols)
};

inline ColumnSumGeometry column_sum_geometry(int rows, int cols) {
  ColumnSumGeometry g;
  if (rows <= 0 || cols <= 0) {
    g.grid_x = cols > 0 ? unsigned(cols / kColumnThreads + (cols % kColumnThreads != 0)) : 0;
    return g;
  }
  // Rounded up without forming rows + kColumnChunkRows - 1 (an int overflow near INT_MAX).
  g.chunks = rows / kColumnChunkRows + (rows % kColumnChunkRows != 0);
  g.grid_x = unsigned(cols / kColumnThreads + (cols % kColumnThreads != 0));
  g.grid_y = std::min(unsigned(g.chunks), kMaxGridY);
  g.partials = std::size_t(g.chunks) * std::size_t(cols);
  return g;
}

}  // namespace spill::kernels::gpu

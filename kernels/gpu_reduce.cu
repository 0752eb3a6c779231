// spill's own CUDA kernels that reduce: bias gradients, layer norm, softmax cross-entropy,
// causal softmax and the embedding backward. Deterministic by construction: one block per row
// with a fixed shared-memory tree, column sums in fixed row chunks added in order, and the
// embedding backward through a stable sort instead of atomics.
#include <cub/cub.cuh>
#include <cuda_runtime.h>

#include <algorithm>

#include "device/cuda_check.hpp"
#include "kernels/gpu_geometry.hpp"
#include "kernels/gpu_launch.hpp"

namespace spill::kernels::gpu {
namespace {

constexpr int kThreads = 256;    // threads per block of every row kernel
constexpr int kChunkRows = kColumnChunkRows;
static_assert(kColumnThreads == kThreads, "column sums use the row kernels' block size");

void check_launch() { SPILL_CUDA_TRY(cudaGetLastError()); }
std::size_t align256(std::size_t b) { return (b + 255) / 256 * 256; }

// Sum / max over the block with a fixed tree; every thread gets the result.
__device__ float block_sum(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}
__device__ float block_max(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

// partial[chunk][c] = sum of dy over the chunk's rows (and of dy * xhat when x is given).
// Block y takes chunks y, y + gridDim.y, ... (column_sum_geometry: gridDim.y <= 65535).
__global__ void column_partials_k(float* partial_a, float* partial_b, const float* dy,
                                  const float* x, const float* mean, const float* rstd, int rows,
                                  int cols, int chunks) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int k = blockIdx.y; k < chunks; k += gridDim.y) {
    const int r0 = k * kChunkRows;  // < rows: no overflow
    const int r1 = rows - r0 < kChunkRows ? rows : r0 + kChunkRows;
    float a = 0.0f, b = 0.0f;
    for (int r = r0; r < r1; ++r) {
      const float g = dy[std::size_t(r) * cols + c];
      a += g;
      if (x != nullptr) b += g * ((x[std::size_t(r) * cols + c] - mean[r]) * rstd[r]);
    }
    partial_a[std::size_t(k) * cols + c] = a;
    if (x != nullptr) partial_b[std::size_t(k) * cols + c] = b;
  }
}

__global__ void column_total_k(float* out, const float* partial, int chunks, int cols) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float acc = 0.0f;
  for (int k = 0; k < chunks; ++k) acc += partial[std::size_t(k) * cols + c];
  out[c] = acc;
}

__global__ void layer_norm_f_k(float* y, float* mean, float* rstd, const float* x,
                               const float* gamma, const float* beta, int cols, float eps) {
  __shared__ float sh[kThreads];
  const float* xr = x + std::size_t(blockIdx.x) * cols;
  float s = 0.0f;
  for (int c = threadIdx.x; c < cols; c += kThreads) s += xr[c];
  const float mu = block_sum(s, sh) / cols;
  float v = 0.0f;
  for (int c = threadIdx.x; c < cols; c += kThreads) v += (xr[c] - mu) * (xr[c] - mu);
  const float rs = 1.0f / sqrtf(block_sum(v, sh) / cols + eps);
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = mu;
    rstd[blockIdx.x] = rs;
  }
  float* yr = y + std::size_t(blockIdx.x) * cols;
  for (int c = threadIdx.x; c < cols; c += kThreads) yr[c] = (xr[c] - mu) * rs * gamma[c] + beta[c];
}

__global__ void layer_norm_b_k(float* dx, const float* dy, const float* x, const float* gamma,
                               const float* mean, const float* rstd, int cols, bool accumulate) {
  __shared__ float sh[kThreads];
  const std::size_t off = std::size_t(blockIdx.x) * cols;
  const float m = mean[blockIdx.x], rs = rstd[blockIdx.x];
  float a = 0.0f, b = 0.0f;
  for (int c = threadIdx.x; c < cols; c += kThreads) {
    const float g = dy[off + c] * gamma[c];
    a += g;
    b += g * ((x[off + c] - m) * rs);
  }
  const float ma = block_sum(a, sh) / cols;
  const float mb = block_sum(b, sh) / cols;
  for (int c = threadIdx.x; c < cols; c += kThreads) {
    const float xhat = (x[off + c] - m) * rs;
    const float v = rs * (dy[off + c] * gamma[c] - ma - xhat * mb);
    dx[off + c] = accumulate ? dx[off + c] + v : v;
  }
}

// One block per row: max, then log-sum-exp.
__device__ float row_logsumexp(const float* zr, int classes, float* sh) {
  float mx = -INFINITY;
  for (int c = threadIdx.x; c < classes; c += kThreads) mx = fmaxf(mx, zr[c]);
  mx = block_max(mx, sh);
  float s = 0.0f;
  for (int c = threadIdx.x; c < classes; c += kThreads) s += expf(zr[c] - mx);
  return mx + logf(block_sum(s, sh));
}

__global__ void xent_rows_k(float* row_loss, const float* logits, const std::int32_t* labels,
                            int classes) {
  __shared__ float sh[kThreads];
  const float* zr = logits + std::size_t(blockIdx.x) * classes;
  const float lse = row_logsumexp(zr, classes, sh);
  if (threadIdx.x == 0) row_loss[blockIdx.x] = lse - zr[labels[blockIdx.x]];
}

__global__ void mean_k(float* out, const float* v, int n) {
  __shared__ float sh[kThreads];
  float s = 0.0f;
  for (int i = threadIdx.x; i < n; i += kThreads) s += v[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) out[0] = s / n;
}

__global__ void xent_b_k(float* dlogits, const float* logits, const std::int32_t* labels,
                         int rows, int classes) {
  __shared__ float sh[kThreads];
  const std::size_t off = std::size_t(blockIdx.x) * classes;
  const float lse = row_logsumexp(logits + off, classes, sh);
  const int label = labels[blockIdx.x];
  const float inv = 1.0f / rows;
  for (int c = threadIdx.x; c < classes; c += kThreads)
    dlogits[off + c] = (expf(logits[off + c] - lse) - (c == label ? 1.0f : 0.0f)) * inv;
}

__global__ void causal_f_k(float* p, const float* s, int t, float scale) {
  __shared__ float sh[kThreads];
  const std::size_t off = std::size_t(blockIdx.x) * t;
  const int visible = blockIdx.x % t + 1;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < visible; j += kThreads) mx = fmaxf(mx, scale * s[off + j]);
  mx = block_max(mx, sh);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < t; j += kThreads) {
    const float e = j < visible ? expf(scale * s[off + j] - mx) : 0.0f;
    p[off + j] = e;  // p may alias s: each element is read and written by one thread
    sum += e;
  }
  const float inv = 1.0f / block_sum(sum, sh);
  for (int j = threadIdx.x; j < visible; j += kThreads) p[off + j] *= inv;
}

__global__ void causal_b_k(float* ds, const float* dp, const float* p, int t, float scale) {
  __shared__ float sh[kThreads];
  const std::size_t off = std::size_t(blockIdx.x) * t;
  const int visible = blockIdx.x % t + 1;
  float dot = 0.0f;
  for (int j = threadIdx.x; j < visible; j += kThreads) dot += p[off + j] * dp[off + j];
  dot = block_sum(dot, sh);
  for (int j = threadIdx.x; j < t; j += kThreads)
    ds[off + j] = j < visible ? scale * p[off + j] * (dp[off + j] - dot) : 0.0f;
}

__global__ void avg_pool_f_k(float* y, const float* x, int hw) {
  __shared__ float sh[kThreads];
  const float* xp = x + std::size_t(blockIdx.x) * hw;
  float s = 0.0f;
  for (int j = threadIdx.x; j < hw; j += kThreads) s += xp[j];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) y[blockIdx.x] = s / hw;
}

__global__ void avg_pool_b_k(float* dx, const float* dy, int hw, std::size_t n) {
  const std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  if (i < n) dx[i] = dy[i / hw] * (1.0f / hw);
}

__global__ void iota_k(std::int32_t* v, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) v[i] = i;
}

// One block per sorted position; the first of each id's run sums the run in position order.
__global__ void embedding_runs_k(float* dtable, const float* dy, const std::int32_t* sorted_ids,
                                 const std::int32_t* sorted_pos, int n, int dim) {
  const int i = blockIdx.x;
  if (i > 0 && sorted_ids[i] == sorted_ids[i - 1]) return;
  const std::int32_t id = sorted_ids[i];
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float acc = 0.0f;
    for (int k = i; k < n && sorted_ids[k] == id; ++k)
      acc += dy[std::size_t(sorted_pos[k]) * dim + j];
    dtable[std::size_t(id) * dim + j] = acc;
  }
}

__global__ void embedding_pos_k(float* dpos, const float* dy, int batch, int seq, int dim) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= seq * dim) return;
  const int t = i / dim, j = i % dim;
  float acc = 0.0f;
  for (int b = 0; b < batch; ++b) acc += dy[(std::size_t(b) * seq + t) * dim + j];
  dpos[i] = acc;
}

std::size_t cub_sort_bytes(int n) {
  std::size_t bytes = 0;
  SPILL_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, bytes, (const std::int32_t*)nullptr,
                                                 (std::int32_t*)nullptr,
                                                 (const std::int32_t*)nullptr,
                                                 (std::int32_t*)nullptr, n));
  return bytes;
}

}  // namespace

std::size_t bias_grad_scratch_bytes(int rows, int cols) {
  return sizeof(float) * column_sum_geometry(rows, cols).partials;
}

void bias_grad(float* db, const float* dy, int rows, int cols, void* scratch, cudaStream_t s) {
  const ColumnSumGeometry geo = column_sum_geometry(rows, cols);
  if (geo.grid_x == 0) return;  // no column
  float* partial = static_cast<float*>(scratch);
  column_partials_k<<<dim3(geo.grid_x, geo.grid_y), kThreads, 0, s>>>(
      partial, nullptr, dy, nullptr, nullptr, nullptr, rows, cols, geo.chunks);
  check_launch();
  column_total_k<<<geo.grid_x, kThreads, 0, s>>>(db, partial, geo.chunks, cols);
  check_launch();
}

void layer_norm_forward(float* y, float* mean, float* rstd, const float* x, const float* gamma,
                        const float* beta, int rows, int cols, float eps, cudaStream_t s) {
  layer_norm_f_k<<<rows, kThreads, 0, s>>>(y, mean, rstd, x, gamma, beta, cols, eps);
  check_launch();
}

std::size_t layer_norm_backward_scratch_bytes(int rows, int cols) {
  return 2 * bias_grad_scratch_bytes(rows, cols);
}

void layer_norm_backward(float* dx, float* dgamma, float* dbeta, const float* dy, const float* x,
                         const float* gamma, const float* mean, const float* rstd, int rows,
                         int cols, bool accumulate, void* scratch, cudaStream_t s) {
  layer_norm_b_k<<<rows, kThreads, 0, s>>>(dx, dy, x, gamma, mean, rstd, cols, accumulate);
  check_launch();
  const ColumnSumGeometry geo = column_sum_geometry(rows, cols);
  if (geo.grid_x == 0) return;  // no column
  float* pb = static_cast<float*>(scratch);
  float* pg = pb + geo.partials;
  column_partials_k<<<dim3(geo.grid_x, geo.grid_y), kThreads, 0, s>>>(pb, pg, dy, x, mean, rstd,
                                                                     rows, cols, geo.chunks);
  check_launch();
  column_total_k<<<geo.grid_x, kThreads, 0, s>>>(dbeta, pb, geo.chunks, cols);
  check_launch();
  column_total_k<<<geo.grid_x, kThreads, 0, s>>>(dgamma, pg, geo.chunks, cols);
  check_launch();
}

std::size_t softmax_xent_scratch_bytes(int rows) { return sizeof(float) * std::size_t(rows); }

void softmax_xent_forward(float* loss, const float* logits, const std::int32_t* labels, int rows,
                          int classes, void* scratch, cudaStream_t s) {
  float* row_loss = static_cast<float*>(scratch);
  xent_rows_k<<<rows, kThreads, 0, s>>>(row_loss, logits, labels, classes);
  check_launch();
  mean_k<<<1, kThreads, 0, s>>>(loss, row_loss, rows);
  check_launch();
}

void softmax_xent_backward(float* dlogits, const float* logits, const std::int32_t* labels,
                           int rows, int classes, cudaStream_t s) {
  xent_b_k<<<rows, kThreads, 0, s>>>(dlogits, logits, labels, rows, classes);
  check_launch();
}

void causal_softmax_forward(float* p, const float* scores, int rows, int t, float scale,
                            cudaStream_t s) {
  causal_f_k<<<rows, kThreads, 0, s>>>(p, scores, t, scale);
  check_launch();
}

void causal_softmax_backward(float* ds, const float* dp, const float* p, int rows, int t,
                             float scale, cudaStream_t s) {
  causal_b_k<<<rows, kThreads, 0, s>>>(ds, dp, p, t, scale);
  check_launch();
}

void avg_pool_forward(float* y, const float* x, int n, int c, int hw, cudaStream_t s) {
  avg_pool_f_k<<<n * c, kThreads, 0, s>>>(y, x, hw);
  check_launch();
}

void avg_pool_backward(float* dx, const float* dy, int n, int c, int hw, cudaStream_t s) {
  const std::size_t total = std::size_t(n) * c * hw;
  avg_pool_b_k<<<unsigned((total + kThreads - 1) / kThreads), kThreads, 0, s>>>(dx, dy, hw,
                                                                               total);
  check_launch();
}

std::size_t embedding_backward_scratch_bytes(int batch, int seq) {
  const int n = batch * seq;
  return 3 * align256(sizeof(std::int32_t) * std::size_t(n)) + cub_sort_bytes(n);
}

void embedding_backward(float* dtable, float* dpos, const float* dy, const std::int32_t* ids,
                        int batch, int seq, int dim, int vocab, void* scratch,
                        std::size_t scratch_bytes, cudaStream_t s) {
  const int n = batch * seq;
  const std::size_t array = align256(sizeof(std::int32_t) * std::size_t(n));
  char* base = static_cast<char*>(scratch);
  auto* sorted_ids = reinterpret_cast<std::int32_t*>(base);
  auto* positions = reinterpret_cast<std::int32_t*>(base + array);
  auto* sorted_pos = reinterpret_cast<std::int32_t*>(base + 2 * array);
  void* temp = base + 3 * array;
  std::size_t temp_bytes = scratch_bytes - 3 * array;
  iota_k<<<(n + kThreads - 1) / kThreads, kThreads, 0, s>>>(positions, n);
  check_launch();
  SPILL_CUDA_TRY(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, ids, sorted_ids, positions,
                                                 sorted_pos, n, 0, sizeof(std::int32_t) * 8, s));
  SPILL_CUDA_TRY(cudaMemsetAsync(dtable, 0, sizeof(float) * std::size_t(vocab) * dim, s));
  embedding_runs_k<<<n, kThreads, 0, s>>>(dtable, dy, sorted_ids, sorted_pos, n, dim);
  check_launch();
  embedding_pos_k<<<(seq * dim + kThreads - 1) / kThreads, kThreads, 0, s>>>(dpos, dy, batch,
                                                                             seq, dim);
  check_launch();
}

}  // namespace spill::kernels::gpu

// spill's own elementwise CUDA kernels: fill, add, bias, ReLU, GELU, AdamW and the embedding
// lookup. Grid-stride loops; every element is computed by one thread, so results are
// deterministic.
#include <cuda_runtime.h>

#include <algorithm>

#include "device/cuda_check.hpp"
#include "kernels/gpu_launch.hpp"

namespace spill::kernels::gpu {
namespace {

constexpr float kGeluC0 = 0.7978845608028654f;
constexpr float kGeluC1 = 0.044715f;

unsigned grid_for(std::size_t n) {
  return static_cast<unsigned>(std::min<std::size_t>((n + 255) / 256, 65535));
}

#define SPILL_GRID_STRIDE(i, n)                                                  \
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < (n); \
       i += std::size_t(gridDim.x) * blockDim.x)

__global__ void fill_k(float* y, float v, std::size_t n) { SPILL_GRID_STRIDE(i, n) y[i] = v; }
__global__ void add_k(float* y, const float* x, std::size_t n) { SPILL_GRID_STRIDE(i, n) y[i] += x[i]; }
__global__ void bias_add_k(float* y, const float* b, std::size_t n, int cols) {
  SPILL_GRID_STRIDE(i, n) y[i] += b[i % cols];
}
__global__ void relu_f_k(float* y, const float* x, std::size_t n) {
  SPILL_GRID_STRIDE(i, n) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}
__global__ void relu_b_k(float* dx, const float* dy, const float* y, std::size_t n) {
  SPILL_GRID_STRIDE(i, n) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}
__global__ void gelu_f_k(float* y, const float* x, std::size_t n) {
  SPILL_GRID_STRIDE(i, n) {
    const float v = x[i];
    y[i] = 0.5f * v * (1.0f + tanhf(kGeluC0 * (v + kGeluC1 * v * v * v)));
  }
}
__global__ void gelu_b_k(float* dx, const float* dy, const float* x, std::size_t n) {
  SPILL_GRID_STRIDE(i, n) {
    const float v = x[i];
    const float t = tanhf(kGeluC0 * (v + kGeluC1 * v * v * v));
    const float d =
        0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kGeluC0 * (1.0f + 3.0f * kGeluC1 * v * v);
    dx[i] = dy[i] * d;
  }
}
__global__ void adamw_k(float* w, float* m, float* v, const float* g, std::size_t n,
                        cpu::AdamWScalars a) {
  SPILL_GRID_STRIDE(i, n) {
    const float gi = g[i];
    const float mi = a.beta1 * m[i] + (1.0f - a.beta1) * gi;
    const float vi = a.beta2 * v[i] + (1.0f - a.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    w[i] = w[i] * a.decay - a.lr * (mi / a.correction1) / (sqrtf(vi / a.correction2) + a.eps);
  }
}
__global__ void embedding_f_k(float* y, const std::int32_t* ids, const float* table,
                              const float* pos, int seq, int dim, std::size_t n) {
  SPILL_GRID_STRIDE(i, n) {
    const std::size_t row = i / dim, j = i % dim;
    const std::size_t t = row % seq;
    y[i] = table[std::size_t(ids[row]) * dim + j] + pos[t * dim + j];
  }
}

void check_launch() { SPILL_CUDA_TRY(cudaGetLastError()); }

}  // namespace

void fill(float* y, float value, std::size_t n, cudaStream_t s) {
  fill_k<<<grid_for(n), 256, 0, s>>>(y, value, n);
  check_launch();
}
void add(float* y, const float* x, std::size_t n, cudaStream_t s) {
  add_k<<<grid_for(n), 256, 0, s>>>(y, x, n);
  check_launch();
}
void bias_add(float* y, const float* b, int rows, int cols, cudaStream_t s) {
  const std::size_t n = std::size_t(rows) * cols;
  bias_add_k<<<grid_for(n), 256, 0, s>>>(y, b, n, cols);
  check_launch();
}
void relu_forward(float* y, const float* x, std::size_t n, cudaStream_t s) {
  relu_f_k<<<grid_for(n), 256, 0, s>>>(y, x, n);
  check_launch();
}
void relu_backward(float* dx, const float* dy, const float* y, std::size_t n, cudaStream_t s) {
  relu_b_k<<<grid_for(n), 256, 0, s>>>(dx, dy, y, n);
  check_launch();
}
void gelu_forward(float* y, const float* x, std::size_t n, cudaStream_t s) {
  gelu_f_k<<<grid_for(n), 256, 0, s>>>(y, x, n);
  check_launch();
}
void gelu_backward(float* dx, const float* dy, const float* x, std::size_t n, cudaStream_t s) {
  gelu_b_k<<<grid_for(n), 256, 0, s>>>(dx, dy, x, n);
  check_launch();
}
void adamw(float* w, float* m, float* v, const float* g, std::size_t n,
           const cpu::AdamWScalars& a, cudaStream_t s) {
  adamw_k<<<grid_for(n), 256, 0, s>>>(w, m, v, g, n, a);
  check_launch();
}
void embedding_forward(float* y, const std::int32_t* ids, const float* table, const float* pos,
                       int batch, int seq, int dim, cudaStream_t s) {
  const std::size_t n = std::size_t(batch) * seq * dim;
  embedding_f_k<<<grid_for(n), 256, 0, s>>>(y, ids, table, pos, seq, dim, n);
  check_launch();
}

}  // namespace spill::kernels::gpu

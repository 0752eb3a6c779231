// The math of every kernel on host memory: what CpuKernels runs on the simulated device's
// stream workers, and the reference the GPU kernels are compared with. Deterministic: GEMMs go
// to OpenBLAS with one thread (set by set_blas_threads_once), every reduction runs in a fixed
// order with double accumulators. Semantics are those documented in kernels/kernels.hpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/kernels.hpp"

namespace spill::kernels::cpu {

// Pins OpenBLAS to one thread (idempotent). Every cpu:: GEMM calls it.
void set_blas_threads_once();

void gemm_batched(Trans ta, Trans tb, int m, int n, int k, float alpha, const float* a, int lda,
                  std::int64_t stride_a, const float* b, int ldb, std::int64_t stride_b,
                  float beta, float* c, int ldc, std::int64_t stride_c, int batch);
void fill(float* y, float value, std::size_t n);
void copy(float* y, const float* x, std::size_t n);
void add(float* y, const float* x, std::size_t n);
void bias_add(float* y, const float* b, int rows, int cols);
void bias_grad(float* db, const float* dy, int rows, int cols);
void relu_forward(float* y, const float* x, std::size_t n);
void relu_backward(float* dx, const float* dy, const float* y, std::size_t n);
void gelu_forward(float* y, const float* x, std::size_t n);
void gelu_backward(float* dx, const float* dy, const float* x, std::size_t n);
void layer_norm_forward(float* y, float* mean, float* rstd, const float* x, const float* gamma,
                        const float* beta, int rows, int cols, float eps);
void layer_norm_backward(float* dx, float* dgamma, float* dbeta, const float* dy, const float* x,
                         const float* gamma, const float* mean, const float* rstd, int rows,
                         int cols, bool accumulate);
void softmax_xent_forward(float* loss, const float* logits, const std::int32_t* labels, int rows,
                          int classes);
void softmax_xent_backward(float* dlogits, const float* logits, const std::int32_t* labels,
                           int rows, int classes);
void causal_softmax_forward(float* p, const float* scores, int rows, int t, float scale);
void causal_softmax_backward(float* ds, const float* dp, const float* p, int rows, int t,
                             float scale);
void embedding_forward(float* y, const std::int32_t* ids, const float* table, const float* pos,
                       int batch, int seq, int dim);
void embedding_backward(float* dtable, float* dpos, const float* dy, const std::int32_t* ids,
                        int batch, int seq, int dim, int vocab);
void conv2d_forward(float* y, const float* x, const float* w, const Conv2dShape& sh);
void conv2d_backward_data(float* dx, const float* dy, const float* w, const Conv2dShape& sh);
void conv2d_backward_filter(float* dw, const float* dy, const float* x, const Conv2dShape& sh);
void batch_norm_forward(float* y, float* mean, float* invstd, const float* x, const float* gamma,
                        const float* beta, int n, int c, int hw, float eps);
void batch_norm_backward(float* dx, float* dgamma, float* dbeta, const float* dy, const float* x,
                         const float* gamma, const float* mean, const float* invstd, int n,
                         int c, int hw);
void max_pool_forward(float* y, const float* x, const Pool2dShape& sh);
void max_pool_backward(float* dx, const float* dy, const float* x, const Pool2dShape& sh);
void avg_pool_forward(float* y, const float* x, int n, int c, int hw);
void avg_pool_backward(float* dx, const float* dy, int n, int c, int hw);
void adamw(float* w, float* m, float* v, const float* g, std::size_t n, const AdamW& hp, int step);

// The scalars of one AdamW step, computed once on the host the same way for both backends.
struct AdamWScalars {
  float lr, beta1, beta2, eps, decay;  // decay = 1 - lr * weight_decay
  float correction1, correction2;      // 1 - beta^step
};
AdamWScalars adamw_scalars(const AdamW& hp, int step);

}  // namespace spill::kernels::cpu

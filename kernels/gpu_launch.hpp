// Launchers of spill's own CUDA kernels (gpu_elementwise.cu, gpu_reduce.cu), called by
// GpuKernels. All are asynchronous on `stream` and deterministic: reductions use a fixed
// thread-to-element mapping and fixed trees, never float atomics. `scratch` is device memory
// of at least the size the matching *_scratch_bytes function gives.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cpu_math.hpp"

namespace spill::kernels::gpu {

void fill(float* y, float value, std::size_t n, cudaStream_t stream);
void add(float* y, const float* x, std::size_t n, cudaStream_t stream);
void bias_add(float* y, const float* b, int rows, int cols, cudaStream_t stream);
void relu_forward(float* y, const float* x, std::size_t n, cudaStream_t stream);
void relu_backward(float* dx, const float* dy, const float* y, std::size_t n, cudaStream_t stream);
void gelu_forward(float* y, const float* x, std::size_t n, cudaStream_t stream);
void gelu_backward(float* dx, const float* dy, const float* x, std::size_t n, cudaStream_t stream);
void adamw(float* w, float* m, float* v, const float* g, std::size_t n,
           const cpu::AdamWScalars& a, cudaStream_t stream);
void avg_pool_forward(float* y, const float* x, int n, int c, int hw, cudaStream_t stream);
void avg_pool_backward(float* dx, const float* dy, int n, int c, int hw, cudaStream_t stream);
void embedding_forward(float* y, const std::int32_t* ids, const float* table, const float* pos,
                       int batch, int seq, int dim, cudaStream_t stream);

// Column sums of a rows x cols matrix: rows in chunks, chunks summed in order.
std::size_t bias_grad_scratch_bytes(int rows, int cols);
void bias_grad(float* db, const float* dy, int rows, int cols, void* scratch, cudaStream_t stream);

void layer_norm_forward(float* y, float* mean, float* rstd, const float* x, const float* gamma,
                        const float* beta, int rows, int cols, float eps, cudaStream_t stream);
std::size_t layer_norm_backward_scratch_bytes(int rows, int cols);
void layer_norm_backward(float* dx, float* dgamma, float* dbeta, const float* dy, const float* x,
                         const float* gamma, const float* mean, const float* rstd, int rows,
                         int cols, bool accumulate, void* scratch, cudaStream_t stream);

std::size_t softmax_xent_scratch_bytes(int rows);
void softmax_xent_forward(float* loss, const float* logits, const std::int32_t* labels, int rows,
                          int classes, void* scratch, cudaStream_t stream);
void softmax_xent_backward(float* dlogits, const float* logits, const std::int32_t* labels,
                           int rows, int classes, cudaStream_t stream);

void causal_softmax_forward(float* p, const float* scores, int rows, int t, float scale,
                            cudaStream_t stream);
void causal_softmax_backward(float* ds, const float* dp, const float* p, int rows, int t,
                             float scale, cudaStream_t stream);

// Embedding backward sorts positions by id (CUB's stable radix sort) and sums each id's rows
// in position order.
std::size_t embedding_backward_scratch_bytes(int batch, int seq);
void embedding_backward(float* dtable, float* dpos, const float* dy, const std::int32_t* ids,
                        int batch, int seq, int dim, int vocab, void* scratch,
                        std::size_t scratch_bytes, cudaStream_t stream);

}  // namespace spill::kernels::gpu

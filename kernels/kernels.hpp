// The reference trainer's kernels: forward and backward of what its models need, behind one
// interface with two implementations chosen by the device. CpuKernels (SimDevice) runs CPU code
// (OpenBLAS for GEMMs) on the stream's worker with a simulated duration from a roofline of the
// call; GpuKernels (CudaDevice) uses cuBLAS, cuDNN and small CUDA kernels of our own.
// Every kernel is deterministic: a fixed reduction order (no atomics on floats, one BLAS thread
// on the CPU, deterministic cuBLAS/cuDNN algorithms), so a run is bit-identical to itself
// whatever the memory budget. CPU and GPU agree within the tolerances their tests state.
//
// Conventions: float32 tensors, row-major (C order); images NCHW. Pointers are device
// addresses; the caller keeps the memory mapped and alive until the stream has passed the
// call (the trainer pins around each op). Calls are asynchronous on `stream`, and calls on one
// Kernels object must come from one thread at a time.
// Costing: while a CostRecorder is attached, calls only add their cost (FLOPs, bytes moved,
// simulated time) to it and run nothing; pointers may then be null. The trainer uses this to
// turn a model's ops into graph ops with exactly the cost the simulated device charges.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "device/device.hpp"

namespace spill::kernels {

// Work of one call: arithmetic and device-memory traffic.
struct Cost {
  double flops = 0;
  double bytes = 0;
};

// The simulated device's speed: time = max(flops / flops_per_s, bytes / bytes_per_s) + launch.
struct Roofline {
  double flops_per_s = 11.7e12;  // defaults: an A100's FP32 peak x 0.6 (assumptions)
  double bytes_per_s = 1.244e12; // 1555 GB/s x 0.8
  double launch_s = 5e-6;
  double time_s(const Cost& c) const;
};

// Accumulates the cost of the calls made while attached.
struct CostRecorder {
  Roofline roofline;
  Cost total;
  double time_s = 0;
  int calls = 0;
  void add(const Cost& c);
};

enum class Trans { No, Yes };

struct Conv2dShape {
  int n = 1, c = 1, h = 1, w = 1;  // input
  int k = 1, r = 1, s = 1;         // output channels, kernel height and width
  int stride = 1, pad = 0;
  int out_h() const { return (h + 2 * pad - r) / stride + 1; }
  int out_w() const { return (w + 2 * pad - s) / stride + 1; }
  std::size_t in_elems() const { return std::size_t(n) * c * h * w; }
  std::size_t out_elems() const { return std::size_t(n) * k * out_h() * out_w(); }
  std::size_t weight_elems() const { return std::size_t(k) * c * r * s; }
};

// Max pooling with a square window, no padding.
struct Pool2dShape {
  int n = 1, c = 1, h = 1, w = 1;
  int window = 2, stride = 2;
  int out_h() const { return (h - window) / stride + 1; }
  int out_w() const { return (w - window) / stride + 1; }
  std::size_t in_elems() const { return std::size_t(n) * c * h * w; }
  std::size_t out_elems() const { return std::size_t(n) * c * out_h() * out_w(); }
};

struct AdamW {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.01f;
};

class Kernels {
 public:
  virtual ~Kernels() = default;
  Kernels(const Kernels&) = delete;
  Kernels& operator=(const Kernels&) = delete;

  // e.g. "cpu: OpenBLAS, 1 thread, simulated time" or "cuda: cuBLAS, cuDNN".
  virtual std::string name() const = 0;
  // Attach (or detach with nullptr) a recorder: calls then cost, and run nothing.
  void set_recorder(CostRecorder* recorder) { recorder_ = recorder; }

  // ---- GEMM, row-major as cblas: C = alpha op(A) op(B) + beta C, op(A) m x k, op(B) k x n.
  void gemm(Stream s, Trans ta, Trans tb, int m, int n, int k, float alpha, const float* a,
            int lda, const float* b, int ldb, float beta, float* c, int ldc);
  // `batch` GEMMs; matrix i of A starts at a + i * stride_a (likewise B and C).
  void gemm_batched(Stream s, Trans ta, Trans tb, int m, int n, int k, float alpha,
                    const float* a, int lda, std::int64_t stride_a, const float* b, int ldb,
                    std::int64_t stride_b, float beta, float* c, int ldc, std::int64_t stride_c,
                    int batch);

  // ---- Elementwise. In-place use (y == x) is allowed where the names say "x may be y".
  void fill(Stream s, float* y, float value, std::size_t n);
  void copy(Stream s, float* y, const float* x, std::size_t n);
  void add(Stream s, float* y, const float* x, std::size_t n);  // y += x
  // y[r][c] += b[c]; db[c] = sum over rows of dy[r][c] (rows in order).
  void bias_add(Stream s, float* y, const float* b, int rows, int cols);
  void bias_grad(Stream s, float* db, const float* dy, int rows, int cols);
  void relu_forward(Stream s, float* y, const float* x, std::size_t n);  // x may be y
  // dx = dy where y > 0, else 0 (from the output); dx may be dy.
  void relu_backward(Stream s, float* dx, const float* dy, const float* y, std::size_t n);
  // GELU, tanh approximation (GPT-2's). Backward from the input x; dx may be dy.
  void gelu_forward(Stream s, float* y, const float* x, std::size_t n);
  void gelu_backward(Stream s, float* dx, const float* dy, const float* x, std::size_t n);

  // ---- Layer norm over the last dimension (biased variance). mean and rstd: one per row.
  void layer_norm_forward(Stream s, float* y, float* mean, float* rstd, const float* x,
                          const float* gamma, const float* beta, int rows, int cols, float eps);
  // dx = LN'(dy) (or dx += LN'(dy) when `accumulate`); dgamma, dbeta written (rows in order).
  void layer_norm_backward(Stream s, float* dx, float* dgamma, float* dbeta, const float* dy,
                           const float* x, const float* gamma, const float* mean,
                           const float* rstd, int rows, int cols, bool accumulate);

  // ---- Softmax cross-entropy over `classes` per row; labels in [0, classes).
  // loss[0] = mean over rows of (logsumexp(z) - z[label]).
  void softmax_xent_forward(Stream s, float* loss, const float* logits, const std::int32_t* labels,
                            int rows, int classes);
  // dlogits = (softmax(z) - onehot(label)) / rows.
  void softmax_xent_backward(Stream s, float* dlogits, const float* logits,
                             const std::int32_t* labels, int rows, int classes);

  // ---- Causal softmax of attention scores: `rows` rows of length t; row r is query position
  // r % t and sees keys 0..r % t. p = softmax(scale * s) over the visible keys, 0 elsewhere.
  void causal_softmax_forward(Stream s, float* p, const float* scores, int rows, int t,
                              float scale);  // p may be scores
  // ds = scale * p * (dp - sum(p * dp)) on the visible keys, 0 elsewhere; ds may be dp.
  void causal_softmax_backward(Stream s, float* ds, const float* dp, const float* p, int rows,
                               int t, float scale);

  // ---- Token + position embedding: y[b][t] = table[ids[b][t]] + pos[t].
  void embedding_forward(Stream s, float* y, const std::int32_t* ids, const float* table,
                         const float* pos, int batch, int seq, int dim);
  // dtable[v] = sum of dy at the positions whose id is v (in position order), 0 for unused
  // rows; dpos[t] = sum over the batch of dy[b][t].
  void embedding_backward(Stream s, float* dtable, float* dpos, const float* dy,
                          const std::int32_t* ids, int batch, int seq, int dim, int vocab);

  // ---- Convolution (NCHW, weights KCRS, no bias): cross-correlation as in cuDNN.
  void conv2d_forward(Stream s, float* y, const float* x, const float* w, const Conv2dShape& sh);
  void conv2d_backward_data(Stream s, float* dx, const float* dy, const float* w,
                            const Conv2dShape& sh);
  void conv2d_backward_filter(Stream s, float* dw, const float* dy, const float* x,
                              const Conv2dShape& sh);

  // ---- Batch norm in training mode over N and spatial positions, per channel (biased
  // variance, as cuDNN's spatial mode). mean and invstd (1/sqrt(var + eps)): one per channel.
  void batch_norm_forward(Stream s, float* y, float* mean, float* invstd, const float* x,
                          const float* gamma, const float* beta, int n, int c, int hw, float eps);
  void batch_norm_backward(Stream s, float* dx, float* dgamma, float* dbeta, const float* dy,
                           const float* x, const float* gamma, const float* mean,
                           const float* invstd, int n, int c, int hw);

  // ---- Pooling. Max: ties go to the first element of the window (row-major).
  void max_pool_forward(Stream s, float* y, const float* x, const Pool2dShape& sh);
  void max_pool_backward(Stream s, float* dx, const float* dy, const float* x, const float* y,
                         const Pool2dShape& sh);
  // Global average over the hw positions of each (n, c).
  void avg_pool_forward(Stream s, float* y, const float* x, int n, int c, int hw);
  void avg_pool_backward(Stream s, float* dx, const float* dy, int n, int c, int hw);

  // ---- AdamW (decoupled weight decay), `step` counts from 1 for bias correction.
  void adamw(Stream s, float* w, float* m, float* v, const float* g, std::size_t n,
             const AdamW& hp, int step);

 protected:
  Kernels() = default;
  // Implementations: `cost` is the call's cost (CpuKernels turns it into simulated time).
  virtual void do_gemm(const Cost& cost, Stream s, Trans ta, Trans tb, int m, int n, int k,
                       float alpha, const float* a, int lda, std::int64_t stride_a,
                       const float* b, int ldb, std::int64_t stride_b, float beta, float* c,
                       int ldc, std::int64_t stride_c, int batch) = 0;
  virtual void do_fill(const Cost& cost, Stream s, float* y, float value, std::size_t n) = 0;
  virtual void do_copy(const Cost& cost, Stream s, float* y, const float* x, std::size_t n) = 0;
  virtual void do_add(const Cost& cost, Stream s, float* y, const float* x, std::size_t n) = 0;
  virtual void do_bias_add(const Cost& cost, Stream s, float* y, const float* b, int rows,
                           int cols) = 0;
  virtual void do_bias_grad(const Cost& cost, Stream s, float* db, const float* dy, int rows,
                            int cols) = 0;
  virtual void do_relu_forward(const Cost& cost, Stream s, float* y, const float* x,
                               std::size_t n) = 0;
  virtual void do_relu_backward(const Cost& cost, Stream s, float* dx, const float* dy,
                                const float* y, std::size_t n) = 0;
  virtual void do_gelu_forward(const Cost& cost, Stream s, float* y, const float* x,
                               std::size_t n) = 0;
  virtual void do_gelu_backward(const Cost& cost, Stream s, float* dx, const float* dy,
                                const float* x, std::size_t n) = 0;
  virtual void do_layer_norm_forward(const Cost& cost, Stream s, float* y, float* mean,
                                     float* rstd, const float* x, const float* gamma,
                                     const float* beta, int rows, int cols, float eps) = 0;
  virtual void do_layer_norm_backward(const Cost& cost, Stream s, float* dx, float* dgamma,
                                      float* dbeta, const float* dy, const float* x,
                                      const float* gamma, const float* mean, const float* rstd,
                                      int rows, int cols, bool accumulate) = 0;
  virtual void do_softmax_xent_forward(const Cost& cost, Stream s, float* loss,
                                       const float* logits, const std::int32_t* labels,
                                       int rows, int classes) = 0;
  virtual void do_softmax_xent_backward(const Cost& cost, Stream s, float* dlogits,
                                        const float* logits, const std::int32_t* labels,
                                        int rows, int classes) = 0;
  virtual void do_causal_softmax_forward(const Cost& cost, Stream s, float* p,
                                         const float* scores, int rows, int t, float scale) = 0;
  virtual void do_causal_softmax_backward(const Cost& cost, Stream s, float* ds, const float* dp,
                                          const float* p, int rows, int t, float scale) = 0;
  virtual void do_embedding_forward(const Cost& cost, Stream s, float* y,
                                    const std::int32_t* ids, const float* table,
                                    const float* pos, int batch, int seq, int dim) = 0;
  virtual void do_embedding_backward(const Cost& cost, Stream s, float* dtable, float* dpos,
                                     const float* dy, const std::int32_t* ids, int batch,
                                     int seq, int dim, int vocab) = 0;
  virtual void do_conv2d_forward(const Cost& cost, Stream s, float* y, const float* x,
                                 const float* w, const Conv2dShape& sh) = 0;
  virtual void do_conv2d_backward_data(const Cost& cost, Stream s, float* dx, const float* dy,
                                       const float* w, const Conv2dShape& sh) = 0;
  virtual void do_conv2d_backward_filter(const Cost& cost, Stream s, float* dw, const float* dy,
                                         const float* x, const Conv2dShape& sh) = 0;
  virtual void do_batch_norm_forward(const Cost& cost, Stream s, float* y, float* mean,
                                     float* invstd, const float* x, const float* gamma,
                                     const float* beta, int n, int c, int hw, float eps) = 0;
  virtual void do_batch_norm_backward(const Cost& cost, Stream s, float* dx, float* dgamma,
                                      float* dbeta, const float* dy, const float* x,
                                      const float* gamma, const float* mean,
                                      const float* invstd, int n, int c, int hw) = 0;
  virtual void do_max_pool_forward(const Cost& cost, Stream s, float* y, const float* x,
                                   const Pool2dShape& sh) = 0;
  virtual void do_max_pool_backward(const Cost& cost, Stream s, float* dx, const float* dy,
                                    const float* x, const float* y, const Pool2dShape& sh) = 0;
  virtual void do_avg_pool_forward(const Cost& cost, Stream s, float* y, const float* x, int n,
                                   int c, int hw) = 0;
  virtual void do_avg_pool_backward(const Cost& cost, Stream s, float* dx, const float* dy,
                                    int n, int c, int hw) = 0;
  virtual void do_adamw(const Cost& cost, Stream s, float* w, float* m, float* v, const float* g,
                        std::size_t n, const AdamW& hp, int step) = 0;

 private:
  // True when a recorder took the call (nothing runs).
  bool recorded(const Cost& c);
  CostRecorder* recorder_ = nullptr;
};

struct KernelsOptions {
  Roofline roofline;  // the simulated device's speed (CpuKernels only)
};

// CpuKernels for a SimDevice, GpuKernels for a CudaDevice. cuBLAS and cuDNN are touched only
// in the second case, so a process on a machine without a driver never loads their state.
std::unique_ptr<Kernels> make_kernels(Device& device, const KernelsOptions& options = {});

}  // namespace spill::kernels

// The public kernel entry points: argument checks and the cost of each call in one place, then
// the implementation (or the recorder, when costing).
#include "kernels/kernels.hpp"

#include <algorithm>

#include "core/errors.hpp"
#include "kernels/cpu_kernels.hpp"
#include "kernels/gpu_kernels.hpp"

namespace spill::kernels {
namespace {

constexpr double kF = sizeof(float);

double d(std::size_t v) { return static_cast<double>(v); }

void expect_dims(bool ok, const char* kernel, const std::string& what) {
  SPILL_EXPECTS(ok, std::string(kernel) + ": " + what);
}

}  // namespace

double Roofline::time_s(const Cost& c) const {
  return std::max(c.flops / flops_per_s, c.bytes / bytes_per_s) + launch_s;
}

void CostRecorder::add(const Cost& c) {
  total.flops += c.flops;
  total.bytes += c.bytes;
  time_s += roofline.time_s(c);
  ++calls;
}

bool Kernels::recorded(const Cost& c) {
  if (recorder_ == nullptr) return false;
  recorder_->add(c);
  return true;
}

void Kernels::gemm(Stream s, Trans ta, Trans tb, int m, int n, int k, float alpha,
                   const float* a, int lda, const float* b, int ldb, float beta, float* c,
                   int ldc) {
  gemm_batched(s, ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1);
}

void Kernels::gemm_batched(Stream s, Trans ta, Trans tb, int m, int n, int k, float alpha,
                           const float* a, int lda, std::int64_t stride_a, const float* b,
                           int ldb, std::int64_t stride_b, float beta, float* c, int ldc,
                           std::int64_t stride_c, int batch) {
  expect_dims(m > 0 && n > 0 && k > 0 && batch > 0, "gemm",
              "m, n, k and batch must be positive (m " + std::to_string(m) + ", n " +
                  std::to_string(n) + ", k " + std::to_string(k) + ", batch " +
                  std::to_string(batch) + ")");
  const int a_cols = ta == Trans::No ? k : m;
  const int b_cols = tb == Trans::No ? n : k;
  expect_dims(lda >= a_cols && ldb >= b_cols && ldc >= n, "gemm",
              "a leading dimension is smaller than its row (lda " + std::to_string(lda) +
                  ", ldb " + std::to_string(ldb) + ", ldc " + std::to_string(ldc) + ")");
  const double mn = double(m) * n, per = 2.0 * mn * k;
  Cost cost{per * batch,
            kF * batch * (double(m) * k + double(k) * n + mn * (beta != 0.0f ? 2 : 1))};
  if (recorded(cost)) return;
  do_gemm(cost, s, ta, tb, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc,
          stride_c, batch);
}

void Kernels::fill(Stream s, float* y, float value, std::size_t n) {
  Cost cost{0, kF * d(n)};
  if (n == 0 || recorded(cost)) return;
  do_fill(cost, s, y, value, n);
}

void Kernels::copy(Stream s, float* y, const float* x, std::size_t n) {
  Cost cost{0, 2 * kF * d(n)};
  if (n == 0 || recorded(cost)) return;
  do_copy(cost, s, y, x, n);
}

void Kernels::add(Stream s, float* y, const float* x, std::size_t n) {
  Cost cost{d(n), 3 * kF * d(n)};
  if (n == 0 || recorded(cost)) return;
  do_add(cost, s, y, x, n);
}

void Kernels::bias_add(Stream s, float* y, const float* b, int rows, int cols) {
  expect_dims(rows > 0 && cols > 0, "bias_add", "rows and cols must be positive");
  const double e = double(rows) * cols;
  Cost cost{e, kF * (2 * e + cols)};
  if (recorded(cost)) return;
  do_bias_add(cost, s, y, b, rows, cols);
}

void Kernels::bias_grad(Stream s, float* db, const float* dy, int rows, int cols) {
  expect_dims(rows > 0 && cols > 0, "bias_grad", "rows and cols must be positive");
  const double e = double(rows) * cols;
  Cost cost{e, kF * (e + cols)};
  if (recorded(cost)) return;
  do_bias_grad(cost, s, db, dy, rows, cols);
}

void Kernels::relu_forward(Stream s, float* y, const float* x, std::size_t n) {
  Cost cost{d(n), 2 * kF * d(n)};
  if (n == 0 || recorded(cost)) return;
  do_relu_forward(cost, s, y, x, n);
}

void Kernels::relu_backward(Stream s, float* dx, const float* dy, const float* y, std::size_t n) {
  Cost cost{d(n), 3 * kF * d(n)};
  if (n == 0 || recorded(cost)) return;
  do_relu_backward(cost, s, dx, dy, y, n);
}

void Kernels::gelu_forward(Stream s, float* y, const float* x, std::size_t n) {
  Cost cost{10 * d(n), 2 * kF * d(n)};
  if (n == 0 || recorded(cost)) return;
  do_gelu_forward(cost, s, y, x, n);
}

void Kernels::gelu_backward(Stream s, float* dx, const float* dy, const float* x, std::size_t n) {
  Cost cost{16 * d(n), 3 * kF * d(n)};
  if (n == 0 || recorded(cost)) return;
  do_gelu_backward(cost, s, dx, dy, x, n);
}

void Kernels::layer_norm_forward(Stream s, float* y, float* mean, float* rstd, const float* x,
                                 const float* gamma, const float* beta, int rows, int cols,
                                 float eps) {
  expect_dims(rows > 0 && cols > 0, "layer_norm_forward", "rows and cols must be positive");
  const double e = double(rows) * cols;
  Cost cost{8 * e, kF * (2 * e + 2.0 * cols + 2.0 * rows)};
  if (recorded(cost)) return;
  do_layer_norm_forward(cost, s, y, mean, rstd, x, gamma, beta, rows, cols, eps);
}

void Kernels::layer_norm_backward(Stream s, float* dx, float* dgamma, float* dbeta,
                                  const float* dy, const float* x, const float* gamma,
                                  const float* mean, const float* rstd, int rows, int cols,
                                  bool accumulate) {
  expect_dims(rows > 0 && cols > 0, "layer_norm_backward", "rows and cols must be positive");
  const double e = double(rows) * cols;
  Cost cost{12 * e, kF * ((accumulate ? 4 : 3) * e + 3.0 * cols + 2.0 * rows)};
  if (recorded(cost)) return;
  do_layer_norm_backward(cost, s, dx, dgamma, dbeta, dy, x, gamma, mean, rstd, rows, cols,
                         accumulate);
}

void Kernels::softmax_xent_forward(Stream s, float* loss, const float* logits,
                                   const std::int32_t* labels, int rows, int classes) {
  expect_dims(rows > 0 && classes > 0, "softmax_xent_forward",
              "rows and classes must be positive");
  const double e = double(rows) * classes;
  Cost cost{4 * e, kF * (e + rows)};
  if (recorded(cost)) return;
  do_softmax_xent_forward(cost, s, loss, logits, labels, rows, classes);
}

void Kernels::softmax_xent_backward(Stream s, float* dlogits, const float* logits,
                                    const std::int32_t* labels, int rows, int classes) {
  expect_dims(rows > 0 && classes > 0, "softmax_xent_backward",
              "rows and classes must be positive");
  const double e = double(rows) * classes;
  Cost cost{5 * e, kF * (2 * e + rows)};
  if (recorded(cost)) return;
  do_softmax_xent_backward(cost, s, dlogits, logits, labels, rows, classes);
}

void Kernels::causal_softmax_forward(Stream s, float* p, const float* scores, int rows, int t,
                                     float scale) {
  expect_dims(rows > 0 && t > 0 && rows % t == 0, "causal_softmax_forward",
              "rows must be a positive multiple of t");
  const double e = double(rows) * t;
  Cost cost{5 * e, 2 * kF * e};
  if (recorded(cost)) return;
  do_causal_softmax_forward(cost, s, p, scores, rows, t, scale);
}

void Kernels::causal_softmax_backward(Stream s, float* ds, const float* dp, const float* p,
                                      int rows, int t, float scale) {
  expect_dims(rows > 0 && t > 0 && rows % t == 0, "causal_softmax_backward",
              "rows must be a positive multiple of t");
  const double e = double(rows) * t;
  Cost cost{4 * e, 3 * kF * e};
  if (recorded(cost)) return;
  do_causal_softmax_backward(cost, s, ds, dp, p, rows, t, scale);
}

void Kernels::embedding_forward(Stream s, float* y, const std::int32_t* ids, const float* table,
                                const float* pos, int batch, int seq, int dim) {
  expect_dims(batch > 0 && seq > 0 && dim > 0, "embedding_forward",
              "batch, seq and dim must be positive");
  const double e = double(batch) * seq * dim;
  Cost cost{e, kF * (3 * e + double(batch) * seq)};
  if (recorded(cost)) return;
  do_embedding_forward(cost, s, y, ids, table, pos, batch, seq, dim);
}

void Kernels::embedding_backward(Stream s, float* dtable, float* dpos, const float* dy,
                                 const std::int32_t* ids, int batch, int seq, int dim,
                                 int vocab) {
  expect_dims(batch > 0 && seq > 0 && dim > 0 && vocab > 0, "embedding_backward",
              "batch, seq, dim and vocab must be positive");
  const double e = double(batch) * seq * dim;
  Cost cost{2 * e, kF * (2 * e + double(vocab) * dim + double(seq) * dim)};
  if (recorded(cost)) return;
  do_embedding_backward(cost, s, dtable, dpos, dy, ids, batch, seq, dim, vocab);
}

namespace {
void check_conv(const Conv2dShape& sh, const char* kernel) {
  expect_dims(sh.n > 0 && sh.c > 0 && sh.h > 0 && sh.w > 0 && sh.k > 0 && sh.r > 0 &&
                  sh.s > 0 && sh.stride > 0 && sh.pad >= 0 && sh.out_h() > 0 && sh.out_w() > 0,
              kernel, "bad convolution shape");
}
Cost conv_cost(const Conv2dShape& sh) {
  const double macs = double(sh.out_elems()) * sh.c * sh.r * sh.s;
  return {2 * macs, kF * (d(sh.in_elems()) + d(sh.out_elems()) + d(sh.weight_elems()))};
}
}  // namespace

void Kernels::conv2d_forward(Stream s, float* y, const float* x, const float* w,
                             const Conv2dShape& sh) {
  check_conv(sh, "conv2d_forward");
  Cost cost = conv_cost(sh);
  if (recorded(cost)) return;
  do_conv2d_forward(cost, s, y, x, w, sh);
}

void Kernels::conv2d_backward_data(Stream s, float* dx, const float* dy, const float* w,
                                   const Conv2dShape& sh) {
  check_conv(sh, "conv2d_backward_data");
  Cost cost = conv_cost(sh);
  if (recorded(cost)) return;
  do_conv2d_backward_data(cost, s, dx, dy, w, sh);
}

void Kernels::conv2d_backward_filter(Stream s, float* dw, const float* dy, const float* x,
                                     const Conv2dShape& sh) {
  check_conv(sh, "conv2d_backward_filter");
  Cost cost = conv_cost(sh);
  if (recorded(cost)) return;
  do_conv2d_backward_filter(cost, s, dw, dy, x, sh);
}

void Kernels::batch_norm_forward(Stream s, float* y, float* mean, float* invstd, const float* x,
                                 const float* gamma, const float* beta, int n, int c, int hw,
                                 float eps) {
  expect_dims(n > 0 && c > 0 && hw > 0, "batch_norm_forward", "n, c and hw must be positive");
  const double e = double(n) * c * hw;
  Cost cost{8 * e, kF * (3 * e + 4.0 * c)};
  if (recorded(cost)) return;
  do_batch_norm_forward(cost, s, y, mean, invstd, x, gamma, beta, n, c, hw, eps);
}

void Kernels::batch_norm_backward(Stream s, float* dx, float* dgamma, float* dbeta,
                                  const float* dy, const float* x, const float* gamma,
                                  const float* mean, const float* invstd, int n, int c, int hw) {
  expect_dims(n > 0 && c > 0 && hw > 0, "batch_norm_backward", "n, c and hw must be positive");
  const double e = double(n) * c * hw;
  Cost cost{12 * e, kF * (5 * e + 5.0 * c)};
  if (recorded(cost)) return;
  do_batch_norm_backward(cost, s, dx, dgamma, dbeta, dy, x, gamma, mean, invstd, n, c, hw);
}

void Kernels::max_pool_forward(Stream s, float* y, const float* x, const Pool2dShape& sh) {
  expect_dims(sh.n > 0 && sh.c > 0 && sh.window > 0 && sh.stride > 0 && sh.out_h() > 0 &&
                  sh.out_w() > 0,
              "max_pool_forward", "bad pooling shape");
  Cost cost{d(sh.out_elems()) * sh.window * sh.window, kF * d(sh.in_elems() + sh.out_elems())};
  if (recorded(cost)) return;
  do_max_pool_forward(cost, s, y, x, sh);
}

void Kernels::max_pool_backward(Stream s, float* dx, const float* dy, const float* x,
                                const float* y, const Pool2dShape& sh) {
  expect_dims(sh.n > 0 && sh.c > 0 && sh.window > 0 && sh.stride > 0 && sh.out_h() > 0 &&
                  sh.out_w() > 0,
              "max_pool_backward", "bad pooling shape");
  Cost cost{d(sh.out_elems()) * sh.window * sh.window,
            kF * 2 * d(sh.in_elems() + sh.out_elems())};
  if (recorded(cost)) return;
  do_max_pool_backward(cost, s, dx, dy, x, y, sh);
}

void Kernels::avg_pool_forward(Stream s, float* y, const float* x, int n, int c, int hw) {
  expect_dims(n > 0 && c > 0 && hw > 0, "avg_pool_forward", "n, c and hw must be positive");
  const double e = double(n) * c * hw;
  Cost cost{e, kF * (e + double(n) * c)};
  if (recorded(cost)) return;
  do_avg_pool_forward(cost, s, y, x, n, c, hw);
}

void Kernels::avg_pool_backward(Stream s, float* dx, const float* dy, int n, int c, int hw) {
  expect_dims(n > 0 && c > 0 && hw > 0, "avg_pool_backward", "n, c and hw must be positive");
  const double e = double(n) * c * hw;
  Cost cost{e, kF * (e + double(n) * c)};
  if (recorded(cost)) return;
  do_avg_pool_backward(cost, s, dx, dy, n, c, hw);
}

void Kernels::adamw(Stream s, float* w, float* m, float* v, const float* g, std::size_t n,
                    const AdamW& hp, int step) {
  expect_dims(step >= 1, "adamw", "step counts from 1 (got " + std::to_string(step) + ")");
  Cost cost{12 * d(n), 7 * kF * d(n)};
  if (n == 0 || recorded(cost)) return;
  do_adamw(cost, s, w, m, v, g, n, hp, step);
}

std::unique_ptr<Kernels> make_kernels(Device& device, const KernelsOptions& options) {
  if (device.info().backend == Backend::Cuda) return make_gpu_kernels(device);
  return make_cpu_kernels(device, options.roofline);
}

}  // namespace spill::kernels

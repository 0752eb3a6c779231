// Dense, elementwise, normalisation, softmax, embedding and optimizer math on the host. Every
// reduction runs in a fixed order, so results do not depend on scheduling, and accumulates in
// double, but the embedding's gradient sums: in float, in position order, as the GPU kernels
// (gpu_reduce.cu) add them (a double accumulator per table row would need a vocab x dim
// scratch on the host; audit 40a #15).
#include "kernels/cpu_math.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

namespace spill::kernels::cpu {
namespace {

constexpr float kGeluC0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluC1 = 0.044715f;

CBLAS_TRANSPOSE cb(Trans t) { return t == Trans::No ? CblasNoTrans : CblasTrans; }
std::size_t z(int v) { return static_cast<std::size_t>(v); }

}  // namespace

void set_blas_threads_once() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

void gemm_batched(Trans ta, Trans tb, int m, int n, int k, float alpha, const float* a, int lda,
                  std::int64_t stride_a, const float* b, int ldb, std::int64_t stride_b,
                  float beta, float* c, int ldc, std::int64_t stride_c, int batch) {
  set_blas_threads_once();
  for (int i = 0; i < batch; ++i) {
    cblas_sgemm(CblasRowMajor, cb(ta), cb(tb), m, n, k, alpha, a + i * stride_a, lda,
                b + i * stride_b, ldb, beta, c + i * stride_c, ldc);
  }
}

void fill(float* y, float value, std::size_t n) { std::fill(y, y + n, value); }
void copy(float* y, const float* x, std::size_t n) { std::copy(x, x + n, y); }
void add(float* y, const float* x, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) y[i] += x[i];
}

void bias_add(float* y, const float* b, int rows, int cols) {
  for (std::size_t r = 0; r < z(rows); ++r)
    for (std::size_t c = 0; c < z(cols); ++c) y[r * z(cols) + c] += b[c];
}

void bias_grad(float* db, const float* dy, int rows, int cols) {
  std::vector<double> acc(z(cols), 0.0);
  for (std::size_t r = 0; r < z(rows); ++r)
    for (std::size_t c = 0; c < z(cols); ++c) acc[c] += dy[r * z(cols) + c];
  for (std::size_t c = 0; c < z(cols); ++c) db[c] = static_cast<float>(acc[c]);
}

void relu_forward(float* y, const float* x, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

void relu_backward(float* dx, const float* dy, const float* y, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

void gelu_forward(float* y, const float* x, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const float v = x[i];
    y[i] = 0.5f * v * (1.0f + std::tanh(kGeluC0 * (v + kGeluC1 * v * v * v)));
  }
}

void gelu_backward(float* dx, const float* dy, const float* x, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float t = std::tanh(kGeluC0 * (v + kGeluC1 * v * v * v));
    const float d = 0.5f * (1.0f + t) +
                    0.5f * v * (1.0f - t * t) * kGeluC0 * (1.0f + 3.0f * kGeluC1 * v * v);
    dx[i] = dy[i] * d;
  }
}

void layer_norm_forward(float* y, float* mean, float* rstd, const float* x, const float* gamma,
                        const float* beta, int rows, int cols, float eps) {
  for (std::size_t r = 0; r < z(rows); ++r) {
    const float* xr = x + r * z(cols);
    double sum = 0;
    for (std::size_t c = 0; c < z(cols); ++c) sum += xr[c];
    const double mu = sum / cols;
    double var = 0;
    for (std::size_t c = 0; c < z(cols); ++c) var += (xr[c] - mu) * (xr[c] - mu);
    const float m = static_cast<float>(mu);
    const float rs = static_cast<float>(1.0 / std::sqrt(var / cols + eps));
    mean[r] = m;
    rstd[r] = rs;
    float* yr = y + r * z(cols);
    for (std::size_t c = 0; c < z(cols); ++c) yr[c] = (xr[c] - m) * rs * gamma[c] + beta[c];
  }
}

void layer_norm_backward(float* dx, float* dgamma, float* dbeta, const float* dy, const float* x,
                         const float* gamma, const float* mean, const float* rstd, int rows,
                         int cols, bool accumulate) {
  std::vector<double> dg(z(cols), 0.0), db(z(cols), 0.0);
  for (std::size_t r = 0; r < z(rows); ++r) {
    const float* xr = x + r * z(cols);
    const float* dyr = dy + r * z(cols);
    float* dxr = dx + r * z(cols);
    const float m = mean[r], rs = rstd[r];
    double a = 0, b = 0;
    for (std::size_t c = 0; c < z(cols); ++c) {
      const float xhat = (xr[c] - m) * rs;
      const float g = dyr[c] * gamma[c];
      a += g;
      b += double(g) * xhat;
      dg[c] += double(dyr[c]) * xhat;
      db[c] += dyr[c];
    }
    const float ma = static_cast<float>(a / cols), mb = static_cast<float>(b / cols);
    for (std::size_t c = 0; c < z(cols); ++c) {
      const float xhat = (xr[c] - m) * rs;
      const float v = rs * (dyr[c] * gamma[c] - ma - xhat * mb);
      dxr[c] = accumulate ? dxr[c] + v : v;
    }
  }
  for (std::size_t c = 0; c < z(cols); ++c) {
    dgamma[c] = static_cast<float>(dg[c]);
    dbeta[c] = static_cast<float>(db[c]);
  }
}

namespace {
// log(sum(exp(z))) of one row, from its maximum.
double logsumexp(const float* zr, int classes) {
  float mx = zr[0];
  for (int c = 1; c < classes; ++c) mx = std::max(mx, zr[c]);
  double sum = 0;
  for (int c = 0; c < classes; ++c) sum += std::exp(double(zr[c]) - mx);
  return mx + std::log(sum);
}
}  // namespace

void softmax_xent_forward(float* loss, const float* logits, const std::int32_t* labels, int rows,
                          int classes) {
  double total = 0;
  for (std::size_t r = 0; r < z(rows); ++r) {
    const float* zr = logits + r * z(classes);
    total += logsumexp(zr, classes) - zr[labels[r]];
  }
  loss[0] = static_cast<float>(total / rows);
}

void softmax_xent_backward(float* dlogits, const float* logits, const std::int32_t* labels,
                           int rows, int classes) {
  const double inv = 1.0 / rows;
  for (std::size_t r = 0; r < z(rows); ++r) {
    const float* zr = logits + r * z(classes);
    float* dr = dlogits + r * z(classes);
    const double lse = logsumexp(zr, classes);
    for (int c = 0; c < classes; ++c) {
      const double p = std::exp(double(zr[c]) - lse);
      dr[c] = static_cast<float>((p - (c == labels[r] ? 1.0 : 0.0)) * inv);
    }
  }
}

void causal_softmax_forward(float* p, const float* scores, int rows, int t, float scale) {
  for (std::size_t r = 0; r < z(rows); ++r) {
    const std::size_t visible = r % z(t) + 1;
    const float* sr = scores + r * z(t);
    float* pr = p + r * z(t);
    float mx = scale * sr[0];
    for (std::size_t j = 1; j < visible; ++j) mx = std::max(mx, scale * sr[j]);
    double sum = 0;
    for (std::size_t j = 0; j < visible; ++j) {
      const float e = std::exp(scale * sr[j] - mx);  // p may alias scores: read, then write
      pr[j] = e;
      sum += e;
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (std::size_t j = 0; j < visible; ++j) pr[j] *= inv;
    for (std::size_t j = visible; j < z(t); ++j) pr[j] = 0.0f;
  }
}

void causal_softmax_backward(float* ds, const float* dp, const float* p, int rows, int t,
                             float scale) {
  for (std::size_t r = 0; r < z(rows); ++r) {
    const std::size_t visible = r % z(t) + 1;
    const float* pr = p + r * z(t);
    const float* dpr = dp + r * z(t);
    float* dsr = ds + r * z(t);
    double dot = 0;
    for (std::size_t j = 0; j < visible; ++j) dot += double(pr[j]) * dpr[j];
    const float d = static_cast<float>(dot);
    for (std::size_t j = 0; j < visible; ++j) dsr[j] = scale * pr[j] * (dpr[j] - d);
    for (std::size_t j = visible; j < z(t); ++j) dsr[j] = 0.0f;
  }
}

void embedding_forward(float* y, const std::int32_t* ids, const float* table, const float* pos,
                       int batch, int seq, int dim) {
  for (std::size_t b = 0; b < z(batch); ++b) {
    for (std::size_t t = 0; t < z(seq); ++t) {
      const std::size_t row = b * z(seq) + t;
      const float* e = table + static_cast<std::size_t>(ids[row]) * z(dim);
      const float* ps = pos + t * z(dim);
      float* yr = y + row * z(dim);
      for (std::size_t j = 0; j < z(dim); ++j) yr[j] = e[j] + ps[j];
    }
  }
}

void embedding_backward(float* dtable, float* dpos, const float* dy, const std::int32_t* ids,
                        int batch, int seq, int dim, int vocab) {
  std::fill(dtable, dtable + z(vocab) * z(dim), 0.0f);
  const std::size_t rows = z(batch) * z(seq);
  for (std::size_t row = 0; row < rows; ++row) {  // position order, as the GPU kernel
    float* dt = dtable + static_cast<std::size_t>(ids[row]) * z(dim);
    const float* dyr = dy + row * z(dim);
    for (std::size_t j = 0; j < z(dim); ++j) dt[j] += dyr[j];
  }
  for (std::size_t t = 0; t < z(seq); ++t) {
    float* dp = dpos + t * z(dim);
    for (std::size_t j = 0; j < z(dim); ++j) {
      float acc = 0.0f;
      for (std::size_t b = 0; b < z(batch); ++b) acc += dy[(b * z(seq) + t) * z(dim) + j];
      dp[j] = acc;
    }
  }
}

AdamWScalars adamw_scalars(const AdamW& hp, int step) {
  return {hp.lr,
          hp.beta1,
          hp.beta2,
          hp.eps,
          1.0f - hp.lr * hp.weight_decay,
          static_cast<float>(1.0 - std::pow(double(hp.beta1), step)),
          static_cast<float>(1.0 - std::pow(double(hp.beta2), step))};
}

void adamw(float* w, float* m, float* v, const float* g, std::size_t n, const AdamW& hp,
           int step) {
  const AdamWScalars a = adamw_scalars(hp, step);
  for (std::size_t i = 0; i < n; ++i) {
    const float gi = g[i];
    m[i] = a.beta1 * m[i] + (1.0f - a.beta1) * gi;
    v[i] = a.beta2 * v[i] + (1.0f - a.beta2) * gi * gi;
    const float mhat = m[i] / a.correction1;
    const float vhat = v[i] / a.correction2;
    w[i] = w[i] * a.decay - a.lr * mhat / (std::sqrt(vhat) + a.eps);
  }
}

}  // namespace spill::kernels::cpu

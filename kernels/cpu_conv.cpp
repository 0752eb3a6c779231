// Convolution (im2col + OpenBLAS GEMM, one image at a time), batch norm and pooling on the
// host. Images are NCHW, weights KCRS. Reductions run in a fixed order (images in order,
// double accumulators), so results are deterministic.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu_math.hpp"

namespace spill::kernels::cpu {
namespace {

std::size_t z(int v) { return static_cast<std::size_t>(v); }

// col[(ci * r + kr) * s + ks][oy * ow + ox] = x[ci][oy * stride - pad + kr][ox * stride - pad + ks]
void im2col(float* col, const float* x, const Conv2dShape& sh) {
  const int oh = sh.out_h(), ow = sh.out_w();
  std::size_t row = 0;
  for (int ci = 0; ci < sh.c; ++ci) {
    for (int kr = 0; kr < sh.r; ++kr) {
      for (int ks = 0; ks < sh.s; ++ks, ++row) {
        float* out = col + row * z(oh) * z(ow);
        for (int oy = 0; oy < oh; ++oy) {
          const int iy = oy * sh.stride - sh.pad + kr;
          for (int ox = 0; ox < ow; ++ox) {
            const int ix = ox * sh.stride - sh.pad + ks;
            const bool inside = iy >= 0 && iy < sh.h && ix >= 0 && ix < sh.w;
            out[z(oy) * z(ow) + z(ox)] =
                inside ? x[(z(ci) * z(sh.h) + z(iy)) * z(sh.w) + z(ix)] : 0.0f;
          }
        }
      }
    }
  }
}

// The adjoint of im2col: dx (one image, zeroed first) += scattered dcol.
void col2im(float* dx, const float* dcol, const Conv2dShape& sh) {
  const int oh = sh.out_h(), ow = sh.out_w();
  std::fill(dx, dx + z(sh.c) * z(sh.h) * z(sh.w), 0.0f);
  std::size_t row = 0;
  for (int ci = 0; ci < sh.c; ++ci) {
    for (int kr = 0; kr < sh.r; ++kr) {
      for (int ks = 0; ks < sh.s; ++ks, ++row) {
        const float* in = dcol + row * z(oh) * z(ow);
        for (int oy = 0; oy < oh; ++oy) {
          const int iy = oy * sh.stride - sh.pad + kr;
          if (iy < 0 || iy >= sh.h) continue;
          for (int ox = 0; ox < ow; ++ox) {
            const int ix = ox * sh.stride - sh.pad + ks;
            if (ix < 0 || ix >= sh.w) continue;
            dx[(z(ci) * z(sh.h) + z(iy)) * z(sh.w) + z(ix)] += in[z(oy) * z(ow) + z(ox)];
          }
        }
      }
    }
  }
}

// Scratch for one image's columns; each stream worker thread has its own.
float* scratch(std::size_t elems) {
  thread_local std::vector<float> buf;
  if (buf.size() < elems) buf.resize(elems);
  return buf.data();
}

}  // namespace

void conv2d_forward(float* y, const float* x, const float* w, const Conv2dShape& sh) {
  const int ohw = sh.out_h() * sh.out_w(), crs = sh.c * sh.r * sh.s;
  float* col = scratch(z(crs) * z(ohw));
  for (int n = 0; n < sh.n; ++n) {
    im2col(col, x + z(n) * z(sh.c) * z(sh.h) * z(sh.w), sh);
    gemm_batched(Trans::No, Trans::No, sh.k, ohw, crs, 1.0f, w, crs, 0, col, ohw, 0, 0.0f,
                 y + z(n) * z(sh.k) * z(ohw), ohw, 0, 1);
  }
}

void conv2d_backward_data(float* dx, const float* dy, const float* w, const Conv2dShape& sh) {
  const int ohw = sh.out_h() * sh.out_w(), crs = sh.c * sh.r * sh.s;
  float* dcol = scratch(z(crs) * z(ohw));
  for (int n = 0; n < sh.n; ++n) {
    gemm_batched(Trans::Yes, Trans::No, crs, ohw, sh.k, 1.0f, w, crs, 0,
                 dy + z(n) * z(sh.k) * z(ohw), ohw, 0, 0.0f, dcol, ohw, 0, 1);
    col2im(dx + z(n) * z(sh.c) * z(sh.h) * z(sh.w), dcol, sh);
  }
}

void conv2d_backward_filter(float* dw, const float* dy, const float* x, const Conv2dShape& sh) {
  const int ohw = sh.out_h() * sh.out_w(), crs = sh.c * sh.r * sh.s;
  float* col = scratch(z(crs) * z(ohw));
  for (int n = 0; n < sh.n; ++n) {  // images in order: dw accumulates deterministically
    im2col(col, x + z(n) * z(sh.c) * z(sh.h) * z(sh.w), sh);
    gemm_batched(Trans::No, Trans::Yes, sh.k, crs, ohw, 1.0f, dy + z(n) * z(sh.k) * z(ohw), ohw,
                 0, col, ohw, 0, n == 0 ? 0.0f : 1.0f, dw, crs, 0, 1);
  }
}

void batch_norm_forward(float* y, float* mean, float* invstd, const float* x, const float* gamma,
                        const float* beta, int n, int c, int hw, float eps) {
  const double count = double(n) * hw;
  for (std::size_t ch = 0; ch < z(c); ++ch) {
    double sum = 0;
    for (std::size_t i = 0; i < z(n); ++i) {
      const float* xp = x + (i * z(c) + ch) * z(hw);
      for (std::size_t j = 0; j < z(hw); ++j) sum += xp[j];
    }
    const double mu = sum / count;
    double var = 0;
    for (std::size_t i = 0; i < z(n); ++i) {
      const float* xp = x + (i * z(c) + ch) * z(hw);
      for (std::size_t j = 0; j < z(hw); ++j) var += (xp[j] - mu) * (xp[j] - mu);
    }
    const float m = static_cast<float>(mu);
    const float is = static_cast<float>(1.0 / std::sqrt(var / count + eps));
    mean[ch] = m;
    invstd[ch] = is;
    for (std::size_t i = 0; i < z(n); ++i) {
      const float* xp = x + (i * z(c) + ch) * z(hw);
      float* yp = y + (i * z(c) + ch) * z(hw);
      for (std::size_t j = 0; j < z(hw); ++j) yp[j] = (xp[j] - m) * is * gamma[ch] + beta[ch];
    }
  }
}

void batch_norm_backward(float* dx, float* dgamma, float* dbeta, const float* dy, const float* x,
                         const float* gamma, const float* mean, const float* invstd, int n,
                         int c, int hw) {
  const double count = double(n) * hw;
  for (std::size_t ch = 0; ch < z(c); ++ch) {
    const float m = mean[ch], is = invstd[ch];
    double db = 0, dg = 0;
    for (std::size_t i = 0; i < z(n); ++i) {
      const std::size_t off = (i * z(c) + ch) * z(hw);
      for (std::size_t j = 0; j < z(hw); ++j) {
        db += dy[off + j];
        dg += double(dy[off + j]) * ((x[off + j] - m) * is);
      }
    }
    dgamma[ch] = static_cast<float>(dg);
    dbeta[ch] = static_cast<float>(db);
    const float k = gamma[ch] * is;
    const float mdb = static_cast<float>(db / count), mdg = static_cast<float>(dg / count);
    for (std::size_t i = 0; i < z(n); ++i) {
      const std::size_t off = (i * z(c) + ch) * z(hw);
      for (std::size_t j = 0; j < z(hw); ++j) {
        const float xhat = (x[off + j] - m) * is;
        dx[off + j] = k * (dy[off + j] - mdb - xhat * mdg);
      }
    }
  }
}

namespace {
// Index (within the image plane) of the window's maximum; ties go to the first element.
std::size_t window_argmax(const float* plane, const Pool2dShape& sh, int oy, int ox) {
  std::size_t best = z(oy * sh.stride) * z(sh.w) + z(ox * sh.stride);
  for (int ky = 0; ky < sh.window; ++ky) {
    for (int kx = 0; kx < sh.window; ++kx) {
      const std::size_t i = z(oy * sh.stride + ky) * z(sh.w) + z(ox * sh.stride + kx);
      if (plane[i] > plane[best]) best = i;
    }
  }
  return best;
}
}  // namespace

void max_pool_forward(float* y, const float* x, const Pool2dShape& sh) {
  const int oh = sh.out_h(), ow = sh.out_w();
  for (std::size_t p = 0; p < z(sh.n) * z(sh.c); ++p) {
    const float* plane = x + p * z(sh.h) * z(sh.w);
    float* out = y + p * z(oh) * z(ow);
    for (int oy = 0; oy < oh; ++oy)
      for (int ox = 0; ox < ow; ++ox)
        out[z(oy) * z(ow) + z(ox)] = plane[window_argmax(plane, sh, oy, ox)];
  }
}

void max_pool_backward(float* dx, const float* dy, const float* x, const Pool2dShape& sh) {
  const int oh = sh.out_h(), ow = sh.out_w();
  std::fill(dx, dx + sh.in_elems(), 0.0f);
  for (std::size_t p = 0; p < z(sh.n) * z(sh.c); ++p) {
    const float* plane = x + p * z(sh.h) * z(sh.w);
    float* dplane = dx + p * z(sh.h) * z(sh.w);
    const float* g = dy + p * z(oh) * z(ow);
    for (int oy = 0; oy < oh; ++oy)
      for (int ox = 0; ox < ow; ++ox)
        dplane[window_argmax(plane, sh, oy, ox)] += g[z(oy) * z(ow) + z(ox)];
  }
}

void avg_pool_forward(float* y, const float* x, int n, int c, int hw) {
  for (std::size_t p = 0; p < z(n) * z(c); ++p) {
    double sum = 0;
    for (std::size_t j = 0; j < z(hw); ++j) sum += x[p * z(hw) + j];
    y[p] = static_cast<float>(sum / hw);
  }
}

void avg_pool_backward(float* dx, const float* dy, int n, int c, int hw) {
  const float inv = 1.0f / static_cast<float>(hw);
  for (std::size_t p = 0; p < z(n) * z(c); ++p)
    for (std::size_t j = 0; j < z(hw); ++j) dx[p * z(hw) + j] = dy[p] * inv;
}

}  // namespace spill::kernels::cpu

// GpuKernels against the CPU math (skipped without a GPU). Stated tolerances: GEMMs and
// convolutions |gpu - cpu| <= 1e-4 * (1 + |cpu|) (FP32 with another summation order); the
// reductions (layer norm, batch norm, softmax, cross-entropy, bias and embedding gradients)
// <= 1e-4 * (1 + |cpu|); elementwise kernels and AdamW <= 1e-5 * (1 + |cpu|) (tanhf/sqrtf
// against the host's). Every GPU kernel must also repeat itself bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "device/cuda_device.hpp"
#include "kernels/cpu_math.hpp"
#include "kernels/gpu_kernels.hpp"
#include "kernels/kernels.hpp"
#include "tests/kernels/grad_check.hpp"

namespace spill::test {
namespace {

using kernels::Trans;
namespace cpu = kernels::cpu;

constexpr double kGemmTol = 1e-4, kReduceTol = 1e-4, kElementTol = 1e-5;

class GpuKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda_available(0, &why)) GTEST_SKIP() << "no GPU: " << why;
    dev_ = make_cuda_device(0);
    s_ = dev_->create_stream();
    k_ = kernels::make_kernels(*dev_);
  }
  void TearDown() override {
    if (!dev_) return;
    dev_->synchronize(s_);
    for (void* p : owned_) dev_->deallocate(p);
    k_.reset();
    dev_->destroy_stream(s_);
  }
  template <class T>
  T* up(const std::vector<T>& v) {
    void* p = dev_->allocate(std::max<std::size_t>(v.size() * sizeof(T), 512));
    owned_.push_back(p);
    dev_->copy_async(p, v.data(), v.size() * sizeof(T), CopyKind::HostToDevice, s_);
    return static_cast<T*>(p);
  }
  float* zeros(std::size_t n) { return up(std::vector<float>(n, 0.0f)); }
  std::vector<float> down(const float* p, std::size_t n) {
    std::vector<float> v(n);
    dev_->copy_async(v.data(), p, n * sizeof(float), CopyKind::DeviceToHost, s_);
    dev_->synchronize(s_);
    return v;
  }
  // Runs `launch` twice into `out` (n floats): the results must agree bitwise and with `want`.
  void expect(const std::string& what, const std::function<void()>& launch, const float* out,
              const std::vector<float>& want, double tol) {
    launch();
    std::vector<float> first = down(out, want.size());
    launch();
    std::vector<float> second = down(out, want.size());
    EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * 4), 0)
        << what << ": not deterministic";
    int bad = 0;
    for (std::size_t i = 0; i < want.size(); ++i)
      if (std::abs(first[i] - want[i]) > tol * (1 + std::abs(want[i])) && bad++ < 5)
        ADD_FAILURE() << what << "[" << i << "]: gpu " << first[i] << ", cpu " << want[i];
  }

  std::unique_ptr<Device> dev_;
  Stream s_ = nullptr;
  std::unique_ptr<kernels::Kernels> k_;
  std::vector<void*> owned_;
};

TEST_F(GpuKernelsTest, GemmsAgreeWithOpenBlas) {
  const int m = 96, n = 80, kk = 256, batch = 3;
  for (Trans ta : {Trans::No, Trans::Yes}) {
    for (Trans tb : {Trans::No, Trans::Yes}) {
      const int lda = ta == Trans::No ? kk : m, ldb = tb == Trans::No ? n : kk;
      std::vector<float> a = random_vec(std::size_t(m) * kk * batch, 1),
                         b = random_vec(std::size_t(kk) * n * batch, 2),
                         c = random_vec(std::size_t(m) * n * batch, 3), want = c;
      cpu::gemm_batched(ta, tb, m, n, kk, 0.5f, a.data(), lda, m * kk, b.data(), ldb, kk * n,
                        1.0f, want.data(), n, m * n, batch);
      float *da = up(a), *db = up(b), *dc = up(c);
      auto launch = [&] {
        dev_->copy_async(dc, c.data(), c.size() * 4, CopyKind::HostToDevice, s_);
        k_->gemm_batched(s_, ta, tb, m, n, kk, 0.5f, da, lda, m * kk, db, ldb, kk * n, 1.0f, dc,
                         n, m * n, batch);
      };
      expect("gemm", launch, dc, want, kGemmTol);
      // The same GEMM on another stream gives the same bits: cuBLAS keeps using spill's
      // workspace (cublasSetStream alone would put it back on a per-stream default one).
      const std::vector<float> first = down(dc, c.size());
      Stream other = dev_->create_stream();
      dev_->copy_async(dc, c.data(), c.size() * 4, CopyKind::HostToDevice, other);
      k_->gemm_batched(other, ta, tb, m, n, kk, 0.5f, da, lda, m * kk, db, ldb, kk * n, 1.0f, dc,
                       n, m * n, batch);
      dev_->synchronize(other);
      dev_->destroy_stream(other);
      EXPECT_EQ(std::memcmp(down(dc, c.size()).data(), first.data(), first.size() * 4), 0)
          << "gemm on another stream differs";
    }
  }
}

// Column sums past 65535 chunks of 64 rows (4,194,240 rows), where the grid's y once passed
// CUDA's limit and the launch failed (kernels/gpu_geometry.hpp). Integer data: every partial
// and total is exact, so the sums must equal the CPU's bit for bit.
TEST_F(GpuKernelsTest, ColumnSumsPastFourMillionRows) {
  const int old_limit = 65535 * 64, rows = old_limit + 4160, cols = 3;
  std::vector<float> mat(std::size_t(rows) * cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      mat[std::size_t(r) * cols + c] = r >= old_limit ? 1.0f : float((r + c) % 5 - 2);
  std::vector<float> want(cols);
  cpu::bias_grad(want.data(), mat.data(), rows, cols);
  for (int c = 0; c < cols; ++c) ASSERT_EQ(want[std::size_t(c)], 4160.0f) << c;
  float *dmat = up(mat), *dsum = zeros(cols);
  expect("bias_grad past 4.2M rows", [&] { k_->bias_grad(s_, dsum, dmat, rows, cols); }, dsum,
         want, 0);
}

TEST_F(GpuKernelsTest, ElementwiseAndAdamW) {
  const std::size_t n = 100003;
  std::vector<float> x = random_vec(n, 10, -4, 4), dy = random_vec(n, 11), want(n);
  float *dx = up(x), *ddy = up(dy), *out = zeros(n);
  cpu::gelu_forward(want.data(), x.data(), n);
  expect("gelu", [&] { k_->gelu_forward(s_, out, dx, n); }, out, want, kElementTol);
  cpu::gelu_backward(want.data(), dy.data(), x.data(), n);
  expect("gelu backward", [&] { k_->gelu_backward(s_, out, ddy, dx, n); }, out, want, kElementTol);
  cpu::relu_forward(want.data(), x.data(), n);
  expect("relu", [&] { k_->relu_forward(s_, out, dx, n); }, out, want, 0);
  const int rows = 301, cols = 333;
  std::vector<float> bias = random_vec(cols, 12), mat = random_vec(std::size_t(rows) * cols, 13);
  std::vector<float> summed(cols);
  cpu::bias_grad(summed.data(), mat.data(), rows, cols);
  float *dmat = up(mat), *dsum = zeros(cols);
  expect("bias_grad", [&] { k_->bias_grad(s_, dsum, dmat, rows, cols); }, dsum, summed, kReduceTol);
  std::vector<float> w = random_vec(n, 14), m(n, 0.1f), v(n, 0.2f), g = random_vec(n, 15);
  std::vector<float> ww = w, wm = m, wv = v;
  cpu::adamw(ww.data(), wm.data(), wv.data(), g.data(), n, {}, 3);
  float *dw = up(w), *dm = up(m), *dv = up(v), *dg = up(g);
  auto launch = [&] {
    dev_->copy_async(dw, w.data(), n * 4, CopyKind::HostToDevice, s_);
    dev_->copy_async(dm, m.data(), n * 4, CopyKind::HostToDevice, s_);
    dev_->copy_async(dv, v.data(), n * 4, CopyKind::HostToDevice, s_);
    k_->adamw(s_, dw, dm, dv, dg, n, {}, 3);
  };
  expect("adamw", launch, dw, ww, kElementTol);
}

TEST_F(GpuKernelsTest, NormsSoftmaxesAndEmbedding) {
  const int rows = 257, cols = 1024;
  std::vector<float> x = random_vec(std::size_t(rows) * cols, 20, -2, 2),
                     g = random_vec(cols, 21), b = random_vec(cols, 22),
                     dy = random_vec(x.size(), 23);
  std::vector<float> y(x.size()), mean(rows), rstd(rows);
  cpu::layer_norm_forward(y.data(), mean.data(), rstd.data(), x.data(), g.data(), b.data(), rows,
                          cols, 1e-5f);
  float *dx = up(x), *dg = up(g), *db = up(b), *ddy = up(dy), *out = zeros(x.size());
  float *dmean = zeros(rows), *drstd = zeros(rows);
  expect("layer_norm", [&] { k_->layer_norm_forward(s_, out, dmean, drstd, dx, dg, db, rows, cols, 1e-5f); },
         out, y, kReduceTol);
  std::vector<float> gx(x.size()), gg(cols), gb(cols);
  cpu::layer_norm_backward(gx.data(), gg.data(), gb.data(), dy.data(), x.data(), g.data(),
                           mean.data(), rstd.data(), rows, cols, false);
  float *dgg = zeros(cols), *dgb = zeros(cols);
  auto ln_back = [&] {
    k_->layer_norm_backward(s_, out, dgg, dgb, ddy, dx, dg, dmean, drstd, rows, cols, false);
  };
  expect("layer_norm dx", ln_back, out, gx, kReduceTol);
  expect("layer_norm dgamma", ln_back, dgg, gg, kReduceTol);
  const int t = 128, srows = 4 * t;
  std::vector<float> sc = random_vec(std::size_t(srows) * t, 24, -3, 3), p(sc.size());
  cpu::causal_softmax_forward(p.data(), sc.data(), srows, t, 0.125f);
  float* dsc = up(sc);
  expect("causal softmax", [&] { k_->causal_softmax_forward(s_, out, dsc, srows, t, 0.125f); },
         out, p, kReduceTol);
  std::vector<std::int32_t> labels(rows);
  for (int r = 0; r < rows; ++r) labels[r] = (r * 37) % cols;
  std::vector<float> loss(1);
  cpu::softmax_xent_forward(loss.data(), x.data(), labels.data(), rows, cols);
  std::int32_t* dl = up(labels);
  float* dloss = zeros(1);
  expect("xent", [&] { k_->softmax_xent_forward(s_, dloss, dx, dl, rows, cols); }, dloss, loss,
         kReduceTol);
  std::vector<float> dz(x.size());
  cpu::softmax_xent_backward(dz.data(), x.data(), labels.data(), rows, cols);
  expect("xent backward", [&] { k_->softmax_xent_backward(s_, out, dx, dl, rows, cols); }, out,
         dz, kReduceTol);
  const int batch = 4, seq = 64, dim = 96, vocab = 50;
  std::vector<std::int32_t> ids(batch * seq);
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = std::int32_t((i * i) % 37);
  std::vector<float> e = random_vec(std::size_t(batch) * seq * dim, 25);
  std::vector<float> dt(std::size_t(vocab) * dim), dp(std::size_t(seq) * dim);
  cpu::embedding_backward(dt.data(), dp.data(), e.data(), ids.data(), batch, seq, dim, vocab);
  std::int32_t* dids = up(ids);
  float *de = up(e), *ddt = zeros(dt.size()), *ddp = zeros(dp.size());
  auto emb = [&] { k_->embedding_backward(s_, ddt, ddp, de, dids, batch, seq, dim, vocab); };
  expect("embedding dtable", emb, ddt, dt, kReduceTol);
  expect("embedding dpos", emb, ddp, dp, kReduceTol);
}

TEST_F(GpuKernelsTest, ConvolutionBatchNormAndPoolingThroughCudnn) {
  if (!kernels::gpu_has_cudnn()) GTEST_SKIP() << "this build has no cuDNN";
  kernels::Conv2dShape sh{.n = 4, .c = 16, .h = 17, .w = 15, .k = 24, .r = 3, .s = 3,
                          .stride = 2, .pad = 1};
  std::vector<float> x = random_vec(sh.in_elems(), 30), w = random_vec(sh.weight_elems(), 31),
                     dy = random_vec(sh.out_elems(), 32);
  std::vector<float> y(sh.out_elems()), dx(sh.in_elems()), dw(sh.weight_elems());
  cpu::conv2d_forward(y.data(), x.data(), w.data(), sh);
  cpu::conv2d_backward_data(dx.data(), dy.data(), w.data(), sh);
  cpu::conv2d_backward_filter(dw.data(), dy.data(), x.data(), sh);
  float *gx = up(x), *gw = up(w), *gdy = up(dy), *gy = zeros(y.size()), *gdx = zeros(dx.size()),
        *gdw = zeros(dw.size());
  expect("conv", [&] { k_->conv2d_forward(s_, gy, gx, gw, sh); }, gy, y, kGemmTol);
  expect("conv data", [&] { k_->conv2d_backward_data(s_, gdx, gdy, gw, sh); }, gdx, dx, kGemmTol);
  expect("conv filter", [&] { k_->conv2d_backward_filter(s_, gdw, gdy, gx, sh); }, gdw, dw,
         kGemmTol);
  const int n = 8, c = 16, hw = 63;
  std::vector<float> bx = random_vec(std::size_t(n) * c * hw, 33), bg = random_vec(c, 34),
                     bb = random_vec(c, 35), by(bx.size()), mean(c), inv(c);
  cpu::batch_norm_forward(by.data(), mean.data(), inv.data(), bx.data(), bg.data(), bb.data(), n,
                          c, hw, 1e-5f);
  float *dbx = up(bx), *dbg = up(bg), *dbb = up(bb), *dby = zeros(by.size()), *dm = zeros(c),
        *di = zeros(c);
  expect("batch norm", [&] { k_->batch_norm_forward(s_, dby, dm, di, dbx, dbg, dbb, n, c, hw, 1e-5f); },
         dby, by, kReduceTol);
  // Backward from the CPU's saved statistics (cuDNN reads them; the forward's are within
  // kReduceTol of them).
  std::vector<float> bdy = random_vec(bx.size(), 37), bdx(bx.size()), bdg(c), bdb(c);
  cpu::batch_norm_backward(bdx.data(), bdg.data(), bdb.data(), bdy.data(), bx.data(), bg.data(),
                           mean.data(), inv.data(), n, c, hw);
  float *dbdy = up(bdy), *dmean = up(mean), *dinv = up(inv), *dbdx = zeros(bdx.size()),
        *dbdg = zeros(c), *dbdb = zeros(c);
  auto bn_back = [&] {
    k_->batch_norm_backward(s_, dbdx, dbdg, dbdb, dbdy, dbx, dbg, dmean, dinv, n, c, hw);
  };
  expect("batch norm dx", bn_back, dbdx, bdx, kReduceTol);
  expect("batch norm dgamma", bn_back, dbdg, bdg, kReduceTol);
  expect("batch norm dbeta", bn_back, dbdb, bdb, kReduceTol);
  kernels::Pool2dShape ps{.n = 4, .c = 8, .h = 16, .w = 12};
  std::vector<float> px = random_vec(ps.in_elems(), 36), py(ps.out_elems());
  cpu::max_pool_forward(py.data(), px.data(), ps);
  float *dpx = up(px), *dpy = zeros(py.size());
  expect("max pool", [&] { k_->max_pool_forward(s_, dpy, dpx, ps); }, dpy, py, 0);
  // Backward: each window's gradient goes to its maximum, exactly (windows do not overlap).
  std::vector<float> pdy = random_vec(py.size(), 38), pdx(px.size());
  cpu::max_pool_backward(pdx.data(), pdy.data(), px.data(), ps);
  float *dpdy = up(pdy), *dpdx = zeros(pdx.size());
  expect("max pool backward", [&] { k_->max_pool_backward(s_, dpdx, dpdy, dpx, dpy, ps); },
         dpdx, pdx, 0);
  // Ties, as after a ReLU (windows of zeros): the CPU gives the gradient to the window's first
  // element (row-major). A failure here means cuDNN's deterministic max pooling picks another
  // element, so GPU and CPU runs of the CNN differ at ties (each stays deterministic).
  std::vector<float> tx = px, ty(py.size()), tdx(px.size());
  for (float& v : tx) v = std::max(v, 0.0f);
  cpu::max_pool_forward(ty.data(), tx.data(), ps);
  cpu::max_pool_backward(tdx.data(), pdy.data(), tx.data(), ps);
  float *dtx = up(tx), *dty = up(ty), *dtdx = zeros(tdx.size());
  expect("max pool backward with ties (cuDNN's tie rule against the CPU's first-in-window)",
         [&] { k_->max_pool_backward(s_, dtdx, dpdy, dtx, dty, ps); }, dtdx, tdx, 0);
}

TEST_F(GpuKernelsTest, GlobalAveragePooling) {
  const int n = 8, c = 24, hw = 49;
  std::vector<float> x = random_vec(std::size_t(n) * c * hw, 40), y(std::size_t(n) * c);
  cpu::avg_pool_forward(y.data(), x.data(), n, c, hw);
  float *dx = up(x), *dy = zeros(y.size());
  expect("avg pool", [&] { k_->avg_pool_forward(s_, dy, dx, n, c, hw); }, dy, y, kReduceTol);
  std::vector<float> g = random_vec(y.size(), 41), gx(x.size());
  cpu::avg_pool_backward(gx.data(), g.data(), n, c, hw);
  float *dg = up(g), *dgx = zeros(gx.size());
  expect("avg pool backward", [&] { k_->avg_pool_backward(s_, dgx, dg, n, c, hw); }, dgx, gx,
         kElementTol);
}

}  // namespace
}  // namespace spill::test

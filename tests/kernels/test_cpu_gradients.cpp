// The CPU kernels' math against references: GEMM against a double-precision loop, every
// backward against central finite differences of its forward (including causal attention
// built from GEMMs and the causal softmax), and AdamW against the formula in double.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/cpu_math.hpp"
#include "tests/kernels/grad_check.hpp"

namespace spill::test {
namespace {

using kernels::Conv2dShape;
using kernels::Pool2dShape;
using kernels::Trans;
namespace cpu = kernels::cpu;

TEST(CpuGemm, MatchesADoubleLoopForEveryTransposeWithBatchesAndBeta) {
  const int m = 5, n = 7, k = 9, batch = 3, pad = 2;
  for (Trans ta : {Trans::No, Trans::Yes}) {
    for (Trans tb : {Trans::No, Trans::Yes}) {
      const int lda = (ta == Trans::No ? k : m) + pad, ldb = (tb == Trans::No ? n : k) + pad;
      const int ldc = n + pad;
      const int arows = ta == Trans::No ? m : k, brows = tb == Trans::No ? k : n;
      const std::int64_t sa = std::int64_t(arows) * lda, sb = std::int64_t(brows) * ldb,
                         sc = std::int64_t(m) * ldc;
      std::vector<float> a = random_vec(sa * batch, 1), b = random_vec(sb * batch, 2);
      std::vector<float> c = random_vec(sc * batch, 3), c0 = c;
      cpu::gemm_batched(ta, tb, m, n, k, 0.5f, a.data(), lda, sa, b.data(), ldb, sb, 2.0f,
                        c.data(), ldc, sc, batch);
      for (int p = 0; p < batch; ++p) {
        for (int i = 0; i < m; ++i) {
          for (int j = 0; j < n; ++j) {
            double acc = 0;
            for (int l = 0; l < k; ++l) {
              const float av = ta == Trans::No ? a[p * sa + i * lda + l] : a[p * sa + l * lda + i];
              const float bv = tb == Trans::No ? b[p * sb + l * ldb + j] : b[p * sb + j * ldb + l];
              acc += double(av) * bv;
            }
            const double want = 0.5 * acc + 2.0 * c0[p * sc + i * ldc + j];
            EXPECT_NEAR(c[p * sc + i * ldc + j], want, 1e-5 * (1 + std::abs(want)))
                << "ta " << int(ta) << " tb " << int(tb) << " batch " << p;
          }
        }
      }
      for (int p = 0; p < batch; ++p)  // padding columns are left alone
        for (int i = 0; i < m; ++i)
          for (int j = n; j < ldc; ++j) EXPECT_EQ(c[p * sc + i * ldc + j], c0[p * sc + i * ldc + j]);
    }
  }
}

TEST(CpuGradients, LinearLayerFromGemmAndBias) {
  const int rows = 4, in = 6, out = 5;
  std::vector<float> x = random_vec(rows * in, 10), w = random_vec(in * out, 11),
                     b = random_vec(out, 12), wy = random_vec(rows * out, 13);
  auto loss = [&] {
    std::vector<float> y(rows * out);
    cpu::gemm_batched(Trans::No, Trans::No, rows, out, in, 1, x.data(), in, 0, w.data(), out, 0,
                      0, y.data(), out, 0, 1);
    cpu::bias_add(y.data(), b.data(), rows, out);
    return weighted(wy, y.data());
  };
  std::vector<float> dx(x.size()), dw(w.size()), db(b.size());
  cpu::gemm_batched(Trans::No, Trans::Yes, rows, in, out, 1, wy.data(), out, 0, w.data(), out, 0,
                    0, dx.data(), in, 0, 1);
  cpu::gemm_batched(Trans::Yes, Trans::No, in, out, rows, 1, x.data(), in, 0, wy.data(), out, 0,
                    0, dw.data(), out, 0, 1);
  cpu::bias_grad(db.data(), wy.data(), rows, out);
  expect_gradient("dx", x, dx, loss);
  expect_gradient("dw", w, dw, loss);
  expect_gradient("db", b, db, loss);
}

TEST(CpuGradients, ReluAndGelu) {
  const std::size_t n = 64;
  std::vector<float> x = random_vec(n, 20, -2, 2), wy = random_vec(n, 21);
  for (float& v : x)
    if (std::abs(v) < 0.05f) v = 0.3f;  // keep finite differences off the kink
  std::vector<float> y(n), dx(n);
  auto relu_loss = [&] {
    cpu::relu_forward(y.data(), x.data(), n);
    return weighted(wy, y.data());
  };
  relu_loss();
  cpu::relu_backward(dx.data(), wy.data(), y.data(), n);
  expect_gradient("relu", x, dx, relu_loss);
  auto gelu_loss = [&] {
    cpu::gelu_forward(y.data(), x.data(), n);
    return weighted(wy, y.data());
  };
  cpu::gelu_backward(dx.data(), wy.data(), x.data(), n);
  expect_gradient("gelu", x, dx, gelu_loss);
  // GELU(x) ~ x for large x, ~0 for very negative x.
  std::vector<float> big = {6.0f, -6.0f}, out(2);
  cpu::gelu_forward(out.data(), big.data(), 2);
  EXPECT_NEAR(out[0], 6.0f, 1e-5);
  EXPECT_NEAR(out[1], 0.0f, 1e-5);
}

TEST(CpuGradients, LayerNormInputScaleShiftAndAccumulation) {
  const int rows = 3, cols = 16;
  std::vector<float> x = random_vec(rows * cols, 30, -2, 2), g = random_vec(cols, 31, 0.5f, 1.5f),
                     b = random_vec(cols, 32), wy = random_vec(rows * cols, 33);
  std::vector<float> y(x.size()), mean(rows), rstd(rows);
  auto loss = [&] {
    cpu::layer_norm_forward(y.data(), mean.data(), rstd.data(), x.data(), g.data(), b.data(),
                            rows, cols, 1e-5f);
    return weighted(wy, y.data());
  };
  loss();
  for (int r = 0; r < rows; ++r) {  // the output rows are normalised before scale and shift
    double s = 0;
    for (int c = 0; c < cols; ++c) s += (y[r * cols + c] - b[c]) / g[c];
    EXPECT_NEAR(s / cols, 0.0, 1e-5);
  }
  std::vector<float> dx(x.size()), dg(cols), db(cols);
  cpu::layer_norm_backward(dx.data(), dg.data(), db.data(), wy.data(), x.data(), g.data(),
                           mean.data(), rstd.data(), rows, cols, false);
  expect_gradient("dx", x, dx, loss, {.eps = 1e-2f, .atol = 2e-3, .rtol = 2e-2});
  expect_gradient("dgamma", g, dg, loss);
  expect_gradient("dbeta", b, db, loss);
  std::vector<float> acc(x.size(), 1.0f);  // accumulate adds to what is there
  cpu::layer_norm_backward(acc.data(), dg.data(), db.data(), wy.data(), x.data(), g.data(),
                           mean.data(), rstd.data(), rows, cols, true);
  for (std::size_t i = 0; i < acc.size(); ++i) EXPECT_FLOAT_EQ(acc[i], 1.0f + dx[i]);
}

TEST(CpuGradients, SoftmaxCrossEntropy) {
  const int rows = 5, classes = 7;
  std::vector<float> z = random_vec(rows * classes, 40, -3, 3);
  std::vector<std::int32_t> labels = {0, 6, 3, 3, 1};
  float loss_value = 0;
  auto loss = [&] {
    cpu::softmax_xent_forward(&loss_value, z.data(), labels.data(), rows, classes);
    return double(loss_value);
  };
  loss();
  double want = 0;  // the definition, in double
  for (int r = 0; r < rows; ++r) {
    double s = 0;
    for (int c = 0; c < classes; ++c) s += std::exp(double(z[r * classes + c]));
    want += std::log(s) - z[r * classes + labels[r]];
  }
  EXPECT_NEAR(loss_value, want / rows, 1e-5);
  std::vector<float> dz(z.size());
  cpu::softmax_xent_backward(dz.data(), z.data(), labels.data(), rows, classes);
  expect_gradient("dlogits", z, dz, loss, {.eps = 1e-2f, .atol = 2e-4, .rtol = 1e-2});
}

TEST(CpuGradients, CausalSoftmaxMasksTheFutureAndDifferentiates) {
  const int t = 6, rows = 2 * t;
  std::vector<float> s = random_vec(rows * t, 50, -2, 2), wy = random_vec(rows * t, 51);
  std::vector<float> p(s.size());
  const float scale = 0.7f;
  auto loss = [&] {
    cpu::causal_softmax_forward(p.data(), s.data(), rows, t, scale);
    return weighted(wy, p.data());
  };
  loss();
  for (int r = 0; r < rows; ++r) {
    double sum = 0;
    for (int j = 0; j < t; ++j) {
      if (j > r % t) {
        EXPECT_EQ(p[r * t + j], 0.0f) << "row " << r << " sees key " << j;
      }
      sum += p[r * t + j];
    }
    EXPECT_NEAR(sum, 1.0, 1e-6);
  }
  std::vector<float> ds(s.size());
  cpu::causal_softmax_backward(ds.data(), wy.data(), p.data(), rows, t, scale);
  expect_gradient("dscores", s, ds, loss, {.samples = 40});
  loss();  // p again for the unperturbed scores
  std::vector<float> inplace = s;  // p may alias the scores
  cpu::causal_softmax_forward(inplace.data(), inplace.data(), rows, t, scale);
  EXPECT_EQ(inplace, p);
}

// Causal self-attention of one head built from GEMMs: S = Q K^T, P = causal softmax(S / sqrt(d)),
// Y = P V; the backward the trainer runs: dP = dY V^T, dV = P^T dY, dS, dQ = dS K, dK = dS^T Q.
TEST(CpuGradients, CausalAttentionFromGemms) {
  const int t = 5, d = 4;
  const float scale = 1.0f / std::sqrt(float(d));
  std::vector<float> q = random_vec(t * d, 60), k = random_vec(t * d, 61),
                     v = random_vec(t * d, 62), wy = random_vec(t * d, 63);
  std::vector<float> sp(t * t), y(t * d);
  auto forward = [&] {
    cpu::gemm_batched(Trans::No, Trans::Yes, t, t, d, 1, q.data(), d, 0, k.data(), d, 0, 0,
                      sp.data(), t, 0, 1);
    cpu::causal_softmax_forward(sp.data(), sp.data(), t, t, scale);
    cpu::gemm_batched(Trans::No, Trans::No, t, d, t, 1, sp.data(), t, 0, v.data(), d, 0, 0,
                      y.data(), d, 0, 1);
    return weighted(wy, y.data());
  };
  forward();
  std::vector<float> dp(t * t), dq(q.size()), dk(k.size()), dv(v.size());
  cpu::gemm_batched(Trans::No, Trans::Yes, t, t, d, 1, wy.data(), d, 0, v.data(), d, 0, 0,
                    dp.data(), t, 0, 1);
  cpu::gemm_batched(Trans::Yes, Trans::No, t, d, t, 1, sp.data(), t, 0, wy.data(), d, 0, 0,
                    dv.data(), d, 0, 1);
  cpu::causal_softmax_backward(dp.data(), dp.data(), sp.data(), t, t, scale);
  cpu::gemm_batched(Trans::No, Trans::No, t, d, t, 1, dp.data(), t, 0, k.data(), d, 0, 0,
                    dq.data(), d, 0, 1);
  cpu::gemm_batched(Trans::Yes, Trans::No, t, d, t, 1, dp.data(), t, 0, q.data(), d, 0, 0,
                    dk.data(), d, 0, 1);
  expect_gradient("dq", q, dq, forward);
  expect_gradient("dk", k, dk, forward);
  expect_gradient("dv", v, dv, forward);
}

TEST(CpuGradients, EmbeddingTableAndPositions) {
  const int batch = 2, seq = 3, dim = 4, vocab = 5;
  std::vector<std::int32_t> ids = {4, 1, 4, 0, 4, 2};  // repeats accumulate, 3 stays unused
  std::vector<float> table = random_vec(vocab * dim, 70), pos = random_vec(seq * dim, 71),
                     wy = random_vec(batch * seq * dim, 72), y(wy.size());
  auto loss = [&] {
    cpu::embedding_forward(y.data(), ids.data(), table.data(), pos.data(), batch, seq, dim);
    return weighted(wy, y.data());
  };
  std::vector<float> dtable(table.size(), 9.0f), dpos(pos.size());
  cpu::embedding_backward(dtable.data(), dpos.data(), wy.data(), ids.data(), batch, seq, dim,
                          vocab);
  for (int j = 0; j < dim; ++j) EXPECT_EQ(dtable[3 * dim + j], 0.0f) << "unused row is zeroed";
  expect_gradient("dtable", table, dtable, loss, {.samples = 20});
  expect_gradient("dpos", pos, dpos, loss);
}

TEST(CpuGradients, Conv2dDataAndFilterWithStrideAndPadding) {
  for (auto [stride, pad] : {std::pair{1, 1}, std::pair{2, 1}, std::pair{1, 0}}) {
    Conv2dShape sh{.n = 2, .c = 3, .h = 7, .w = 6, .k = 4, .r = 3, .s = 3, .stride = stride,
                   .pad = pad};
    std::vector<float> x = random_vec(sh.in_elems(), 80), w = random_vec(sh.weight_elems(), 81),
                       wy = random_vec(sh.out_elems(), 82), y(sh.out_elems());
    auto loss = [&] {
      cpu::conv2d_forward(y.data(), x.data(), w.data(), sh);
      return weighted(wy, y.data());
    };
    loss();
    // One output against the definition.
    double direct = 0;
    for (int ci = 0; ci < sh.c; ++ci)
      for (int kr = 0; kr < sh.r; ++kr)
        for (int ks = 0; ks < sh.s; ++ks) {
          const int iy = -pad + kr, ix = -pad + ks;
          if (iy >= 0 && ix >= 0)
            direct += double(w[((1 * sh.c + ci) * sh.r + kr) * sh.s + ks]) *
                      x[((1 * sh.c + ci) * sh.h + iy) * sh.w + ix];
        }
    const std::size_t out = std::size_t(1 * sh.k + 1) * sh.out_h() * sh.out_w();  // n 1, k 1, (0,0)
    EXPECT_NEAR(y[out], direct, 1e-5) << "stride " << stride << " pad " << pad;
    std::vector<float> dx(x.size()), dw(w.size());
    cpu::conv2d_backward_data(dx.data(), wy.data(), w.data(), sh);
    cpu::conv2d_backward_filter(dw.data(), wy.data(), x.data(), sh);
    expect_gradient("conv dx", x, dx, loss);
    expect_gradient("conv dw", w, dw, loss);
  }
}

TEST(CpuGradients, BatchNormTraining) {
  const int n = 3, c = 2, hw = 5;
  std::vector<float> x = random_vec(n * c * hw, 90, -2, 2), g = random_vec(c, 91, 0.5f, 1.5f),
                     b = random_vec(c, 92), wy = random_vec(x.size(), 93), y(x.size());
  std::vector<float> mean(c), invstd(c);
  auto loss = [&] {
    cpu::batch_norm_forward(y.data(), mean.data(), invstd.data(), x.data(), g.data(), b.data(),
                            n, c, hw, 1e-5f);
    return weighted(wy, y.data());
  };
  loss();
  std::vector<float> dx(x.size()), dg(c), db(c);
  cpu::batch_norm_backward(dx.data(), dg.data(), db.data(), wy.data(), x.data(), g.data(),
                           mean.data(), invstd.data(), n, c, hw);
  expect_gradient("bn dx", x, dx, loss, {.eps = 1e-2f, .atol = 2e-3, .rtol = 2e-2});
  expect_gradient("bn dgamma", g, dg, loss);
  expect_gradient("bn dbeta", b, db, loss);
}

TEST(CpuGradients, MaxAndAveragePooling) {
  Pool2dShape sh{.n = 2, .c = 2, .h = 6, .w = 4, .window = 2, .stride = 2};
  std::vector<float> x(sh.in_elems());
  for (std::size_t i = 0; i < x.size(); ++i)  // distinct values, gaps wider than 2 eps
    x[i] = float((i * 37) % x.size()) * 0.1f;
  std::vector<float> wy = random_vec(sh.out_elems(), 101), y(sh.out_elems());
  auto loss = [&] {
    cpu::max_pool_forward(y.data(), x.data(), sh);
    return weighted(wy, y.data());
  };
  loss();
  std::vector<float> dx(x.size());
  cpu::max_pool_backward(dx.data(), wy.data(), x.data(), sh);
  expect_gradient("max pool", x, dx, loss, {.eps = 1e-2f, .samples = 48});
  const int n = 2, c = 3, hw = 7;
  std::vector<float> a = random_vec(n * c * hw, 102), wa = random_vec(n * c, 103), ya(n * c),
                     da(a.size());
  auto avg_loss = [&] {
    cpu::avg_pool_forward(ya.data(), a.data(), n, c, hw);
    return weighted(wa, ya.data());
  };
  cpu::avg_pool_backward(da.data(), wa.data(), n, c, hw);
  expect_gradient("avg pool", a, da, avg_loss);
}

TEST(CpuAdamW, FollowsTheFormulaOverSeveralSteps) {
  const std::size_t n = 33;
  std::vector<float> w = random_vec(n, 110), m(n, 0.0f), v(n, 0.0f);
  std::vector<double> wd(w.begin(), w.end()), md(n, 0), vd(n, 0);
  kernels::AdamW hp{.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f, .weight_decay = 0.1f};
  for (int step = 1; step <= 4; ++step) {
    std::vector<float> g = random_vec(n, 120 + step);
    cpu::adamw(w.data(), m.data(), v.data(), g.data(), n, hp, step);
    for (std::size_t i = 0; i < n; ++i) {
      md[i] = 0.9 * md[i] + 0.1 * g[i];
      vd[i] = 0.99 * vd[i] + 0.01 * double(g[i]) * g[i];
      const double mh = md[i] / (1 - std::pow(0.9, step)), vh = vd[i] / (1 - std::pow(0.99, step));
      wd[i] = wd[i] * (1 - 1e-2 * 0.1) - 1e-2 * mh / (std::sqrt(vh) + 1e-8);
    }
  }
  for (std::size_t i = 0; i < n; ++i) EXPECT_NEAR(w[i], wd[i], 1e-5) << i;
}

}  // namespace
}  // namespace spill::test

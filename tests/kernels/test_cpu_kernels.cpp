// CpuKernels on the simulated device: calls run on the stream's worker with the host math's
// exact results, advance the stream's simulated clock by the roofline of their cost, cost
// without running while a recorder is attached, and reject bad shapes naming the kernel.
#include <gtest/gtest.h>

#include <cstring>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "device/sim_device.hpp"
#include "kernels/cpu_math.hpp"
#include "kernels/kernels.hpp"
#include "tests/kernels/grad_check.hpp"

namespace spill::test {
namespace {

using kernels::Trans;

struct SimFixture : ::testing::Test {
  SimDevice dev{SimOptions{.capacity = 64 * MiB}};
  Stream s = dev.create_stream();
  Event t0 = dev.create_event(true), t1 = dev.create_event(true);
  std::unique_ptr<kernels::Kernels> k = kernels::make_kernels(dev);
  ~SimFixture() override {
    dev.synchronize(s);
    dev.destroy_event(t0);
    dev.destroy_event(t1);
    dev.destroy_stream(s);
  }
  float* upload(const std::vector<float>& v) {
    auto* p = static_cast<float*>(dev.allocate(std::max<std::size_t>(v.size() * 4, 512)));
    dev.copy_async(p, v.data(), v.size() * 4, CopyKind::HostToDevice, s);
    dev.synchronize(s);
    return p;
  }
};

TEST_F(SimFixture, GemmRunsOnTheStreamBitExactAndTakesTheRooflineTime) {
  EXPECT_NE(k->name().find("cpu"), std::string::npos);
  const int m = 32, n = 48, kk = 64;
  std::vector<float> a = random_vec(m * kk, 1), b = random_vec(kk * n, 2), want(m * n);
  kernels::cpu::gemm_batched(Trans::No, Trans::No, m, n, kk, 1, a.data(), kk, 0, b.data(), n, 0,
                             0, want.data(), n, 0, 1);
  float* da = upload(a);
  float* db = upload(b);
  float* dc = upload(std::vector<float>(m * n, 7.0f));
  dev.record(t0, s);
  k->gemm(s, Trans::No, Trans::No, m, n, kk, 1, da, kk, db, n, 0, dc, n);
  dev.record(t1, s);
  dev.synchronize(s);
  EXPECT_EQ(std::memcmp(dc, want.data(), want.size() * 4), 0) << "same bits as the host math";
  kernels::Roofline roof;
  kernels::Cost cost{2.0 * m * n * kk, 4.0 * (m * kk + kk * n + m * n)};
  EXPECT_NEAR(dev.elapsed_ms(t0, t1) * 1e-3, roof.time_s(cost), 1e-7);
  for (float* p : {da, db, dc}) dev.deallocate(p);
}

TEST_F(SimFixture, RecorderCostsCallsAndRunsNothing) {
  std::vector<float> y(1024, 3.0f);
  float* dy = upload(y);
  kernels::CostRecorder rec;
  k->set_recorder(&rec);
  const double before = dev.sim_time_s();
  k->fill(s, dy, 1.0f, 1024);
  k->gemm(s, Trans::No, Trans::Yes, 8, 8, 16, 1, nullptr, 16, nullptr, 16, 0, nullptr, 8);
  k->set_recorder(nullptr);
  dev.synchronize(s);
  EXPECT_EQ(rec.calls, 2);
  EXPECT_DOUBLE_EQ(rec.total.flops, 2.0 * 8 * 8 * 16);
  EXPECT_DOUBLE_EQ(rec.total.bytes, 4.0 * 1024 + 4.0 * (8 * 16 + 16 * 8 + 8 * 8));
  EXPECT_DOUBLE_EQ(dev.sim_time_s(), before) << "a recorded call must not run";
  EXPECT_EQ(dy[0], 3.0f);
  k->fill(s, dy, 1.0f, 1024);
  dev.synchronize(s);
  EXPECT_EQ(dy[1023], 1.0f);
  dev.deallocate(dy);
}

TEST_F(SimFixture, LayerNormAndAttentionPiecesMatchTheHostMathBitForBit) {
  const int rows = 64, cols = 96;
  std::vector<float> x = random_vec(rows * cols, 5), g = random_vec(cols, 6), b = random_vec(cols, 7);
  std::vector<float> y(x.size()), mean(rows), rstd(rows);
  kernels::cpu::layer_norm_forward(y.data(), mean.data(), rstd.data(), x.data(), g.data(),
                                   b.data(), rows, cols, 1e-5f);
  float *dx = upload(x), *dg = upload(g), *dbt = upload(b), *dy = upload(y);
  float *dm = upload(mean), *dr = upload(rstd);
  k->layer_norm_forward(s, dy, dm, dr, dx, dg, dbt, rows, cols, 1e-5f);
  k->causal_softmax_forward(s, dx, dx, rows, 32, 0.5f);
  dev.synchronize(s);
  EXPECT_EQ(std::memcmp(dy, y.data(), y.size() * 4), 0);
  kernels::cpu::causal_softmax_forward(x.data(), x.data(), rows, 32, 0.5f);
  EXPECT_EQ(std::memcmp(dx, x.data(), x.size() * 4), 0);
  for (float* p : {dx, dg, dbt, dy, dm, dr}) dev.deallocate(p);
}

TEST_F(SimFixture, BadShapesAreErrorsNamingTheKernel) {
  try {
    k->gemm(s, Trans::No, Trans::No, 0, 4, 4, 1, nullptr, 4, nullptr, 4, 0, nullptr, 4);
    FAIL() << "m = 0 accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("gemm"), std::string::npos) << e.what();
  }
  EXPECT_THROW(k->gemm(s, Trans::No, Trans::No, 4, 4, 8, 1, nullptr, 4, nullptr, 4, 0, nullptr, 4),
               InvalidArgument)
      << "lda below k";
  EXPECT_THROW(k->causal_softmax_forward(s, nullptr, nullptr, 10, 4, 1), InvalidArgument);
  EXPECT_THROW(k->adamw(s, nullptr, nullptr, nullptr, nullptr, 4, {}, 0), InvalidArgument);
  kernels::Conv2dShape bad{.n = 1, .c = 1, .h = 2, .w = 2, .k = 1, .r = 3, .s = 3};
  EXPECT_THROW(k->conv2d_forward(s, nullptr, nullptr, nullptr, bad), InvalidArgument);
}

}  // namespace
}  // namespace spill::test

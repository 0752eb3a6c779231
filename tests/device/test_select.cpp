#include <gtest/gtest.h>

#include "core/errors.hpp"
#include "device/cuda_device.hpp"
#include "device/select.hpp"

namespace spill::test {
namespace {

TEST(Select, SimIsChosenWhenAskedFor) {
  DeviceSelection sel = make_device(Config::parse("device:sim,sim_capacity:64MiB"));
  ASSERT_TRUE(sel.device);
  EXPECT_EQ(sel.device->info().backend, Backend::Sim);
  EXPECT_NE(sel.reason.find("device:sim"), std::string::npos);
}

TEST(Select, AutoSaysWhichItChoseAndWhy) {
  std::string why;
  bool gpu = cuda_available(0, &why);
  DeviceSelection sel = make_device(Config::parse("device:auto,sim_capacity:64MiB"));
  ASSERT_TRUE(sel.device);
  EXPECT_EQ(sel.device->info().backend, gpu ? Backend::Cuda : Backend::Sim);
  EXPECT_NE(sel.reason.find("device:auto chose"), std::string::npos) << sel.reason;
  if (!gpu) EXPECT_NE(sel.reason.find(why), std::string::npos) << sel.reason;
}

TEST(Select, CudaWithoutAGpuIsAClearError) {
  std::string why;
  if (cuda_available(0, &why)) GTEST_SKIP() << "a GPU is present";
  try {
    make_device(Config::parse("device:cuda"));
    FAIL() << "expected an error";
  } catch (const CudaError& e) {
    EXPECT_NE(std::string(e.what()).find("device:cuda"), std::string::npos) << e.what();
  }
}

TEST(Select, MissingGpuOrdinalIsReported) {
  std::string why;
  EXPECT_FALSE(cuda_available(999, &why));
  EXPECT_FALSE(why.empty());
}

}  // namespace
}  // namespace spill::test

#include <cuda_runtime_api.h>
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
  if (!gpu) {
    EXPECT_NE(sel.reason.find(why), std::string::npos) << sel.reason;
  }
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

// A framework keeps its own current device per thread; spill's calls on device 0 must leave a
// thread that had device 1 current on device 1.
TEST(Select, CudaCallsLeaveTheCallersCurrentDevice) {
  std::string why;
  if (!cuda_available(0, &why)) GTEST_SKIP() << "no GPU: " << why;
  if (!cuda_available(1, &why)) GTEST_SKIP() << "needs two GPUs: " << why;
  ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
  {
    std::unique_ptr<Device> dev = make_cuda_device(0);
    const std::size_t g = dev->info().granularity;
    void* va = dev->reserve(g);
    PhysicalHandle h = dev->create_physical(g);
    dev->map(va, g, h);
    Stream s = dev->create_stream();
    dev->fill_async(va, 7, g, s);
    dev->synchronize(s);
    dev->destroy_stream(s);
    dev->unmap(va, g);
    dev->release_physical(h, g);
    dev->unreserve(va, g);
    int current = -1;
    ASSERT_EQ(cudaGetDevice(&current), cudaSuccess);
    EXPECT_EQ(current, 1);
  }
  int current = -1;
  ASSERT_EQ(cudaGetDevice(&current), cudaSuccess);
  EXPECT_EQ(current, 1) << "after the device was destroyed";
}

}  // namespace
}  // namespace spill::test

// CudaDevice's behaviour that only the CUDA runtime shows (skipped without a GPU).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <vector>

#include "core/pattern.hpp"
#include "device/cuda_device.hpp"
#include "kernels/pattern.hpp"

namespace spill::test {
namespace {

std::unique_ptr<Device> gpu_or_skip() {
  std::string why;
  if (!cuda_available(0, &why)) return nullptr;
  return make_cuda_device(0);
}

// A query of unfinished work answers false and leaves no error behind on the thread: the
// runtime keeps cudaErrorNotReady as the last error, and the next kernel-launch check
// (spill's, or PyTorch's after each of its kernels) would report it as a failure.
TEST(CudaDevice, AQueryOfUnfinishedWorkLeavesNoErrorBehind) {
  std::unique_ptr<Device> dev = gpu_or_skip();
  if (!dev) GTEST_SKIP() << "no GPU";
  Stream s = dev->create_stream(), other = dev->create_stream();
  Event e = dev->create_event();
  const std::size_t n = 1 << 20;
  void* buf = dev->allocate(n);
  // Launched once before the hold: with lazy module loading, a kernel's first launch may wait
  // for the whole context, and so for the held stream.
  kernels::fill_pattern_async(buf, n, 5, other);
  dev->synchronize(other);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  HoldToken hold = dev->hold(s);
  dev->record(e, s);
  EXPECT_FALSE(dev->query(e)) << "work behind a hold cannot have finished";
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << "a not-ready query left an error behind";
  // A kernel launched now passes its launch check (spill's pattern kernel checks with
  // cudaGetLastError), and a second hold can be taken (hold queries its slots' events).
  EXPECT_FALSE(dev->query(e));
  EXPECT_NO_THROW(kernels::fill_pattern_async(buf, n, 5, other));
  EXPECT_FALSE(dev->query(e));
  HoldToken second = 0;
  EXPECT_NO_THROW(second = dev->hold(other));
  if (second) dev->release(second);
  dev->release(hold);
  dev->synchronize(e);
  EXPECT_TRUE(dev->query(e));
  dev->synchronize(other);
  EXPECT_EQ(kernels::count_pattern_mismatches(buf, n, 5, other), 0u);
  dev->deallocate(buf);
  dev->destroy_stream(other);
  dev->destroy_event(e);
  dev->destroy_stream(s);
}

// The default stream (nullptr) is the current device's: record and wait on it from a thread
// whose current device is another GPU must still use this device's (needs two GPUs).
TEST(CudaDevice, DefaultStreamCallsUseThisDevice) {
  std::unique_ptr<Device> dev = gpu_or_skip();
  if (!dev) GTEST_SKIP() << "no GPU";
  std::string why;
  if (!cuda_available(1, &why)) GTEST_SKIP() << "needs two GPUs: " << why;
  ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
  Event e = dev->create_event();
  EXPECT_NO_THROW(dev->record(e, nullptr));
  EXPECT_NO_THROW(dev->wait(nullptr, e));
  EXPECT_NO_THROW(dev->synchronize(Stream{nullptr}));
  int current = -1;
  ASSERT_EQ(cudaGetDevice(&current), cudaSuccess);
  EXPECT_EQ(current, 1);
  dev->destroy_event(e);
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
}

}  // namespace
}  // namespace spill::test

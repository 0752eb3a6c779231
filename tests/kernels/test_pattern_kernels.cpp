// The pattern kernels on a GPU (skipped without one): fill on the device, check on the device,
// and agree with the host version byte for byte.
#include <gtest/gtest.h>

#include <vector>

#include "core/pattern.hpp"
#include "core/units.hpp"
#include "device/cuda_device.hpp"
#include "kernels/pattern.hpp"

namespace spill::test {
namespace {

TEST(PatternKernels, FillAndCheckOnTheDeviceMatchTheHost) {
  std::string why;
  if (!cuda_available(0, &why)) GTEST_SKIP() << "no GPU: " << why;
  auto dev = make_cuda_device(0);
  Stream s = dev->create_stream();
  const std::size_t n = 8 * MiB;
  void* d = dev->allocate(n);
  kernels::fill_pattern_async(d, n, 77, s);
  EXPECT_EQ(kernels::count_pattern_mismatches(d, n, 77, s), 0u);
  EXPECT_GT(kernels::count_pattern_mismatches(d, n, 78, s), 0u) << "another seed must differ";
  std::vector<unsigned char> host(n);
  dev->copy_async(host.data(), d, n, CopyKind::DeviceToHost, s);
  dev->synchronize(s);
  EXPECT_EQ(find_pattern_mismatch(host.data(), n, 77), n) << "device and host patterns differ";
  dev->deallocate(d);
  dev->destroy_stream(s);
}

}  // namespace
}  // namespace spill::test

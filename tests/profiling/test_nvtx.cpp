#include <gtest/gtest.h>

#include <cstdlib>

#include "profiling/nvtx.hpp"

namespace spill::profiling {
namespace {

// Without a profiler attached NVTX loads no tool: the domain is null and ranges are no-ops
// that must nest and unwind without effect.
TEST(Nvtx, RangesAreNoOpsWithoutAProfiler) {
  if (std::getenv("NVTX_INJECTION64_PATH") != nullptr) GTEST_SKIP() << "a profiler is attached";
  EXPECT_EQ(nvtx_domain(), nullptr);
  {
    NvtxRange outer("swap_out", kNvtxSwapOut);
    NvtxRange inner("pin_wait", kNvtxWait);
  }
  EXPECT_EQ(nvtx_domain(), nullptr);
}

}  // namespace
}  // namespace spill::profiling

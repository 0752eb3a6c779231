// HostPool: exact sizes from registered chunks, reuse, the host cap; and the allocator's OOM
// dump.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "allocator/caching_allocator.hpp"
#include "allocator/host_pool.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"
#include "device/sim_device.hpp"
#include "profiling/chrome_trace.hpp"
#include "profiling/snapshot.hpp"

namespace spill::test {
namespace {

TEST(HostPool, ExactSizesFromOneRegisteredChunk) {
  SimDevice dev(SimOptions{.capacity = 64 * MiB});
  HostPool pool(dev, 256 * MiB, 64 * MiB);
  void* a = pool.allocate(3 * MiB + 100);  // not rounded to a power of two
  void* b = pool.allocate(5 * MiB);
  EXPECT_EQ(pool.in_use(), 3 * MiB + 512 + 5 * MiB);
  EXPECT_EQ(pool.reserved(), 64 * MiB) << "both carved from one chunk";
  EXPECT_EQ(dev.counts().host_buffers, 1u) << "the chunk is registered once";
  std::memset(a, 1, 3 * MiB + 100);
  std::memset(b, 2, 5 * MiB);
  pool.deallocate(a, 3 * MiB + 100);
  void* c = pool.allocate(3 * MiB);
  EXPECT_EQ(c, a) << "freed space is reused";
  pool.deallocate(b, 5 * MiB);
  pool.deallocate(c, 3 * MiB);
  EXPECT_EQ(pool.in_use(), 0u);
  pool.release_free_chunks();
  EXPECT_EQ(pool.reserved(), 0u);
}

TEST(HostPool, TheCapIsAClearError) {
  SimDevice dev(SimOptions{.capacity = 64 * MiB});
  HostPool pool(dev, 16 * MiB, 64 * MiB);
  void* a = pool.allocate(10 * MiB);  // the chunk shrinks to fit under the cap
  try {
    pool.allocate(10 * MiB);
    FAIL() << "expected OutOfMemory";
  } catch (const OutOfMemory& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("host_cap"), std::string::npos) << m;
    EXPECT_NE(m.find("16.00 MiB"), std::string::npos) << m;
  }
  pool.deallocate(a, 10 * MiB);
  void* b = pool.allocate(12 * MiB);  // fits once the first is back
  pool.deallocate(b, 12 * MiB);
  EXPECT_THROW(pool.deallocate(&pool, 1), InvalidArgument);
}

TEST(OomDump, WritesASnapshotAndATraceAndSaysWhere) {
  SimDevice dev(SimOptions{.capacity = 64 * MiB});
  std::string dir = ::testing::TempDir() + "spill_oom_dump_test";
  std::filesystem::remove_all(dir);
  CachingAllocator a(dev, AllocatorOptions{.budget = 8 * MiB, .oom_dump = dir});
  void* p = a.allocate(6 * MiB);
  try {
    a.allocate(6 * MiB);
    FAIL() << "expected OutOfMemory";
  } catch (const OutOfMemory& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("OOM dump was written to " + dir), std::string::npos) << m;
  }
  int snapshots = 0, traces = 0;
  for (auto& f : std::filesystem::directory_iterator(dir)) {
    std::string name = f.path().filename();
    if (name.find("_snapshot.json") != std::string::npos) {
      ++snapshots;
      nlohmann::json j = profiling::read_snapshot(f.path());
      EXPECT_EQ(j["segments"].size(), 1u);
    }
    if (name.find("_trace.json") != std::string::npos) {
      ++traces;
      profiling::read_chrome_trace(f.path());
    }
  }
  EXPECT_EQ(snapshots, 1);
  EXPECT_EQ(traces, 1);
  a.deallocate(p);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace spill::test

// Eight threads allocate, write, check and free concurrently on their own streams. Run under
// ThreadSanitizer by the `tsan` build preset (CMakePresets.json).
#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "core/pattern.hpp"
#include "core/units.hpp"
#include "device/sim_device.hpp"

namespace spill::test {
namespace {

TEST(AllocatorThreads, EightThreadsAllocateAndFreeConcurrently) {
  SimDevice dev(SimOptions{.capacity = 512 * MiB});
  CachingAllocator a(dev, AllocatorOptions{.budget = 256 * MiB});
  std::atomic<int> bad{0}, ooms{0};
  auto worker = [&](int t) {
    std::mt19937_64 rng(t);
    Stream s = dev.create_stream();
    std::vector<std::pair<void*, std::size_t>> mine;
    std::vector<unsigned char> buf(3 * MiB);
    for (int i = 0; i < 3000; ++i) {
      if (mine.size() < 8 && (mine.empty() || rng() % 2)) {
        std::size_t n = rng() % 8 == 0 ? 1 * MiB + rng() % (2 * MiB) : 1 + rng() % (64 * KiB);
        void* p = nullptr;
        try {
          p = a.allocate(n, s);
        } catch (const OutOfMemory&) {
          ooms++;
          continue;
        }
        if (i % 16 == 0) {
          fill_pattern(buf.data(), n, static_cast<std::uint64_t>(t) * 1000 + i);
          dev.copy_async(p, buf.data(), n, CopyKind::HostToDevice, s);
          dev.copy_async(buf.data(), p, n, CopyKind::DeviceToHost, s);
          dev.synchronize(s);
          bad += find_pattern_mismatch(buf.data(), n, static_cast<std::uint64_t>(t) * 1000 + i) != n;
        }
        mine.push_back({p, n});
      } else {
        std::size_t k = rng() % mine.size();
        a.deallocate(mine[k].first);
        mine.erase(mine.begin() + static_cast<long>(k));
      }
    }
    for (auto& [p, n] : mine) a.deallocate(p);
    a.forget_stream(s);  // blocks freed on s stay cached after s is gone
    dev.destroy_stream(s);
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < 8; ++t) pool.emplace_back(worker, t);
  for (auto& th : pool) th.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(ooms.load(), 0) << "the budget is far above what 8 x 8 blocks need";
  a.check_invariants();
  EXPECT_EQ(a.stats().allocated.current, 0);
}

}  // namespace
}  // namespace spill::test

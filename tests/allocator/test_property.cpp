// Property test: over a million random allocate/free operations (fixed seeds), after every
// step no two live blocks overlap, every byte of every segment is in exactly one block,
// neighbours are coalesced and the stats equal a recount (CachingAllocator::check_invariants),
// plus the live set seen from outside matches what the allocator reports.
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"
#include "device/sim_device.hpp"

namespace spill::test {
namespace {

void run_property(std::uint64_t seed, long ops) {
  SimDevice dev(SimOptions{.capacity = 256 * MiB});
  CachingAllocator a(dev, AllocatorOptions{.budget = 96 * MiB});
  Stream streams[2] = {dev.create_stream(), dev.create_stream()};
  std::mt19937_64 rng(seed);
  std::map<std::uintptr_t, std::size_t> live;  // address -> requested bytes
  std::size_t live_bytes = 0;
  for (long i = 0; i < ops; ++i) {
    bool do_alloc = live.empty() || (live.size() < 64 && rng() % 100 < 55);
    if (do_alloc) {
      // Mostly small sizes, some large ones (VMM), occasionally exactly 1 MiB or 0.
      std::size_t n;
      switch (rng() % 10) {
        case 0: n = 2 * MiB + rng() % (6 * MiB); break;
        case 1: n = MiB; break;
        case 2: n = 0; break;
        default: n = 1 + rng() % (256 * KiB); break;
      }
      Stream s = streams[rng() % 2];
      void* p = nullptr;
      try {
        p = a.allocate(n, s);
      } catch (const OutOfMemory&) {
        continue;  // the budget is tight on purpose; the invariants must still hold
      }
      if (n == 0) {
        ASSERT_EQ(p, nullptr);
        continue;
      }
      auto k = reinterpret_cast<std::uintptr_t>(p);
      // No overlap with any live block.
      auto next = live.lower_bound(k);
      if (next != live.end()) ASSERT_GE(next->first, k + n) << "overlaps the next live block";
      if (next != live.begin()) {
        auto prev = std::prev(next);
        ASSERT_LE(prev->first + prev->second, k) << "overlaps the previous live block";
      }
      live[k] = n;
      live_bytes += n;
    } else {
      auto it = live.begin();
      std::advance(it, static_cast<long>(rng() % live.size()));
      a.deallocate(reinterpret_cast<void*>(it->first), rng() % 4 == 0 ? streams[rng() % 2]
                                                                         : nullptr);
      live_bytes -= it->second;
      live.erase(it);
    }
    ASSERT_NO_THROW(a.check_invariants()) << "after operation " << i;
    ASSERT_EQ(a.stats().requested.current, static_cast<std::int64_t>(live_bytes));
    if (i % 50000 == 0) a.empty_cache();
  }
  for (auto& [k, n] : live) a.deallocate(reinterpret_cast<void*>(k));
  a.check_invariants();
  EXPECT_EQ(a.stats().allocated.current, 0);
  dev.synchronize();
  for (Stream s : streams) dev.destroy_stream(s);
}

TEST(AllocatorProperty, InvariantsHoldOverAMillionRandomOperations) {
  for (std::uint64_t seed : {11u, 22u}) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    run_property(seed, 500'000);
  }
}

}  // namespace
}  // namespace spill::test

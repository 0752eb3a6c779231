// Eight threads allocate, write, check and free concurrently on their own streams. Run under
// ThreadSanitizer by the `tsan` build preset (CMakePresets.json).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <optional>
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

// Like the swapper: an observer that evicts other threads' large blocks by unbacking them
// (re-entering the allocator from the eviction hook) while eight threads allocate, reback their
// own blocks and free them under a tight budget. Shows the lock rule holds (no deadlock, no
// race under TSan) and the books balance at the end.
class EvictingObserver final : public LargeBlockObserver {
 public:
  explicit EvictingObserver(CachingAllocator& a) : a_(a) {}
  void on_large_alloc(void* base, std::size_t size, std::size_t, Stream) override {
    std::lock_guard lock(mu_);
    live_.push_back({base, size});
  }
  void on_large_free(void* base, Stream) override {
    std::lock_guard lock(mu_);  // waits for an unback of this block in progress
    std::erase_if(live_, [&](const SwappableBlock& b) { return b.base == base; });
  }
  std::size_t evict(std::size_t bytes) override {
    std::lock_guard lock(mu_);
    std::size_t freed = 0;
    for (SwappableBlock& b : live_) {
      if (freed >= bytes) break;
      std::optional<BlockInfo> info = a_.block_info(b.base);
      if (!info || !info->backed) continue;
      try {
        a_.unback(b.base, b.size);
      } catch (const InvalidArgument&) {
        continue;  // its owner is rebacking it right now
      }
      freed += b.size;
      evictions++;
    }
    return freed;
  }
  std::atomic<long> evictions{0};

 private:
  CachingAllocator& a_;
  std::mutex mu_;
  std::vector<SwappableBlock> live_;
};

TEST(AllocatorThreads, EightThreadsUnderPressureWithAnEvictingObserver) {
  SimDevice dev(SimOptions{.capacity = 256 * MiB});
  CachingAllocator a(dev, AllocatorOptions{.budget = 48 * MiB});
  EvictingObserver obs(a);
  a.set_observer(&obs);
  // Ballast holding most of the budget, so that pressure does not depend on how the threads
  // happen to be scheduled (run one after another, they would never fill 48 MiB).
  std::vector<void*> ballast;
  for (int i = 0; i < 6; ++i) ballast.push_back(a.allocate(6 * MiB));
  std::atomic<int> ooms{0}, rebacks{0};
  auto worker = [&](int t) {
    std::mt19937_64 rng(100 + t);
    Stream s = dev.create_stream();
    std::vector<void*> mine;
    for (int i = 0; i < 1500; ++i) {
      const unsigned dice = static_cast<unsigned>(rng() % 10);
      if (mine.size() < 4 && (mine.empty() || dice < 5)) {
        std::size_t n = dice < 3 ? 1 + rng() % (64 * KiB) : 2 * MiB + rng() % (4 * MiB);
        try {
          mine.push_back(a.allocate(n, s));
        } catch (const OutOfMemory&) {
          ooms++;
        }
      } else if (dice < 7) {
        void* p = mine[rng() % mine.size()];
        std::optional<SwappableBlock> b = a.find_block(p);
        if (b && !a.block_info(p)->backed) {
          try {
            a.reback(b->base, b->size);
            rebacks++;
          } catch (const OutOfMemory&) {
            ooms++;
          } catch (const InvalidArgument& e) {
            // Only this thread rebacks its blocks, and the observer unbacks only mapped ones.
            ADD_FAILURE() << "reback of an own unbacked block was refused: " << e.what();
          }
        }
      } else {
        std::size_t k = rng() % mine.size();
        a.deallocate(mine[k]);
        mine.erase(mine.begin() + static_cast<long>(k));
      }
    }
    for (void* p : mine) a.deallocate(p);
    a.forget_stream(s);
    dev.destroy_stream(s);
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < 8; ++t) pool.emplace_back(worker, t);
  for (auto& th : pool) th.join();
  for (void* p : ballast) a.deallocate(p);
  a.set_observer(nullptr);
  EXPECT_GT(obs.evictions.load(), 0) << "the budget should have forced evictions";
  a.check_invariants();
  AllocatorStats st = a.stats();
  EXPECT_EQ(st.allocated.current, 0);
  EXPECT_EQ(st.swapped_out_bytes, 0u);
  EXPECT_LE(st.reserved.peak, static_cast<std::int64_t>(48 * MiB));
}

}  // namespace
}  // namespace spill::test

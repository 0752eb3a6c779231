// Property test: a million random operations (fixed seeds) of allocate, free (on the allocation
// stream or another), record_stream, unback/reback (the swapper's primitives) and occasional
// empty_cache. After every step: no two live blocks overlap, every byte of every segment is in
// exactly one block, free neighbours are coalesced, the pools' sets and the stats equal a
// recount, mapped bytes equal the budget's count (CachingAllocator::check_invariants), and the
// live set seen from outside matches what the allocator reports. At most 64 live blocks, so
// each check is cheap. Runs on SimDevice and, when present, on the GPU.
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"
#include "tests/device/backends.hpp"

namespace spill::test {
namespace {

struct Live {
  std::size_t bytes;
  bool large;
  bool backed;
};

template <class Backend>
class AllocatorProperty : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string skip;
    dev_ = Backend::make(&skip);
    if (!dev_) GTEST_SKIP() << skip;
  }
  void run(std::uint64_t seed, long ops);
  std::unique_ptr<Device> dev_;
};

template <class Backend>
void AllocatorProperty<Backend>::run(std::uint64_t seed, long ops) {
  Device& dev = *dev_;
  CachingAllocator a(dev, AllocatorOptions{.budget = 96 * MiB});
  Stream streams[2] = {dev.create_stream(), dev.create_stream()};
  std::mt19937_64 rng(seed);
  std::map<std::uintptr_t, Live> live;
  std::size_t live_bytes = 0, swapped = 0;
  auto pick = [&] {
    auto it = live.begin();
    std::advance(it, static_cast<long>(rng() % live.size()));
    return it;
  };
  long ooms = 0, reused_across = 0;
  for (long i = 0; i < ops; ++i) {
    const unsigned dice = static_cast<unsigned>(rng() % 100);
    if (live.empty() || (live.size() < 64 && dice < 52)) {
      // Mostly small sizes, some large ones (VMM), exactly 1 MiB at the border, and 0.
      std::size_t n;
      switch (rng() % 10) {
        case 0: n = 2 * MiB + rng() % (6 * MiB); break;
        case 1: n = MiB; break;
        case 2: n = rng() % 3 == 0 ? 0 : MiB + 1 + rng() % MiB; break;
        default: n = 1 + rng() % (256 * KiB); break;
      }
      Stream s = streams[rng() % 2];
      void* p = nullptr;
      try {
        p = a.allocate(n, s);
      } catch (const OutOfMemory&) {
        ++ooms;  // the budget is tight on purpose; the invariants must still hold
        ASSERT_NO_THROW(a.check_invariants()) << "after a failed allocation, operation " << i;
        continue;
      }
      if (n == 0) {
        ASSERT_EQ(p, nullptr);
        continue;
      }
      auto k = reinterpret_cast<std::uintptr_t>(p);
      auto next = live.lower_bound(k);
      if (next != live.end()) {
        ASSERT_GE(next->first, k + n) << "overlaps the next live block";
      }
      if (next != live.begin()) {
        auto prev = std::prev(next);
        ASSERT_LE(prev->first + prev->second.bytes, k) << "overlaps the previous live block";
      }
      std::optional<BlockInfo> info = a.block_info(p);
      ASSERT_TRUE(info.has_value());
      ASSERT_EQ(info->base, p);
      ASSERT_GE(info->size, n);
      ASSERT_EQ(info->stream, s);
      ASSERT_EQ(info->large, n > MiB);
      live[k] = {n, n > MiB, true};
      live_bytes += n;
    } else if (dice < 88) {
      auto it = pick();
      Stream s = streams[rng() % 2];
      const bool explicit_stream = rng() % 4 == 0;
      std::optional<BlockInfo> info = a.block_info(reinterpret_cast<void*>(it->first));
      ASSERT_TRUE(info.has_value());
      reused_across += explicit_stream && s != info->stream;
      if (explicit_stream) {
        a.deallocate(reinterpret_cast<void*>(it->first), s);
      } else {
        a.deallocate(reinterpret_cast<void*>(it->first));
      }
      if (!it->second.backed) swapped -= info->size;
      live_bytes -= it->second.bytes;
      live.erase(it);
    } else if (dice < 93) {
      auto it = pick();
      // An interior pointer finds the block too.
      a.record_stream(reinterpret_cast<void*>(it->first + it->second.bytes / 2),
                      streams[rng() % 2]);
    } else {
      auto it = pick();
      void* base = reinterpret_cast<void*>(it->first);
      std::optional<SwappableBlock> sb = a.find_block(base);
      ASSERT_EQ(sb.has_value(), it->second.large);
      if (!sb) continue;
      if (it->second.backed) {
        a.unback(sb->base, sb->size);
        swapped += sb->size;
        it->second.backed = false;
      } else {
        try {
          if (rng() % 2) {
            a.reback(sb->base, sb->size);
          } else if (!a.try_reback(sb->base, sb->size)) {
            ASSERT_NO_THROW(a.check_invariants());
            continue;
          }
        } catch (const OutOfMemory&) {
          ++ooms;
          ASSERT_NO_THROW(a.check_invariants()) << "after a failed reback, operation " << i;
          continue;
        }
        swapped -= sb->size;
        it->second.backed = true;
      }
    }
    ASSERT_NO_THROW(a.check_invariants()) << "after operation " << i;
    AllocatorStats st = a.stats();
    ASSERT_EQ(st.requested.current, static_cast<std::int64_t>(live_bytes));
    ASSERT_EQ(st.swapped_out_bytes, swapped);
    ASSERT_LE(st.reserved.current, static_cast<std::int64_t>(a.budget()));
    if (i % 50000 == 0) a.empty_cache();
  }
  EXPECT_GT(ooms, 0) << "the sequence should reach the budget now and then";
  EXPECT_GT(reused_across, 0) << "the sequence should free blocks on other streams";
  EXPECT_GT(a.stats().gathers, 0u) << "the sequence should gather cached blocks";
  EXPECT_GT(a.stats().splits, 0u) << "the sequence should split gathered blocks";
  for (auto& [k, l] : live) a.deallocate(reinterpret_cast<void*>(k));
  a.check_invariants();
  EXPECT_EQ(a.stats().allocated.current, 0);
  EXPECT_EQ(a.stats().swapped_out_bytes, 0u);
  a.empty_cache();
  EXPECT_EQ(a.stats().reserved.current, 0);
  for (Stream s : streams) a.forget_stream(s);
  dev.synchronize();
  for (Stream s : streams) dev.destroy_stream(s);
}

using Backends = ::testing::Types<SimBackend, CudaBackend>;
struct Names {
  template <class T>
  static std::string GetName(int) {
    return T::name;
  }
};
TYPED_TEST_SUITE(AllocatorProperty, Backends, Names);

TYPED_TEST(AllocatorProperty, InvariantsHoldOverAMillionRandomOperations) {
  for (std::uint64_t seed : {11u, 22u}) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    this->run(seed, 500'000);
    if (this->HasFatalFailure()) return;
  }
}

}  // namespace
}  // namespace spill::test

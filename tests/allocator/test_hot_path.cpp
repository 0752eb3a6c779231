// The cache-hit path allocates nothing on the heap: this test program replaces the global
// operator new with a counting one (a replacement is program-wide, so libspill's calls count
// too) and runs allocate+free pairs that hit the cache. It counts; it never times anything.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include "allocator/caching_allocator.hpp"
#include "core/units.hpp"
#include "device/sim_device.hpp"
#include "profiling/events.hpp"

namespace {
thread_local bool counting = false;
thread_local long news = 0;
}  // namespace

// The replacement pair is malloc/free underneath; GCC cannot see that they match.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

void* operator new(std::size_t n) {
  if (counting) ++news;
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace spill::test {
namespace {

long heap_allocations_in(const std::function<void()>& work) {
  news = 0;
  counting = true;
  work();
  counting = false;
  return news;
}

TEST(AllocatorHotPath, ACacheHitAllocatesNothingOnTheHeap) {
  ASSERT_EQ(heap_allocations_in([] {
              int* p = new int(1);
              asm volatile("" : : "g"(p) : "memory");  // keep the compiler from eliding it
              delete p;
            }),
            1)
      << "the counter must count";
  SimDevice dev(SimOptions{.capacity = 256 * MiB});
  CachingAllocator a(dev, AllocatorOptions{.budget = 64 * MiB});
  Stream s = dev.create_stream();
  EXPECT_GT(heap_allocations_in([&] { a.deallocate(a.allocate(30 * MiB, s), s); }), 0)
      << "a cache miss allocates (a segment record), and libspill's allocations are counted";
  // Warm: the segments exist, the trace ring of this thread exists.
  for (std::size_t n : {std::size_t{4096}, 200 * KiB, 8 * MiB}) a.deallocate(a.allocate(n, s), s);
  const AllocatorStats before = a.stats();
  long news_seen = heap_allocations_in([&] {
    for (int i = 0; i < 1000; ++i) {
      for (std::size_t n : {std::size_t{4096}, 200 * KiB, 8 * MiB}) {
        void* p = a.allocate(n, s);
        a.deallocate(p, s);
      }
    }
  });
  EXPECT_EQ(news_seen, 0);
  const AllocatorStats after = a.stats();
  EXPECT_EQ(after.cache_hits - before.cache_hits, 3000u) << "every pair was a cache hit";
  EXPECT_EQ(after.segment_maps, before.segment_maps);
  a.forget_stream(s);
  dev.destroy_stream(s);
}

}  // namespace
}  // namespace spill::test

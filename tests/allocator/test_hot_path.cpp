// The cache-hit path allocates nothing on the heap: this test program replaces the global
// operator new with a counting one (a replacement is program-wide, so libspill's calls count
// too) and runs allocate+free pairs that hit the cache. It counts; it never times anything.
#include <gtest/gtest.h>

#include <atomic>
#include <cstddef>
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

// The replacements are malloc/free underneath; GCC cannot see that they match. Every form is
// replaced (plain, array, nothrow, aligned), so that no allocation reaches a library's new and
// comes back through our delete (AddressSanitizer reports that as a mismatch).
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

namespace {
void* counted_alloc(std::size_t n, std::size_t align = 0) noexcept {
  if (counting) ++news;
  if (n == 0) n = 1;
  if (align <= alignof(std::max_align_t)) return std::malloc(n);
  void* p = nullptr;
  return ::posix_memalign(&p, align, n) == 0 ? p : nullptr;
}
void* counted_or_throw(std::size_t n, std::size_t align = 0) {
  if (void* p = counted_alloc(n, align)) return p;
  throw std::bad_alloc();
}
}  // namespace

void* operator new(std::size_t n) { return counted_or_throw(n); }
void* operator new[](std::size_t n) { return counted_or_throw(n); }
void* operator new(std::size_t n, std::align_val_t a) {
  return counted_or_throw(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a) {
  return counted_or_throw(n, static_cast<std::size_t>(a));
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return counted_alloc(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return counted_alloc(n, static_cast<std::size_t>(a));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

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

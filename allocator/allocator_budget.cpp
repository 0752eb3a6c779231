// CachingAllocator::set_budget: the budget changed at run time. Lowering it walks the same
// rungs as the ladder (release cached memory, then the eviction hook) until the mapped bytes fit
// under the new limit, or fails naming what holds them, with the old budget kept.
#include "allocator/allocator_impl.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"

namespace spill {

namespace {
constexpr int kMaxRounds = 64;
}  // namespace

void CachingAllocator::set_budget(std::size_t bytes) {
  Impl& m = *impl_;
  Lock lock(m.mu);
  m.budget.check_limit(bytes);
  const std::size_t old_limit = m.budget.limit();
  for (int idle_rounds = 0;;) {
    if (m.budget.claimed() <= bytes) {
      m.budget.set_limit(bytes);
      return;
    }
    const std::size_t over = m.budget.claimed() - bytes;
    if (!m.retired.empty()) reap_retired(lock, true);
    if (release_cached(lock, over) > 0) continue;
    if (m.releasing > 0) {
      m.released.wait(lock);
      continue;
    }
    std::size_t freed = 0;
    if (m.observer != nullptr && idle_rounds < kMaxRounds) {
      LargeBlockObserver* obs = m.observer;
      const std::size_t before = m.budget.claimed();
      m.stats.eviction_requests++;
      lock.unlock();
      freed = obs->evict(over);
      lock.lock();
      if (freed > 0 || m.budget.claimed() < before) {
        idle_rounds = 0;
        continue;
      }
      ++idle_rounds;
      if (idle_rounds < 3) continue;  // other threads may be finishing evictions
    }
    // Nothing more can go: say what holds the mapped bytes.
    std::size_t small_alloc = 0, large_alloc = 0;
    for (const Block& b : m.allocated) {
      if (!b.segment->large) small_alloc += b.size;
      else if (b.backed) large_alloc += b.size;
    }
    std::size_t small_mapped = 0;
    for (const Segment& s : m.segments)
      if (!s.large) small_mapped += s.size;
    SPILL_FAIL_OOM("set_budget: cannot lower the budget from " + format_bytes(old_limit) +
                   " to " + format_bytes(bytes) + ": " + format_bytes(m.budget.claimed()) +
                   " is still mapped after releasing the cache and evicting what could go: " +
                   format_bytes(large_alloc) + " in resident large blocks that were not evicted " +
                   (m.observer ? "(pinned or not swappable)" : "(no swapper)") +
                   ", " + format_bytes(small_mapped) + " in small-pool segments (" +
                   format_bytes(small_alloc) + " of it allocated; small blocks never move), " +
                   format_bytes(static_cast<std::size_t>(m.stats.cached.current)) +
                   " cached (still used by queued work); the budget stays " +
                   format_bytes(old_limit));
  }
}

}  // namespace spill

// CachingAllocator::set_budget: the budget changed at run time. Lowering it walks the same
// rungs as the ladder (release cached memory, then the eviction hook) until the mapped bytes fit
// under the new limit, or fails naming what holds them (a full host cap included), with the old
// budget kept; evictions made on the way are not undone (the blocks come back when pinned).
#include <algorithm>

#include "allocator/allocator_impl.hpp"
#include "allocator/host_pool.hpp"
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
    // Nothing more can go: say what holds the mapped bytes. A full host cap stops evictions
    // of blocks that could otherwise go: named, or the message blamed pins and undeclared
    // blocks when there were none.
    const std::optional<std::size_t> cap = m.host_pool ? m.host_pool->cap() : std::nullopt;
    std::optional<LargeBlockObserver::Unevictable> stuck;
    bool cap_full = false;
    if (m.observer != nullptr && cap &&
        *cap - std::min(*cap, m.host_pool->in_use()) < m.budget.claimed() - bytes) {
      LargeBlockObserver* obs = m.observer;
      lock.unlock();  // asked as the hook is, without our lock
      stuck = obs->unevictable();
      lock.lock();
      if (m.budget.claimed() <= bytes) continue;  // others freed enough meanwhile
      cap_full = true;
    }
    std::size_t small_alloc = 0, large_alloc = 0;
    for (const Block& b : m.allocated) {
      if (!b.segment->large) small_alloc += b.size;
      else if (b.backed) large_alloc += b.size;
    }
    std::size_t small_mapped = 0;
    for (const Segment& s : m.segments)
      if (!s.large) small_mapped += s.size;
    std::string why = m.observer ? "(pinned or not swappable)" : "(no swapper)";
    const std::size_t held = stuck ? stuck->pinned + stuck->unswappable : 0;
    if (cap_full && (!stuck || held < large_alloc)) {
      why = "(" + (stuck ? format_bytes(large_alloc - held) + " of them swappable, " : "") +
            "but the host cap is full: host_cap " + format_bytes(*cap) + ", " +
            format_bytes(m.host_pool->in_use()) +
            " of it in use, leaves no room to swap them out: raise host_cap:)";
    }
    SPILL_FAIL_OOM("set_budget: cannot lower the budget from " + format_bytes(old_limit) +
                   " to " + format_bytes(bytes) + ": " + format_bytes(m.budget.claimed()) +
                   " is still mapped after releasing the cache and evicting what could go: " +
                   format_bytes(large_alloc) + " in resident large blocks that were not evicted " +
                   why + ", " + format_bytes(small_mapped) + " in small-pool segments (" +
                   format_bytes(small_alloc) + " of it allocated; small blocks never move), " +
                   format_bytes(static_cast<std::size_t>(m.stats.cached.current)) +
                   " cached (still used by queued work); the budget stays " +
                   format_bytes(old_limit) + " (blocks evicted on the way stay on the host, " +
                   format_bytes(m.swapped_out) + " swapped out now)");
  }
}

}  // namespace spill

// CachingAllocator: construction, allocate/free, record_stream, forget_stream and the ladder.
// The swapper's primitives are in allocator_residency.cpp; stats, snapshots, invariants and OOM
// reports in allocator_report.cpp.
#include "allocator/caching_allocator.hpp"

#include <algorithm>
#include <chrono>
#include <exception>
#include <thread>

#include "allocator/allocator_impl.hpp"
#include "allocator/host_pool.hpp"
#include "core/config.hpp"
#include "core/errors.hpp"
#include "core/output_file.hpp"
#include "core/units.hpp"

namespace spill {

using profiling::EventKind;

namespace {
// The eviction rung gives up after this many rounds without progress: with several threads
// under pressure, the room one eviction frees may be taken by another thread first.
constexpr int kMaxStrikes = 64;

std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }
}  // namespace

AllocatorOptions AllocatorOptions::from_config(const Config& config) {
  AllocatorOptions o;
  o.budget = config.budget;
  o.oom_dump = config.oom_dump;
  o.peak_guard = config.peak_guard;
  o.cache_takeover = config.cache_takeover;
  // Blocks below the swap threshold are never swapped: they may live in the small pool.
  o.small_limit = small_limit_for(config.swap_threshold);
  return o;
}

CachingAllocator::CachingAllocator(Device& device, AllocatorOptions options)
    : dev_(device), impl_(std::make_unique<Impl>(device, options)) {
  SPILL_EXPECTS(options.small_limit <= kSmallSegment,
                "small_limit " + format_bytes(options.small_limit) +
                    " is larger than a small segment (" + format_bytes(kSmallSegment) + ")");
  // Checked now, not at the first out-of-memory failure hours later, whose message was the
  // first place a mistake in it showed (audit 37b, L5).
  if (!options.oom_dump.empty()) check_directory_writable(options.oom_dump, "oom_dump");
}

CachingAllocator::~CachingAllocator() {
  Impl& m = *impl_;
  try {
    dev_.synchronize();
  } catch (...) {
    // A sticky device error: release what can be released below.
  }
  std::lock_guard lock(m.mu);
  // What shutdown releases is traced as released (a trace exported after it ends with nothing
  // allocated or mapped): each block still allocated is freed, each segment's mapped bytes
  // unmapped (a retired range's Unmap was traced when it retired).
  for (const Block& b : m.allocated) {
    if (b.segment->large && !b.backed) m.trace(EventKind::FreeOnHost, b.addr, b.size);
    m.trace(EventKind::Free, b.addr, b.size);
  }
  for (const Segment& s : m.segments) {
    std::size_t mapped = s.large ? 0 : s.size;
    for (const Chunk& c : s.chunks) mapped += s.large ? c.size : 0;
    if (mapped) m.trace(EventKind::Unmap, s.addr, mapped);
  }
  m.allocated.clear();
  // Retired ranges alias segments' chunks: unmapped first.
  for (RetiredRange& r : m.retired) {
    try {
      for (const Chunk& c : r.chunks) dev_.unmap(ptr_of(r.addr + c.offset), c.size);
      dev_.unreserve(ptr_of(r.addr), r.size);
    } catch (...) {
      // Teardown after a device error: nothing more to do for this range.
    }
  }
  m.retired.clear();
  for (const auto& [size, addr] : m.spare_order) {
    try {
      dev_.unreserve(ptr_of(addr), size);
    } catch (...) {
      // Teardown after a device error.
    }
  }
  m.spare_ranges.clear();
  m.spare_order.clear();
  m.segments.clear_and_dispose([&](Segment* s) {
    try {
      if (s->large || !s->chunks.empty()) {
        for (const Chunk& c : s->chunks) dev_.unmap(ptr_of(s->addr + c.offset), c.size);
        for (const Chunk& c : s->chunks) dev_.release_physical(c.handle, c.size);
        dev_.unreserve(ptr_of(s->addr), s->size);
      } else {
        dev_.deallocate(ptr_of(s->addr));
      }
    } catch (...) {
      // Teardown after a device error: nothing more to do for this segment.
    }
    delete s;
  });
}

std::size_t CachingAllocator::budget() const { return impl_->budget.limit(); }

void CachingAllocator::set_observer(LargeBlockObserver* observer) {
  std::lock_guard lock(impl_->mu);
  impl_->observer = observer;
}

void CachingAllocator::set_host_pool(HostPool* pool) {
  std::lock_guard lock(impl_->mu);
  impl_->host_pool = pool;
}

void CachingAllocator::set_host_pinned_source(std::function<std::size_t()> in_use) {
  std::lock_guard lock(impl_->mu);
  impl_->host_in_use = std::move(in_use);
}

// ---- allocation

void* CachingAllocator::allocate(std::size_t bytes, Stream stream) {
  if (bytes == 0) return nullptr;
  try {
    return bytes <= impl_->small_limit ? allocate_small(bytes, stream)
                                       : allocate_large(bytes, stream);
  } catch (const OutOfMemory& e) {
    finish_oom_dump(e);  // the lock is released by now
    throw;
  }
}

void CachingAllocator::account_alloc_locked(Block* b, std::size_t bytes, Stream stream) {
  Impl& m = *impl_;
  b->requested = bytes;
  m.allocated.insert(*b);
  m.stats.allocated.add(b->size);
  m.stats.requested.add(bytes);
  m.stats.cached.sub(b->size);
  m.stats.allocations++;
  m.trace(EventKind::Alloc, b->addr, b->size, stream);
}

// A segment just mapped: counted as reserved and (until carved) cached.
void CachingAllocator::note_mapped_locked(Segment* s) {
  Impl& m = *impl_;
  m.stats.reserved.add(s->size);
  m.stats.cached.add(s->size);
  m.stats.segment_maps++;
  m.trace(EventKind::Map, s->addr, s->size);
}

void* CachingAllocator::allocate_small(std::size_t bytes, Stream stream) {
  Impl& m = *impl_;
  const std::size_t size = round_up(bytes, kSmallRound);
  Lock lock(m.mu);
  Block* b = m.small.take(size, stream);
  if (b != nullptr) {
    m.stats.cache_hits++;
  } else {
    m.small.mark();
    make_room(lock, kSmallSegment, bytes);
    lock.unlock();
    void* p = nullptr;
    PhysicalHandle h = 0;
    try {
      if (m.small_mapped) {
        map_small_segment(&p, &h);
      } else {
        p = dev_.allocate(kSmallSegment);
      }
    } catch (const OutOfMemory& e) {
      lock.lock();
      m.budget.release(kSmallSegment);
      throw_oom_locked(bytes, kSmallSegment, true, std::nullopt, e.what());
    } catch (...) {
      lock.lock();
      m.budget.release(kSmallSegment);
      throw;
    }
    lock.lock();
    Segment* seg = m.new_segment(key(p), kSmallSegment, false);
    if (h != 0) seg->chunks = {Chunk{0, kSmallSegment, h}};
    note_mapped_locked(seg);
    b = m.small.carve(m.small.add_segment(seg), size, stream);
  }
  account_alloc_locked(b, bytes, stream);
  return ptr_of(b->addr);
}

void CachingAllocator::map_small_segment(void** addr, PhysicalHandle* handle) {
  void* va = dev_.reserve(kSmallSegment);
  std::vector<Chunk> chunks;
  try {
    map_chunks(dev_, key(va), chunks, 0, kSmallSegment);
  } catch (...) {
    try {
      dev_.unreserve(va, kSmallSegment);
    } catch (...) {
      // The first error is the one to report.
    }
    throw;
  }
  *addr = va;
  *handle = chunks.front().handle;
}

void* CachingAllocator::allocate_large(std::size_t bytes, Stream stream) {
  Impl& m = *impl_;
  Lock lock(m.mu);
  // Checked first: an impossible request must not flush the cache on its way to failing.
  if (bytes > m.budget.limit()) throw_oom_locked(bytes, bytes, false);
  const std::size_t size = round_up(bytes, m.granularity);
  Block* b = m.large.take(size, stream, largest_reused_block(size) - size);
  if (b != nullptr) {
    m.stats.cache_hits++;
  } else {
    b = map_large(lock, size, bytes, stream);
  }
  account_alloc_locked(b, bytes, stream);
  void* p = ptr_of(b->addr);
  const std::size_t block_size = b->size;  // a reused cached block may be up to 1/4 larger
  LargeBlockObserver* obs = m.observer;
  lock.unlock();
  if (obs) obs->on_large_alloc(p, block_size, size, stream);
  return p;
}

// ---- free

void CachingAllocator::deallocate(void* ptr) { deallocate_impl(ptr, nullptr, false); }

void CachingAllocator::deallocate(void* ptr, Stream stream) { deallocate_impl(ptr, stream, true); }

void CachingAllocator::deallocate_impl(void* ptr, Stream stream, bool explicit_stream) {
  if (ptr == nullptr) return;
  Impl& m = *impl_;
  Lock lock(m.mu);
  Block* b = m.find_allocated(key(ptr));
  if (b == nullptr) throw_bad_free_locked(ptr);
  const Stream s = explicit_stream ? stream : b->stream;
  if (b->segment->large && m.observer) {
    // The swapper drops its copies and makes `s` wait for any copy touching the block.
    LargeBlockObserver* obs = m.observer;
    lock.unlock();
    obs->on_large_free(ptr, s);
    lock.lock();
    b = m.find_allocated(key(ptr));
    SPILL_EXPECTS(b != nullptr, "free: " + format_address(ptr) + " was freed twice at once");
  }
  SPILL_EXPECTS(!b->moving, "free: " + format_address(ptr) +
                                " is being unbacked or rebacked; free it after that returns");
  m.allocated.erase(m.allocated.iterator_to(*b));
  if (b->named) {  // a later block at this address must not show the name
    m.names.erase(b->addr);
    b->named = false;
  }
  m.stats.allocated.sub(b->size);
  m.stats.requested.sub(b->requested);
  m.stats.frees++;
  // Swapped out: its bytes on the host are dropped (a trace that began after its eviction sees
  // them leave here).
  if (b->segment->large && !b->backed) m.trace(EventKind::FreeOnHost, b->addr, b->size, s);
  m.trace(EventKind::Free, b->addr, b->size, s);
  if (b->segment->large && !b->backed) {
    // Swapped out: no physical memory to cache; its addresses are kept for a new segment.
    Segment* seg = b->segment;
    const std::uintptr_t addr = seg->addr;
    const std::size_t size = seg->size;
    m.swapped_out -= b->size;
    b->allocated = false;
    m.large.recycle(b);
    seg->first = nullptr;
    m.delete_segment(seg);
    SpareRanges drop;
    m.keep_spare_range(addr, size, &drop);  // nothing is mapped there
    std::exception_ptr error;
    unreserve_unlocked(lock, drop, &error);
    if (error) std::rethrow_exception(error);
    return;
  }
  m.stats.cached.add(b->size);
  (b->segment->large ? m.large : m.small).give_back(b, s);
}

void CachingAllocator::throw_bad_free_locked(void* ptr) {
  Impl& m = *impl_;
  const std::uintptr_t a = key(ptr);
  if (const Block* b = m.find_containing(a)) {
    SPILL_EXPECTS(false, "free: " + format_address(ptr) + " points inside the block at " +
                             format_address(ptr_of(b->addr)) + " (" + format_bytes(b->size) +
                             "); free the address that allocate returned");
  }
  for (const Segment& s : m.segments) {
    if (a < s.addr || a >= s.addr + s.size) continue;
    for (const Block* b = s.first; b; b = b->next) {
      if (b->addr == a) {
        SPILL_EXPECTS(false, "free: " + format_address(ptr) + " is already free (double free)");
      }
    }
    SPILL_EXPECTS(false, "free: " + format_address(ptr) +
                             " lies in free (cached) memory of this allocator: a double free, "
                             "or an address allocate never returned");
  }
  SPILL_EXPECTS(false, "free: " + format_address(ptr) + " was not allocated by this allocator");
  std::terminate();  // unreachable: SPILL_EXPECTS(false, ...) throws
}

void CachingAllocator::record_stream(void* ptr, Stream stream) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  Block* b = m.find_containing(key(ptr));
  SPILL_EXPECTS(b != nullptr, "record_stream: " + format_address(ptr) +
                                  " is not in an allocated block of this allocator");
  if (stream == b->stream) return;
  for (std::uint8_t i = 0; i < b->n_uses; ++i)
    if (b->uses[i].stream == stream) return;
  SPILL_EXPECTS(b->n_uses < Block::kOtherStreams,
                "record_stream: " + format_address(ptr) + " is already used on " +
                    std::to_string(Block::kOtherStreams) + " other streams");
  b->uses[b->n_uses++] = {stream, nullptr};
}

void CachingAllocator::forget_stream(Stream stream) {
  Impl& m = *impl_;
  dev_.synchronize(stream);
  LargeBlockObserver* obs;
  {
    std::lock_guard lock(m.mu);
    m.small.forget_stream(stream);
    m.large.forget_stream(stream);
    // Allocated blocks: their record_stream uses carry no event yet (events are recorded at
    // reuse time), so forgetting is dropping the entry.
    for (Block& b : m.allocated) {
      std::uint8_t kept = 0;
      for (std::uint8_t i = 0; i < b.n_uses; ++i)
        if (b.uses[i].stream != stream) b.uses[kept++] = b.uses[i];
      for (std::uint8_t i = kept; i < b.n_uses; ++i) b.uses[i] = {};
      b.n_uses = kept;
      if (b.stream == stream) b.stream = nullptr;
    }
    obs = m.observer;
  }
  if (obs) obs->on_forget_stream(stream);
}

void CachingAllocator::empty_cache() {
  HostPool* pool;
  {
    Lock lock(impl_->mu);
    reap_retired(lock, true);
    release_cached(lock, SIZE_MAX);
    pool = impl_->host_pool;
  }
  // Page-locked host memory is scarcer than device memory (the host cannot page it out): the
  // chunks that hold no swapped-out bytes go back too (the pool's own lock, never inside ours).
  if (pool) pool->release_free_chunks();
}

// ---- the ladder

void CachingAllocator::make_room(Lock& lock, std::size_t bytes, std::size_t requested) {
  Impl& m = *impl_;
  if (bytes > m.budget.limit()) throw_oom_locked(requested, bytes, false);
  for (int strikes = 0; !m.budget.fits(bytes);) {
    const std::size_t short_by = m.budget.shortfall(bytes);
    if (release_cached(lock, short_by) > 0) continue;
    if (m.releasing > 0) {
      m.released.wait(lock);  // another thread is returning cached memory: wait for its bytes
      continue;
    }
    if (m.observer == nullptr) throw_oom_locked(requested, bytes, false);
    LargeBlockObserver* obs = m.observer;
    if (strikes >= kMaxStrikes) {
      // What the hook could not evict, asked as the hook is (without our lock): the message
      // says whether pins or undeclared blocks fill the budget.
      lock.unlock();
      const std::optional<LargeBlockObserver::Unevictable> stuck = obs->unevictable();
      lock.lock();
      throw_oom_locked(requested, bytes, false, stuck);
    }
    const std::size_t before = m.budget.claimed();
    m.stats.eviction_requests++;
    lock.unlock();
    const std::size_t freed = obs->evict(short_by);
    lock.lock();
    if (freed > 0 || m.budget.claimed() < before) {
      strikes = 0;
    } else {
      ++strikes;
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      lock.lock();
    }
  }
  m.budget.claim(bytes);  // the caller maps these bytes without the lock
}

std::size_t CachingAllocator::release_cached(Lock& lock, std::size_t want) {
  std::size_t released = 0;
  for (const bool small : {false, true}) {
    std::vector<Event> pending;
    released += release_idle(lock, want - released, &pending, small);
    if (released < want && !pending.empty()) {
      wait_unlocked(lock, pending);
      released += release_idle(lock, want - released, nullptr, small);
    }
    if (released >= want) break;
  }
  if (released) impl_->stats.cache_releases++;
  return released;
}

std::size_t CachingAllocator::release_idle(Lock& lock, std::size_t want,
                                           std::vector<Event>* pending, bool small) {
  Impl& m = *impl_;
  struct Detached {
    std::uintptr_t addr;
    std::size_t size;
    bool large;
    std::vector<Chunk> chunks;
    bool unmapped = false;
  };
  if (!m.retired.empty()) reap_retired(lock, false);
  m.large.mark();
  m.small.mark();
  std::vector<Detached> out;
  std::size_t bytes = 0;
  // Detach under the lock: large cached blocks first (largest first), then wholly free small
  // segments. Their bytes stay claimed in the budget until the device has them back.
  for (Block* b : m.large.free_blocks_largest_first()) {
    if (bytes >= want) break;
    if (!m.large.idle(*b, pending)) continue;
    Segment* s = b->segment;
    if (s->aliases > 0) {
      // Its chunks are still mapped at retired ranges: wait for those, then release it.
      if (pending) m.retired_events(s, pending);
      continue;
    }
    out.push_back({s->addr, s->size, true, std::move(s->chunks)});
    m.large.remove_free_segment(s);
    bytes += s->size;
    m.stats.cached.sub(s->size);
    m.delete_segment(s);
  }
  for (Segment* s : m.small.free_segments()) {
    if (bytes >= want || !small) break;
    if (!m.small.idle(*s->first, pending)) continue;
    out.push_back({s->addr, s->size, false, std::move(s->chunks)});
    m.small.remove_free_segment(s);
    bytes += s->size;
    m.stats.cached.sub(s->size);
    m.delete_segment(s);
  }
  if (out.empty()) return 0;
  m.releasing += bytes;
  lock.unlock();
  std::exception_ptr error;
  for (Detached& d : out) {
    try {
      if (d.large || !d.chunks.empty()) {  // large segments, and small ones mapped as they are
        for (const Chunk& c : d.chunks) dev_.unmap(ptr_of(d.addr + c.offset), c.size);
        d.unmapped = true;
        for (const Chunk& c : d.chunks) dev_.release_physical(c.handle, c.size);
        if (!d.large) dev_.unreserve(ptr_of(d.addr), d.size);  // (large: kept, below)
      } else {
        dev_.deallocate(ptr_of(d.addr));
      }
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
  lock.lock();
  SpareRanges drop;
  for (const Detached& d : out) {
    if (d.large && d.unmapped) m.keep_spare_range(d.addr, d.size, &drop);
    m.trace(EventKind::Unmap, d.addr, d.size);
    m.stats.reserved.sub(d.size);
    m.stats.segment_unmaps++;
    if (!d.large) m.stats.plain_frees++;
  }
  m.budget.release(bytes);
  m.releasing -= bytes;
  m.released.notify_all();
  unreserve_unlocked(lock, drop, &error);
  if (error) std::rethrow_exception(error);
  return bytes;
}

void CachingAllocator::unreserve_unlocked(Lock& lock, const SpareRanges& ranges,
                                          std::exception_ptr* error) {
  if (ranges.empty()) return;
  lock.unlock();
  for (const auto& [size, addr] : ranges) {
    try {
      dev_.unreserve(ptr_of(addr), size);
    } catch (...) {
      if (!*error) *error = std::current_exception();
    }
  }
  lock.lock();
}

}  // namespace spill

#include "allocator/caching_allocator.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include "allocator/block_pool.hpp"
#include "allocator/oom_report.hpp"
#include "core/config.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"
#include "profiling/chrome_trace.hpp"
#include "profiling/events.hpp"

namespace spill {

using profiling::EventKind;
using profiling::TraceRecorder;

namespace {
constexpr std::size_t kSmallRound = 512;
constexpr std::size_t kSmallSegment = 2u << 20;
std::uintptr_t key(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }
std::uint64_t sid(Stream s) { return reinterpret_cast<std::uint64_t>(s); }
}  // namespace

AllocatorOptions AllocatorOptions::from_config(const Config& config) {
  AllocatorOptions o;
  o.budget = config.budget;
  o.oom_dump = config.oom_dump;
  return o;
}

struct CachingAllocator::Impl {
  Impl(Device& d) : small(&d, kSmallRound, true), large(&d, 0, false) {}
  mutable std::mutex mu;
  BlockPool small, large;
  AddressSet allocated;               // every allocated block, both pools
  std::vector<Segment*> segments;     // every segment (small segments, large blocks)
  std::size_t reserved = 0;           // mapped bytes, plus mappings in progress
  std::size_t swapped_out = 0;
  AllocatorStats stats;
  LargeBlockObserver* observer = nullptr;
  std::function<std::size_t()> host_in_use;

  Block* find_allocated(std::uintptr_t addr) {
    Block probe;
    probe.addr = addr;
    auto it = allocated.find(probe);
    return it == allocated.end() ? nullptr : &*it;
  }
  Block* find_containing(std::uintptr_t addr) {
    Block probe;
    probe.addr = addr;
    auto it = allocated.upper_bound(probe);
    if (it == allocated.begin()) return nullptr;
    --it;
    return addr < it->addr + it->size ? &*it : nullptr;
  }
};

CachingAllocator::CachingAllocator(Device& device, AllocatorOptions options)
    : dev_(device), impl_(std::make_unique<Impl>(device)) {
  const std::size_t total = device.info().total_bytes;
  const std::size_t g = device.granularity();
  if (options.budget) {
    SPILL_EXPECTS(*options.budget <= total,
                  "budget " + format_bytes(*options.budget) + " is larger than the device (" +
                      format_bytes(total) + ")");
    SPILL_EXPECTS(*options.budget >= g, "budget " + format_bytes(*options.budget) +
                                            " is below one granule (" + format_bytes(g) + ")");
    budget_ = *options.budget;
  } else {
    std::size_t free = device.mem_info().free;
    std::size_t reserve = std::min<std::size_t>(1ull << 30, total / 10);
    budget_ = free > reserve + g ? free - reserve : g;
  }
  oom_dump_ = options.oom_dump;
  small_limit_ = options.small_limit;
}

CachingAllocator::~CachingAllocator() {
  Impl& m = *impl_;
  try {
    dev_.synchronize();
  } catch (...) {
  }
  std::lock_guard lock(m.mu);
  m.allocated.clear();
  for (Segment* s : m.segments) {
    void* p = reinterpret_cast<void*>(s->addr);
    try {
      if (s->large) {
        if (s->first && s->first->backed) {
          dev_.unmap(p, s->size);
          dev_.release_physical(s->first->handle, s->size);
        }
        dev_.unreserve(p, s->size);
      } else {
        dev_.deallocate(p);
      }
    } catch (...) {
      // Teardown after a device error: nothing more to do for this segment.
    }
    delete s;
  }
}

void CachingAllocator::set_observer(LargeBlockObserver* observer) {
  std::lock_guard lock(impl_->mu);
  impl_->observer = observer;
}

void CachingAllocator::set_host_pinned_source(std::function<std::size_t()> in_use) {
  std::lock_guard lock(impl_->mu);
  impl_->host_in_use = std::move(in_use);
}

AllocatorStats CachingAllocator::stats() const {
  std::lock_guard lock(impl_->mu);
  AllocatorStats s = impl_->stats;
  s.swapped_out_bytes = impl_->swapped_out;
  return s;
}

void CachingAllocator::reset_peak() {
  std::lock_guard lock(impl_->mu);
  AllocatorStats& s = impl_->stats;
  for (Stat* st : {&s.allocated, &s.requested, &s.reserved, &s.cached, &s.host_pinned})
    st->reset_peak();
}

// ---- budget ladder

// Releases cached memory no queued work can still touch; when that is not enough, waits
// (without the lock) for the work that is, and tries again.
std::size_t CachingAllocator::release_cached_locked(std::unique_lock<std::mutex>& lock,
                                                    std::size_t want) {
  std::vector<Event> pending;
  std::size_t released = release_idle_locked(want, &pending);
  if (released < want && !pending.empty()) {
    lock.unlock();
    for (Event e : pending) dev_.synchronize(e);
    lock.lock();
    released += release_idle_locked(want - released, nullptr);
  }
  if (released) impl_->stats.cache_releases++;
  return released;
}

std::size_t CachingAllocator::release_idle_locked(std::size_t want, std::vector<Event>* pending) {
  Impl& m = *impl_;
  std::size_t released = 0;
  // Large cached blocks first (largest first), then wholly free small segments.
  for (Block* b : m.large.free_blocks_largest_first()) {
    if (released >= want) break;
    if (!m.large.idle(*b, pending)) continue;
    Segment* s = b->segment;
    PhysicalHandle h = b->handle;
    m.large.remove_free_segment(s);
    void* p = reinterpret_cast<void*>(s->addr);
    dev_.unmap(p, s->size);
    dev_.release_physical(h, s->size);
    dev_.unreserve(p, s->size);
    TraceRecorder::global().record(EventKind::Unmap, s->addr, s->size);
    released += s->size;
    forget_segment_locked(s);
  }
  for (Segment* s : m.small.free_segments()) {
    if (released >= want) break;
    if (!m.small.idle(*s->first, pending)) continue;
    m.small.remove_free_segment(s);
    dev_.deallocate(reinterpret_cast<void*>(s->addr));
    TraceRecorder::global().record(EventKind::Unmap, s->addr, s->size);
    released += s->size;
    forget_segment_locked(s);
  }
  return released;
}

void CachingAllocator::forget_segment_locked(Segment* s) {
  Impl& m = *impl_;
  m.reserved -= s->size;
  m.stats.reserved.sub(s->size);
  m.stats.cached.sub(s->size);
  m.stats.segment_unmaps++;
  m.segments.erase(std::find(m.segments.begin(), m.segments.end(), s));
  delete s;
}

void CachingAllocator::make_room(std::unique_lock<std::mutex>& lock, std::size_t bytes) {
  Impl& m = *impl_;
  if (bytes > budget_) throw_oom_locked(bytes, false);
  for (int strikes = 0; m.reserved + bytes > budget_;) {
    std::size_t short_by = m.reserved + bytes - budget_;
    if (release_cached_locked(lock, short_by) > 0) continue;
    // Give up only after many rounds without progress: with several threads under pressure,
    // the room one eviction frees may be taken by another thread first.
    if (m.observer == nullptr || strikes >= 64) throw_oom_locked(bytes, false);
    LargeBlockObserver* obs = m.observer;
    std::size_t before = m.reserved;
    m.stats.eviction_requests++;
    lock.unlock();
    std::size_t freed = obs->evict(short_by);
    lock.lock();
    if (freed > 0 || m.reserved < before) {
      strikes = 0;
    } else {
      ++strikes;
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      lock.lock();
    }
  }
  m.reserved += bytes;  // claimed; the caller maps it without the lock
}

void CachingAllocator::throw_oom_locked(std::size_t bytes, bool device_full) {
  Impl& m = *impl_;
  m.stats.ooms++;
  TraceRecorder::global().record(EventKind::Oom, 0, bytes);
  OomFacts f;
  f.requested = bytes;
  f.budget = budget_;
  f.device_total = dev_.info().total_bytes;
  f.allocated = static_cast<std::size_t>(m.stats.allocated.current) - m.swapped_out;
  f.cached = static_cast<std::size_t>(m.stats.cached.current);
  f.swapped_out = m.swapped_out;
  f.host_pinned = m.host_in_use ? m.host_in_use() : 0;
  f.largest_free = std::max(m.small.largest_free(), m.large.largest_free());
  f.free_total = m.small.free_bytes() + m.large.free_bytes();
  f.device_full = device_full;
  if (!oom_dump_.empty()) f.dump_note = write_oom_dump_locked();
  throw OutOfMemory(oom_message(f));
}

// ---- allocation

void* CachingAllocator::allocate(std::size_t bytes, Stream stream) {
  if (bytes == 0) return nullptr;
  return bytes <= small_limit_ ? allocate_small(bytes, stream) : allocate_large(bytes, stream);
}

void CachingAllocator::account_alloc_locked(Block* b, std::size_t bytes, Stream stream) {
  Impl& m = *impl_;
  b->requested = bytes;
  m.allocated.insert(*b);
  m.stats.allocated.add(b->size);
  m.stats.requested.add(bytes);
  m.stats.cached.sub(b->size);
  m.stats.allocations++;
  TraceRecorder::global().record(EventKind::Alloc, b->addr, b->size, sid(stream));
}

void* CachingAllocator::allocate_small(std::size_t bytes, Stream stream) {
  Impl& m = *impl_;
  const std::size_t size = (bytes + kSmallRound - 1) / kSmallRound * kSmallRound;
  std::unique_lock lock(m.mu);
  Block* b = m.small.take(size, stream);
  if (b != nullptr) {
    m.stats.cache_hits++;
  } else {
    make_room(lock, kSmallSegment);
    lock.unlock();
    void* p = nullptr;
    try {
      p = dev_.allocate(kSmallSegment);
    } catch (const OutOfMemory&) {
      lock.lock();
      m.reserved -= kSmallSegment;
      throw_oom_locked(size, true);
    }
    lock.lock();
    auto* seg = new Segment{key(p), kSmallSegment, nullptr, false};
    m.segments.push_back(seg);
    m.stats.reserved.add(kSmallSegment);
    m.stats.cached.add(kSmallSegment);
    m.stats.segment_maps++;
    TraceRecorder::global().record(EventKind::Map, seg->addr, seg->size);
    b = m.small.carve(m.small.add_segment(seg), size, stream);
  }
  account_alloc_locked(b, bytes, stream);
  return reinterpret_cast<void*>(b->addr);
}

void* CachingAllocator::allocate_large(std::size_t bytes, Stream stream) {
  Impl& m = *impl_;
  const std::size_t g = dev_.granularity();
  SPILL_EXPECTS(bytes <= SIZE_MAX - g, "allocate: " + std::to_string(bytes) + " bytes is absurd");
  const std::size_t size = (bytes + g - 1) / g * g;
  std::unique_lock lock(m.mu);
  Block* b = m.large.take(size, stream, size / 4);
  if (b != nullptr) {
    m.stats.cache_hits++;
  } else {
    // Mapping more would raise the reserved peak while cached blocks that no request fitted sit
    // idle: release those first. Below the peak, the cache is kept (no churn in steady state).
    const std::size_t peak = static_cast<std::size_t>(m.stats.reserved.peak);
    if (m.large.free_bytes() > 0 && m.reserved + size > peak) {
      if (release_idle_locked(m.reserved + size - peak, nullptr) > 0) m.stats.cache_releases++;
    }
    make_room(lock, size);
    lock.unlock();
    void* va = nullptr;
    PhysicalHandle h = 0;
    try {
      va = dev_.reserve(size);
      h = dev_.create_physical(size);
      dev_.map(va, size, h);
    } catch (const OutOfMemory&) {
      if (h) dev_.release_physical(h, size);
      if (va) dev_.unreserve(va, size);
      lock.lock();
      m.reserved -= size;
      throw_oom_locked(size, true);
    }
    lock.lock();
    auto* seg = new Segment{key(va), size, nullptr, true};
    m.segments.push_back(seg);
    m.stats.reserved.add(size);
    m.stats.cached.add(size);
    m.stats.segment_maps++;
    TraceRecorder::global().record(EventKind::Map, seg->addr, size);
    b = m.large.add_segment(seg);
    b->handle = h;
    b = m.large.carve(b, size, stream);
  }
  account_alloc_locked(b, bytes, stream);
  void* p = reinterpret_cast<void*>(b->addr);
  LargeBlockObserver* obs = m.observer;
  lock.unlock();
  if (obs) obs->on_large_alloc(p, size);
  return p;
}

// ---- free

void CachingAllocator::deallocate(void* ptr) { deallocate_impl(ptr, nullptr, false); }

void CachingAllocator::deallocate(void* ptr, Stream stream) { deallocate_impl(ptr, stream, true); }

void CachingAllocator::deallocate_impl(void* ptr, Stream stream, bool explicit_stream) {
  if (ptr == nullptr) return;
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  Block* b = m.find_allocated(key(ptr));
  if (b == nullptr) {
    bool inside_free = false;
    for (const BlockPool* pool : {&m.small, &m.large})
      for (const Block& f : pool->free_set())
        inside_free |= f.addr == key(ptr);
    SPILL_EXPECTS(false, inside_free
                             ? "free: " + format_address(ptr) + " is already free (double free)"
                             : "free: " + format_address(ptr) +
                                   " was not allocated by this allocator");
  }
  Stream s = explicit_stream ? stream : b->stream;
  if (b->segment->large && m.observer) {
    // The swapper drops its copies and makes `s` wait for any copy touching the block.
    LargeBlockObserver* obs = m.observer;
    lock.unlock();
    obs->on_large_free(ptr, s);
    lock.lock();
    b = m.find_allocated(key(ptr));
    SPILL_EXPECTS(b != nullptr, "free: " + format_address(ptr) + " was freed twice at once");
  }
  m.allocated.erase(m.allocated.iterator_to(*b));
  m.stats.allocated.sub(b->size);
  m.stats.requested.sub(b->requested);
  m.stats.frees++;
  TraceRecorder::global().record(EventKind::Free, b->addr, b->size, sid(s));
  if (b->segment->large && !b->backed) {
    // Swapped out: no physical memory to cache; give the addresses back.
    Segment* seg = b->segment;
    m.swapped_out -= b->size;
    b->allocated = false;
    m.large.recycle(b);
    seg->first = nullptr;
    dev_.unreserve(reinterpret_cast<void*>(seg->addr), seg->size);
    m.segments.erase(std::find(m.segments.begin(), m.segments.end(), seg));
    delete seg;
    return;
  }
  m.stats.cached.add(b->size);
  (b->segment->large ? m.large : m.small).give_back(b, s);
}

void CachingAllocator::record_stream(void* ptr, Stream stream) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  Block* b = m.find_containing(key(ptr));
  SPILL_EXPECTS(b != nullptr, "record_stream: " + format_address(ptr) +
                                  " is not an allocated block of this allocator");
  if (stream == b->stream) return;
  for (std::uint8_t i = 0; i < b->n_uses; ++i)
    if (b->uses[i].stream == stream) return;
  SPILL_EXPECTS(b->n_uses < b->uses.size(),
                "record_stream: " + format_address(ptr) + " is already used on " +
                    std::to_string(b->uses.size()) + " other streams");
  b->uses[b->n_uses++] = {stream, nullptr};
}

void CachingAllocator::forget_stream(Stream stream) {
  dev_.synchronize(stream);
  LargeBlockObserver* obs;
  {
    std::lock_guard lock(impl_->mu);
    impl_->small.forget_stream(stream);
    impl_->large.forget_stream(stream);
    obs = impl_->observer;
  }
  if (obs) obs->on_forget_stream(stream);
}

void CachingAllocator::empty_cache() {
  std::unique_lock lock(impl_->mu);
  release_cached_locked(lock, SIZE_MAX);
}

// ---- residency, for the swapper

std::optional<SwappableBlock> CachingAllocator::find_block(const void* ptr) {
  std::lock_guard lock(impl_->mu);
  Block* b = impl_->find_containing(key(ptr));
  if (b == nullptr || !b->segment->large) return std::nullopt;
  return SwappableBlock{reinterpret_cast<void*>(b->addr), b->size};
}

void CachingAllocator::unback(void* base, std::size_t size) {
  Impl& m = *impl_;
  PhysicalHandle h;
  {
    std::lock_guard lock(m.mu);
    Block* b = m.find_allocated(key(base));
    SPILL_EXPECTS(b && b->segment->large && b->backed && b->size == size,
                  "unback: " + format_address(base) + " is not a mapped large block");
    h = b->handle;
  }
  dev_.unmap(base, size);
  dev_.release_physical(h, size);
  std::lock_guard lock(m.mu);
  Block* b = m.find_allocated(key(base));
  b->backed = false;
  b->handle = 0;
  m.reserved -= size;
  m.swapped_out += size;
  m.stats.reserved.sub(size);
  m.stats.segment_unmaps++;
  TraceRecorder::global().record(EventKind::Unmap, key(base), size);
}

void CachingAllocator::reback(void* base, std::size_t size) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  {
    Block* b = m.find_allocated(key(base));
    SPILL_EXPECTS(b && b->segment->large && !b->backed && b->size == size,
                  "reback: " + format_address(base) + " is not a swapped-out large block");
  }
  make_room(lock, size);
  map_back(lock, base, size);
}

bool CachingAllocator::try_reback(void* base, std::size_t size) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  {
    Block* b = m.find_allocated(key(base));
    SPILL_EXPECTS(b && b->segment->large && !b->backed && b->size == size,
                  "reback: " + format_address(base) + " is not a swapped-out large block");
  }
  // Dead cached bytes may go (releasing them evicts nothing live); never wait, never evict.
  if (m.reserved + size > budget_ &&
      release_idle_locked(m.reserved + size - budget_, nullptr) > 0)
    m.stats.cache_releases++;
  if (m.reserved + size > budget_) return false;
  m.reserved += size;
  map_back(lock, base, size);
  return true;
}

// Maps fresh physical memory for bytes already claimed in `reserved`.
void CachingAllocator::map_back(std::unique_lock<std::mutex>& lock, void* base, std::size_t size) {
  Impl& m = *impl_;
  lock.unlock();
  PhysicalHandle h = 0;
  try {
    h = dev_.create_physical(size);
    dev_.map(base, size, h);
  } catch (const OutOfMemory&) {
    if (h) dev_.release_physical(h, size);
    lock.lock();
    m.reserved -= size;
    throw_oom_locked(size, true);
  }
  lock.lock();
  Block* b = m.find_allocated(key(base));
  b->backed = true;
  b->handle = h;
  m.swapped_out -= size;
  m.stats.reserved.add(size);
  m.stats.segment_maps++;
  TraceRecorder::global().record(EventKind::Map, key(base), size);
}

// ---- introspection

profiling::MemoryState CachingAllocator::snapshot() const {
  std::lock_guard lock(impl_->mu);
  return snapshot_locked();
}

profiling::MemoryState CachingAllocator::snapshot_locked() const {
  using S = profiling::SnapshotBlock::State;
  profiling::MemoryState st;
  st.device = dev_.info().ordinal;
  for (Segment* seg : impl_->segments) {
    profiling::SnapshotSegment out{seg->addr, seg->size, 0, seg->large, {}};
    for (Block* b = seg->first; b; b = b->next) {
      out.stream = sid(b->stream);
      out.blocks.push_back({b->addr, b->size, b->requested, b->allocated ? S::Allocated : S::Free,
                            0, b->segment->large && !b->backed});
    }
    st.segments.push_back(std::move(out));
  }
  std::sort(st.segments.begin(), st.segments.end(),
            [](auto& a, auto& b) { return a.address < b.address; });
  return st;
}

void CachingAllocator::check_invariants() const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  std::size_t mapped = 0, allocated = 0, cached = 0;
  std::uintptr_t prev_end = 0;
  std::vector<Segment*> segs = m.segments;
  std::sort(segs.begin(), segs.end(), [](Segment* a, Segment* b) { return a->addr < b->addr; });
  for (Segment* s : segs) {
    if (s->addr < prev_end) throw Error("invariant: segments overlap at " + std::to_string(s->addr));
    prev_end = s->addr + s->size;
    std::uintptr_t at = s->addr;
    for (Block* b = s->first; b; b = b->next) {
      if (b->addr != at) throw Error("invariant: gap or overlap inside a segment");
      if (b->segment != s) throw Error("invariant: block points at the wrong segment");
      if (b->next && b->next->prev != b) throw Error("invariant: broken neighbour links");
      if (!s->large && !b->allocated && b->next && !b->next->allocated)
        throw Error("invariant: two free neighbours were not coalesced");
      if (b->allocated != b->addr_hook.is_linked() || b->allocated == b->free_hook.is_linked())
        throw Error("invariant: a block is in the wrong set");
      (b->allocated ? allocated : cached) += b->size;
      if (b->backed) mapped += b->size;
      at += b->size;
    }
    if (at != s->addr + s->size) throw Error("invariant: blocks do not cover their segment");
  }
  if (mapped != m.reserved) throw Error("invariant: mapped bytes differ from the budget's count");
  if (static_cast<std::int64_t>(allocated) != m.stats.allocated.current ||
      static_cast<std::int64_t>(cached) != m.stats.cached.current ||
      static_cast<std::int64_t>(mapped) != m.stats.reserved.current)
    throw Error("invariant: stats differ from a recount");
  if (m.reserved > budget_) throw Error("invariant: over the budget");
}

std::string CachingAllocator::write_oom_dump_locked() {
  // A snapshot and the trace so far, written before the error is raised. A failure to write
  // must not hide the OOM itself: it is reported in the message instead.
  static std::atomic<int> counter{0};
  std::string stem = oom_dump_ + "/spill_oom_" + std::to_string(::getpid()) + "_" +
                     std::to_string(counter.fetch_add(1));
  try {
    std::filesystem::create_directories(oom_dump_);
    std::vector<profiling::TraceEvent> events = TraceRecorder::global().peek();
    profiling::write_snapshot(stem + "_snapshot.json", snapshot_locked(), events);
    profiling::write_chrome_trace(stem + "_trace.json", events);
    return " An OOM dump was written to " + stem + "_snapshot.json and " + stem + "_trace.json.";
  } catch (const std::exception& e) {
    return std::string(" (writing the OOM dump to ") + oom_dump_ + " failed: " + e.what() + ")";
  }
}

}  // namespace spill

// CachingAllocator's private state, shared by its source files (caching_allocator.cpp: allocate,
// free, the ladder; allocator_residency.cpp: the swapper's primitives; allocator_report.cpp:
// stats, snapshots, invariants, OOM reports). Everything here is guarded by `mu`.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <mutex>
#include <string>
#include <vector>

#include "allocator/block_pool.hpp"
#include "allocator/budget.hpp"
#include "allocator/caching_allocator.hpp"
#include "allocator/stats.hpp"
#include "profiling/events.hpp"

namespace spill {

inline constexpr std::size_t kSmallRound = 512;
// Retired ranges left mapped after their work is done, newest first, so that a gather or a
// split that maps the same chunks again takes one (allocator_large.cpp, take_view_locked).
inline constexpr std::size_t kKeptViews = 64;

inline std::uintptr_t key(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }
inline void* ptr_of(std::uintptr_t a) { return reinterpret_cast<void*>(a); }

// Maps `chunks` at `va` (each at its offset), after creating a fresh chunk of `fresh` bytes at
// offset `have` when `fresh` > 0 (appended to `chunks`). On failure it unmaps what it mapped,
// releases the fresh chunk and rethrows.
void map_chunks(Device& dev, std::uintptr_t va, std::vector<Chunk>& chunks, std::size_t have,
                std::size_t fresh);
inline std::uint64_t sid(Stream s) { return reinterpret_cast<std::uint64_t>(s); }

// A large block's old address range after its chunks were gathered into a new block (or split
// into two): still mapped (an alias of the new blocks' memory, no bytes of its own) until the
// work queued on it before the move has finished, then unmapped and unreserved; the newest
// kKeptViews of the finished ones stay mapped, for a gather or split of the same chunks to take
// again (take_view_locked), until the chunks are unmapped or released.
struct RetiredRange {
  std::uintptr_t addr = 0;
  std::size_t size = 0;
  std::vector<Chunk> chunks;  // the mappings still in place, offsets within [addr, addr+size)
  std::vector<Event> events;  // all complete: nothing can touch the range any more
  // The segments that hold one of its chunks now, each once (one after a gather, the parts
  // after a split); each counts this range in its `aliases`.
  std::vector<Segment*> owners;
  bool reaping = false;       // being unmapped (device calls unlocked)

  bool maps_chunks_of(const Segment* s) const {
    for (const Segment* o : owners)
      if (o == s) return true;
    return false;
  }
};

struct CachingAllocator::Impl {
  Impl(Device& d, const AllocatorOptions& o)
      : budget(d, o.budget),
        small(&d, kSmallRound, true),
        large(&d, 0, false, /*events_at_free=*/true),
        small_limit(o.small_limit),
        oom_dump(o.oom_dump),
        peak_guard(o.peak_guard),
        cache_takeover(o.cache_takeover),
        ordinal(d.info().ordinal),
        granularity(d.granularity()),
        small_mapped(kSmallSegment % granularity == 0) {}

  mutable std::mutex mu;
  Budget budget;                      // claimed = mapped bytes + mappings in progress
  BlockPool small, large;
  AddressSet allocated;               // every allocated block, both pools
  SegmentList segments;               // every segment (small segments, large blocks)
  std::size_t swapped_out = 0;        // allocated large blocks without physical memory
  std::size_t releasing = 0;          // cached bytes being returned to the device (unlocked)
  std::condition_variable released;   // signalled when a release or a reap finishes
  std::list<RetiredRange> retired;    // old ranges of gathered blocks, not yet unmapped
  AllocatorStats stats;
  LargeBlockObserver* observer = nullptr;
  HostPool* host_pool = nullptr;
  std::function<std::size_t()> host_in_use;

  const std::size_t small_limit;
  const std::string oom_dump;
  const PeakGuard peak_guard;
  const bool cache_takeover;
  const std::int32_t ordinal;
  const std::size_t granularity;
  // Small-pool segments are reserved, created and mapped as large segments are (one chunk each)
  // where the granularity divides them, else the device's plain allocations: on a GPU freeing
  // one of those is a cudaFree, which waits for all work on the device, swap copies in flight
  // included, while unmapping waits for nothing (an H200, 2026-12-04: VMM calls took 138 us
  // while another stream was busy).
  const bool small_mapped;

  void trace(profiling::EventKind kind, std::uintptr_t addr, std::size_t bytes,
             Stream stream = nullptr) const {
    profiling::TraceRecorder::global().record(kind, addr, bytes, sid(stream), ordinal);
  }
  Block* find_allocated(std::uintptr_t addr) {
    Block probe;
    probe.addr = addr;
    auto it = allocated.find(probe);
    return it == allocated.end() ? nullptr : &*it;
  }
  Block* find_containing(std::uintptr_t addr) const {
    Block probe;
    probe.addr = addr;
    auto it = allocated.upper_bound(probe);
    if (it == allocated.begin()) return nullptr;
    --it;
    return addr < it->addr + it->size ? const_cast<Block*>(&*it) : nullptr;
  }
  // Appends the events of retired ranges not yet being unmapped: those aliasing `owner`'s
  // chunks, or all of them (nullptr).
  void retired_events(const Segment* owner, std::vector<Event>* out) const {
    for (const RetiredRange& r : retired)
      if (!r.reaping && (owner == nullptr || r.maps_chunks_of(owner)))
        out->insert(out->end(), r.events.begin(), r.events.end());
  }
  Segment* new_segment(std::uintptr_t addr, std::size_t size, bool is_large) {
    auto* s = new Segment{addr, size, nullptr, is_large};
    segments.push_back(*s);
    return s;
  }
  void delete_segment(Segment* s) {
    segments.erase(segments.iterator_to(*s));
    delete s;
  }
};

}  // namespace spill

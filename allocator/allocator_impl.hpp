// CachingAllocator's private state, shared by its source files (caching_allocator.cpp: allocate,
// free, the ladder; allocator_residency.cpp: the swapper's primitives; allocator_report.cpp:
// stats, snapshots, invariants, OOM reports). Everything here is guarded by `mu`.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "allocator/block_pool.hpp"
#include "allocator/budget.hpp"
#include "allocator/caching_allocator.hpp"
#include "allocator/stats.hpp"
#include "profiling/events.hpp"

namespace spill {

// Retired ranges left mapped after their work is done, newest first, so that a gather or a
// split that maps the same chunks again takes one (allocator_large.cpp, take_view_locked).
inline constexpr std::size_t kKeptViews = 64;
// Address ranges kept reserved after their last mapping went, for the next segment of the
// same size (Impl::spare_ranges): at most this many (a step of GPT-2 medium's depth at a
// small width, on the CPU bridge at a third of its footprint, makes about 200 a step).
inline constexpr std::size_t kSpareRanges = 256;
// (size, address) of address ranges to unreserve.
using SpareRanges = std::vector<std::pair<std::size_t, std::uintptr_t>>;

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
      : budget(d, o.budget, o.small_limit > 0 ? kSmallSegment : 0),
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
  // Cached large blocks taken out of the pool by allocations that gather them, while those make
  // room for the rest: still cached (an out-of-memory report counts them so).
  std::vector<const std::vector<Block*>*> gathering;
  std::condition_variable released;   // signalled when a release or a reap finishes
  std::list<RetiredRange> retired;    // old ranges of gathered blocks, not yet unmapped
  // Reserved address ranges with nothing mapped in them, by size: a large segment that goes
  // (released from the cache, freed while swapped out, a retired range unmapped) leaves its
  // range here, and the next large segment of that size takes it instead of reserving one. A
  // training step makes the same sizes again, so under a budget most new segments find one:
  // a reserve and an unreserve fewer each (driver calls on a GPU, mmap calls on the simulated
  // device, where touching a kept range still faults as an unmapped address does).
  std::list<std::pair<std::size_t, std::uintptr_t>> spare_order;  // (size, address), oldest first
  std::multimap<std::size_t, std::list<std::pair<std::size_t, std::uintptr_t>>::iterator>
      spare_ranges;  // by size
  AllocatorStats stats;
  // Names of allocated blocks (set_block_name), by block address: only named blocks have an
  // entry (Block::named), so freeing an unnamed block does not look here.
  std::unordered_map<std::uintptr_t, std::string> names;
  LargeBlockObserver* observer = nullptr;
  HostPool* host_pool = nullptr;
  std::function<std::size_t()> host_in_use;

  const std::size_t small_limit;
  const std::string oom_dump;
  int oom_dumps = 0;  // written (or tried) so far: at most kMaxOomDumps
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
  // A spare range of exactly `size` bytes (no longer spare), or 0.
  std::uintptr_t take_spare_range(std::size_t size) {
    // The newest of that size: a range freed earlier in the step rather than one the step
    // before used (with the oldest first, the bridge's mixture of experts fetched 60 blocks on
    // demand in planned steps 2-5 against 15 with the newest, and with the host's mmap, which
    // reuses a freed range soon; not analysed: the allocator's choices follow addresses).
    auto [first, last] = spare_ranges.equal_range(size);
    if (first == last) return 0;
    auto it = std::prev(last);
    const std::uintptr_t addr = it->second->second;
    spare_order.erase(it->second);
    spare_ranges.erase(it);
    stats.ranges_reused++;
    return addr;
  }
  // Keeps a range with nothing mapped in it reserved as a spare; past kSpareRanges the oldest
  // spare goes to `drop`, for the caller to unreserve without the lock.
  void keep_spare_range(std::uintptr_t addr, std::size_t size, SpareRanges* drop) {
    spare_order.emplace_back(size, addr);
    spare_ranges.emplace(size, std::prev(spare_order.end()));
    if (spare_order.size() <= kSpareRanges) return;
    const auto oldest = spare_order.begin();
    auto [first, last] = spare_ranges.equal_range(oldest->first);
    for (auto it = first; it != last; ++it) {
      if (it->second == oldest) {
        spare_ranges.erase(it);
        break;
      }
    }
    drop->push_back(*oldest);
    spare_order.erase(oldest);
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

// CachingAllocator: what frameworks call instead of cudaMalloc.
//   small pool  requests up to 1 MiB (small_limit), rounded to 512 B, carved (split, coalesced)
//               from 2 MiB plain device segments;
//   large pool  bigger requests rounded to the VMM granularity; each block has its own reserved
//               range backed by its own physical chunks, so the swapper can unmap one block
//               alone; freed blocks stay mapped (cached) and are reused for requests at most
//               1/4 smaller. A request no cached block fits, whose fresh mapping would raise
//               the reserved peak or pass the budget, is gathered: cached blocks the stream may
//               use now give up their chunks, mapped into the new block's range next to one
//               fresh chunk for the rest (at most kMaxChunks chunks). Their old ranges stay
//               mapped, as aliases, until the work queued on them has finished (no host wait:
//               stream order keeps the old and new uses apart), the newest kKeptViews longer,
//               for a later gather or split of the same chunks to take as they are (no
//               device call: a pattern that repeats every step maps nothing). What is still
//               over the peak is released from the cache first (peak_guard: wait, idle or
//               off).
// Budget (allocator/budget.hpp): mapped physical bytes (small segments + mapped large blocks)
// never pass it. A request that would goes down the ladder: reuse a cached block; release cached
// memory no queued work can touch (dead bytes go before live tensors: this swaps the issue's
// last two rungs on purpose); ask the eviction hook (LargeBlockObserver::evict) for the rest;
// fail with an OutOfMemory that says where every byte is.
//
// Stream semantics: a block freed on stream S is reusable on S at once; on another stream only
// once every stream that used it (S, and those named by record_stream) has passed the free,
// judged by events recorded lazily and queried (never a host wait on this path). The caller must
// not touch a block after freeing it, and must call forget_stream before destroying a stream
// that used the allocator's blocks.
//
// Threads: any number may allocate and free at once. One plain mutex guards the pools; a cache
// hit takes it once and allocates nothing on the heap. The mutex is never held across an
// observer call (eviction hook, swapper notifications) or a device call that maps, unmaps or
// frees memory (see allocator/residency.hpp for the lock order).
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "allocator/residency.hpp"
#include "allocator/stats.hpp"
#include "core/config.hpp"
#include "core/errors.hpp"
#include "device/device.hpp"
#include "profiling/snapshot.hpp"

namespace spill {

// The small pool's segments: requests up to small_limit share segments of this size.
inline constexpr std::size_t kSmallSegment = std::size_t{2} << 20;
// The small pool rounds its requests to this.
inline constexpr std::size_t kSmallRound = 512;
// The small pool's largest request by default.
inline constexpr std::size_t kSmallLimit = std::size_t{1} << 20;

// The largest block a large request of `size` (rounded to the granule) may get: a cached block
// up to a quarter larger is reused (or split off) rather than more memory mapped.
inline constexpr std::size_t largest_reused_block(std::size_t size) { return size + size / 4; }

// The largest request the small pool serves under swap_threshold: 1 MiB, or the threshold when
// lower (blocks that may move must be large blocks).
inline std::size_t small_limit_for(std::size_t swap_threshold) {
  return swap_threshold < kSmallLimit ? swap_threshold : kSmallLimit;
}
// The smallest request whose block can move under swap_threshold, with large blocks rounded
// up to `granularity`: past the small pool, whose shared segments never move, and with a block
// of at least the threshold (the swapper's rule, on the block's rounded size). What an
// integration declares swappable (spill_stats.min_movable_bytes); the trainer and its planner
// apply it to rounded sizes.
inline std::size_t min_movable_request(std::size_t swap_threshold, std::size_t granularity) {
  const std::size_t past_small = small_limit_for(swap_threshold) + 1;
  // Requests above the largest multiple of the granule under the threshold round up to it.
  const std::size_t g = granularity > 0 ? granularity : 1;
  const std::size_t rounds_to_threshold = swap_threshold == 0 ? 1 : (swap_threshold - 1) / g * g + 1;
  return rounds_to_threshold > past_small ? rounds_to_threshold : past_small;
}

class HostPool;
struct Block;
struct Chunk;
struct Segment;

struct AllocatorOptions {
  std::optional<std::size_t> budget;   // default: free device memory less a reserve
  std::size_t small_limit = kSmallLimit;  // requests up to this go to the small pool
  // Directory for a snapshot + trace on OOM: the first kMaxOomDumps OOMs of the allocator are
  // dumped, later ones only counted (an OOM-retry loop would fill the disk).
  std::string oom_dump;
  static constexpr int kMaxOomDumps = 4;
  // Before a large miss maps memory that would raise the reserved peak: Wait gathers, then
  // releases cached blocks, waiting for the requesting stream's own queued work on them if it
  // must; Idle releases only what no queued work can touch (never waits); Off does neither
  // (the cache is kept until the budget runs short).
  PeakGuard peak_guard = PeakGuard::Wait;
  // Whether reback_from_cache may give a swapped-out block cached blocks' memory (else it
  // refuses, and a prefetch without room returns the cache first, waiting for its work).
  bool cache_takeover = true;

  // budget:, oom_dump:, peak_guard:, cache_takeover:, and swap_threshold: (when below 1 MiB,
  // the small pool's limit).
  static AllocatorOptions from_config(const Config& config);
};

// One allocated block as the allocator sees it (any pointer inside it finds it).
struct BlockInfo {
  void* base = nullptr;
  std::size_t size = 0;       // rounded size (what the budget and stats count)
  std::size_t requested = 0;  // bytes the caller asked for
  Stream stream = nullptr;    // allocation stream
  bool large = false;         // large pool: swappable, unmappable alone
  bool backed = true;         // large blocks: physical memory mapped (false: swapped out)
};

class CachingAllocator final : public ResidencyBackend {
 public:
  // Throws InvalidArgument for a budget above the device or below one granule.
  CachingAllocator(Device& device, AllocatorOptions options = {});
  ~CachingAllocator() override;
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // Returns nullptr for 0 bytes. Throws OutOfMemory (the message says where every byte is).
  void* allocate(std::size_t bytes, Stream stream = nullptr);
  // Frees on the allocation stream, or on `stream`. Throws InvalidArgument for a pointer this
  // allocator does not own, an interior pointer or a double free, leaving everything else intact.
  void deallocate(void* ptr);
  void deallocate(void* ptr, Stream stream);
  // The block is also used on `stream`: it is reused only when that use is done (at most four
  // streams besides the allocation stream; more is an InvalidArgument).
  void record_stream(void* ptr, Stream stream);
  // Call before destroying a stream that used the allocator's blocks: waits for it, then forgets
  // it here (blocks allocated on it count as allocated on the default stream) and in the
  // observer.
  void forget_stream(Stream stream);
  // Returns every cached (free) segment and block to the device, waiting for queued work that
  // may still touch them, and the attached host pool's chunks that hold no swapped-out bytes.
  void empty_cache();

  AllocatorStats stats() const;
  void reset_peak();
  // The peak of allocated bytes since the previous call (the first: since the allocator
  // began); the next such peak starts from the current value. reset_peak leaves it alone.
  std::uint64_t take_allocated_window_peak();
  std::size_t budget() const;
  // Changes the budget at run time. Raising it (up to the device) takes effect at once.
  // Lowering it below the mapped bytes first releases cached memory (waiting for queued work on
  // it), then asks the eviction hook for the rest; when the mapped bytes still do not fit, it
  // throws OutOfMemory naming what holds them and leaves the budget as it was. InvalidArgument
  // for a budget above the device or below one granule.
  void set_budget(std::size_t bytes);
  Device& device() { return dev_; }

  // The eviction hook and large-block notifications (the swapper); nullptr: none (no-op hook).
  void set_observer(LargeBlockObserver* observer);
  // The pool whose pinned bytes the stats (host_pinned) and OOM messages report. It must
  // outlive the allocator or be detached (nullptr) first.
  void set_host_pool(HostPool* pool);
  // For pinned host memory that is not a HostPool: a bare in-use figure for OOM messages.
  void set_host_pinned_source(std::function<std::size_t()> in_use);

  // The allocated block containing `ptr` (small or large), or nullopt.
  std::optional<BlockInfo> block_info(const void* ptr) const;

  // Names the allocated block that starts at `ptr` for snapshots and out-of-memory messages
  // (copied; "" clears it). The name goes with the block: freeing it drops the name, so a
  // later block at the address has none. Records a Name trace event (the name interned as its
  // tag; tag 0 when cleared). Returns the block's size. Throws InvalidArgument naming the
  // address when no allocated block starts there (an interior pointer names its block). The
  // caller checks the text (the C API caps and checks it as UTF-8). Costs nothing for
  // unnamed blocks: a free looks up a name only when the block has one.
  std::size_t set_block_name(const void* ptr, std::string_view name);
  // The name of the allocated block starting at `ptr`; "" when it has none or no allocated
  // block starts there (ResidencyBackend: the swapper's out-of-memory messages).
  std::string block_name(const void* ptr) override;

  // ResidencyBackend, for the swapper (see allocator/residency.hpp).
  std::optional<SwappableBlock> find_block(const void* ptr) override;
  bool owns(const void* ptr) override { return block_info(ptr).has_value(); }
  void unback(void* base, std::size_t size) override;
  void reback(void* base, std::size_t size) override;
  bool try_reback(void* base, std::size_t size) override;
  bool reback_from_cache(void* base, std::size_t size, Stream stream) override;
  bool cache_can_back(std::size_t size) override;
  std::size_t room() override;
  std::size_t mapped_bytes() override;
  std::size_t cached_bytes() override;
  std::size_t release_cache(std::size_t bytes) override;

  // Segments and blocks as they are now, for memory_viz snapshots.
  profiling::MemoryState snapshot() const;
  // Checks internal invariants (tests; call when no other thread is inside the allocator):
  // segments tile into blocks, free neighbours are coalesced, the pools' sets hold exactly the
  // free / allocated blocks, stats and the budget equal a recount. Throws Error naming the first
  // violation.
  void check_invariants() const;

  struct Impl;

 private:
  using Lock = std::unique_lock<std::mutex>;
  void* allocate_small(std::size_t bytes, Stream stream);
  void* allocate_large(std::size_t bytes, Stream stream);
  // A new large block of `size` bytes (no cached block fits): gathered and/or freshly mapped.
  Block* map_large(Lock& lock, std::size_t size, std::size_t requested, Stream stream);
  // Withdraws cached large blocks usable on `stream` whose sizes add up to at most `size`,
  // largest first; returns their total.
  std::size_t gather_locked(std::size_t size, Stream stream, std::vector<Block*>* out);
  // Releases cached large blocks for `over` bytes that a new mapping would add above the
  // reserved peak (as the peak_guard option says: idle ones only, or also waiting for
  // `stream`).
  void hold_peak(Lock& lock, std::size_t over, Stream stream);
  // Splits a cached block of several chunks usable on `stream` at its chunk boundaries: a part
  // of `size` bytes (up to a quarter more), returned allocated on `stream`, and the rest, cached.
  // Null when no cached block has such chunks.
  Block* split_cached(Lock& lock, std::size_t size, Stream stream);
  // The gathered or split block `g` ends; its range becomes a retired alias of the chunks that
  // `owners` map now.
  void retire_locked(Block* g, const std::vector<Segment*>& owners);
  // Unmaps retired ranges nothing can touch any more (`wait`: waits for them all first), but
  // the `keep` most recently retired of them (kept for take_view_locked).
  std::size_t reap_retired(Lock& lock, bool wait, std::size_t keep = 0);
  // A retired range nothing can touch any more that maps exactly `*chunks` (in any order):
  // taken out of the retired list for a new block (its mappings as they are), its address in
  // `*addr` and its layout in `*chunks`. False when there is none.
  bool take_view_locked(std::vector<Chunk>* chunks, std::uintptr_t* addr);
  // Gives back the address ranges in `ranges` ((size, address) pairs with nothing mapped)
  // with the lock dropped; the first error goes to `*error` unless one is there already.
  void unreserve_unlocked(Lock& lock,
                          const std::vector<std::pair<std::size_t, std::uintptr_t>>& ranges,
                          std::exception_ptr* error);
  // Waits until no retired range maps `seg`'s chunks (before they are unmapped or released).
  void settle_aliases(Lock& lock, Segment* seg);
  // Waits for `events` with the lock dropped. Events are recycled, never destroyed, while the
  // allocator lives: waiting on one that was re-recorded meanwhile only waits longer.
  void wait_unlocked(Lock& lock, const std::vector<Event>& events);
  void deallocate_impl(void* ptr, Stream stream, bool explicit_stream);
  void account_alloc_locked(Block* b, std::size_t bytes, Stream stream);
  void note_mapped_locked(Segment* s);
  [[noreturn]] void throw_bad_free_locked(void* ptr);
  // The ladder: makes room for `bytes` more mapped bytes and claims them in the budget (or
  // throws OutOfMemory for the caller's `requested` bytes).
  void make_room(Lock& lock, std::size_t bytes, std::size_t requested);
  // Releases up to `want` bytes of cached memory, waiting (unlocked) for queued work on it:
  // large cached blocks first, wholly free small-pool segments only for what those cannot
  // supply (where they are plain device memory, Impl::small_mapped, each is a cudaFree on a
  // GPU, which waits for all work on the device, the swap copies in flight included).
  std::size_t release_cached(Lock& lock, std::size_t want);
  // Releases cached memory no queued work can touch now (large blocks first; with `small`,
  // then wholly free small-pool segments); appends the events that hold back the rest to
  // `pending`. Device calls run without the lock.
  std::size_t release_idle(Lock& lock, std::size_t want, std::vector<Event>* pending,
                           bool small = true);
  void map_back(Lock& lock, void* base, std::size_t size);
  // Reserves, creates and maps a small-pool segment (Impl::small_mapped), unlocked; on failure
  // nothing is left mapped or reserved.
  void map_small_segment(void** addr, PhysicalHandle* handle);
  // `needed`: the mapped bytes the request needed (a new segment, or the rounded block).
  // `device_error`: why the device refused, when it did (device_full).
  [[noreturn]] void throw_oom_locked(
      std::size_t requested, std::size_t needed, bool device_full,
      std::optional<LargeBlockObserver::Unevictable> unevictable = std::nullopt,
      std::string device_error = {});
  // oom_dump: gathers a snapshot and the trace for the thread's OOM (written later by
  // finish_oom_dump), or says why none is written this time.
  std::string gather_oom_dump_locked();
  bool try_reback_unchecked(void* base, std::size_t size);  // try_reback, without the dump
  // In a public call's handler for an OOM, the allocator's lock released: writes the dump
  // gathered for it, if any, and throws the OOM again with a sentence saying where; else
  // returns (the caller rethrows).
  void finish_oom_dump(const OutOfMemory& oom);
  profiling::MemoryState snapshot_locked() const;

  Device& dev_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace spill

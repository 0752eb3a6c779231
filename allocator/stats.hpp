// Allocator statistics: a Stat{current, peak, allocated, freed} per kind of memory, and event
// counters. Plain structs updated under the allocator's mutex and copied out whole; separable
// from the allocator (the host pool keeps its own Stat, copied in by CachingAllocator::stats).
#pragma once

#include <cstdint>
#include <string>

namespace spill {

struct Stat {
  std::int64_t current = 0;
  std::int64_t peak = 0;
  std::uint64_t allocated = 0;  // total ever added
  std::uint64_t freed = 0;      // total ever removed
  // A second peak for an integration's own intervals (take_window_peak), apart from `peak`,
  // which reset_peak restarts for the user (PyTorch's max_memory_allocated).
  std::int64_t window_peak = 0;

  void add(std::uint64_t n) {
    current += static_cast<std::int64_t>(n);
    allocated += n;
    if (current > peak) peak = current;
    if (current > window_peak) window_peak = current;
  }
  void sub(std::uint64_t n) {
    current -= static_cast<std::int64_t>(n);
    freed += n;
  }
  void reset_peak() { peak = current; }
  // The window's peak so far; the next window starts from the current value.
  std::int64_t take_window_peak() {
    const std::int64_t p = window_peak;
    window_peak = current;
    return p;
  }
};

struct AllocatorStats {
  Stat allocated;    // bytes handed out (rounded sizes)
  Stat requested;    // bytes asked for
  Stat reserved;     // mapped physical device bytes (what the budget limits)
  Stat cached;       // mapped but free, ready for reuse
  Stat host_pinned;  // pinned host memory held by the attached HostPool (set_host_pool)
  std::uint64_t allocations = 0, frees = 0;
  std::uint64_t segment_maps = 0, segment_unmaps = 0;
  std::uint64_t plain_frees = 0;         // small-pool segments given back to the device
                                         // (unmapped; a cudaFree where they are plain memory)
  std::uint64_t cache_hits = 0;          // ladder step 1: a cached block was reused
  std::uint64_t gathers = 0;             // large blocks built from cached blocks' chunks
  std::uint64_t splits = 0;              // cached gathered blocks split at chunk boundaries
  std::uint64_t views_reused = 0;        // gathered or split blocks that took a retired range
                                         // already mapping their chunks (no device call)
  std::uint64_t ranges_reused = 0;       // new large segments placed in an address range kept
                                         // reserved from one that went (no reserve call)
  std::uint64_t cache_releases = 0;      // ladder step 2: cached memory was released
  std::uint64_t cache_takeovers = 0;     // swapped-out blocks mapped back onto a cached block's
                                         // memory (reback_from_cache)
  std::uint64_t eviction_requests = 0;   // ladder step 3: the eviction hook was asked
  // Times the host waited for queued work to pass freed blocks before releasing or unmapping
  // them (a wait drains the GPU's queue up to those frees), and the host's seconds in them.
  std::uint64_t host_waits = 0;
  double host_wait_s = 0;
  std::uint64_t ooms = 0;
  std::uint64_t swapped_out_bytes = 0;   // allocated large blocks the swapper has unbacked

  std::string to_string() const;
};

}  // namespace spill

// Memory counters derived from trace events, so every exporter and report agrees on them:
// allocated (Alloc/Free), mapped (Map/Unmap), on_host (an Evict or SwapOut adds a block once;
// its SwapIn, its Free, a Map at its address (mapped back: an untouched block's swap-in copies
// nothing) or a Pin of it (its swap-out was cancelled) removes it; a SwapOut sorted after the
// block's Free adds nothing; a SwapIn of a block the replay never saw leave removes its bytes,
// as it was on the host before the trace began, and so does a FreeOnHost, the host copy of a block
// freed there; a SwapIn slice that comes late, on the device's clock, after its block was
// evicted again or freed (its address perhaps reused), is its map back's and changes nothing)
// and host_pinned (HostAlloc/HostFree). A replay
// may start from a baseline: the counters when the trace's first event happened.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <unordered_set>

#include "profiling/events.hpp"

namespace spill::profiling {

struct MemoryCounters {
  std::int64_t allocated = 0;
  std::int64_t mapped = 0;
  std::int64_t on_host = 0;
  std::int64_t host_pinned = 0;
  bool operator==(const MemoryCounters&) const = default;
};

// Swap copies and stalls counted over a span of a trace (the report's summary, each step).
struct SwapTally {
  std::uint64_t swapped_out_bytes = 0, swapped_in_bytes = 0;
  std::size_t swap_outs = 0, swap_ins = 0, stalls = 0;
  // The time some stall covered: the union of the stalls' slices, so that two stalls of one
  // wait on two rows count once (a demand fetch's stall on its stream and the host's wait for
  // room inside it: summed, a step stalled for longer than it lasted; audit 41b #1).
  double stall_ms = 0;
  // Counts `e` when it is a swap copy or a stall; events come in order of their start (as a
  // parsed trace holds them). Throws InvalidArgument naming `what` when a byte total would
  // pass 2^64 - 1.
  void count(const TraceEvent& e, const char* what);

 private:
  std::uint64_t stalled_until_ns_ = 0;  // the latest end of a stall counted
};

class CounterReplay {
 public:
  explicit CounterReplay(const MemoryCounters& baseline = {}) : current_(baseline), peak_(baseline) {}
  // Applies one event; returns true when a counter changed. Throws InvalidArgument (and
  // changes nothing) when an event's bytes pass 2^63 - 1 or a counter would leave the int64
  // range: what a trace from elsewhere can hold, never what spill records.
  bool apply(const TraceEvent& e);
  const MemoryCounters& current() const { return current_; }
  const MemoryCounters& peak() const { return peak_; }

 private:
  MemoryCounters current_, peak_;
  struct OnHost {
    std::uint64_t bytes = 0;
    // Put on the host while mapped, and not unmapped since: an eviction decided on the host
    // while a swap-in copy of the block's mapping before it was still to run (the copy's slice
    // starts on the device's clock, after the eviction's mark). That late swap_in was counted
    // by the map and does not take the evicted bytes off the host again.
    bool while_mapped = false;
  };
  std::unordered_map<std::uint64_t, OnHost> on_host_;  // address -> bytes
  std::unordered_set<std::uint64_t> mapped_;  // addresses mapped on their own (Map .. Unmap)
  // Blocks freed while on the device. A swap-out slice starts at its copy, which on the
  // simulated clock can sort after a free issued by the host meanwhile: such a swap-out never
  // put bytes on the host for this block's life, so it is not counted.
  std::unordered_set<std::uint64_t> freed_;
  // Blocks that left the host by a map back (true: a swap_in may follow) or a pin (a cancelled
  // eviction): their swap_in, or the late slice of the cancelled copy, changes nothing.
  std::unordered_map<std::uint64_t, bool> back_;
  // Addresses of blocks freed while their map back's swap_in could still come: with the host
  // ahead of the device, a block mapped back, used, freed and its address given to a new block
  // before the copy ran, whose slice (on the device's clock) comes after all that. The next
  // swap_in at the address is that copy's (a new block's own comes after its own map back).
  std::unordered_set<std::uint64_t> pending_in_;
};

}  // namespace spill::profiling

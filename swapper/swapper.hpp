// The swapper: residence of large blocks. A block is Resident (physical memory mapped),
// SwappingOut (copy to host in flight; device bytes still valid), OnHost (unmapped, bytes in a
// pinned host buffer) or SwappingIn (mapped again, copy back in flight). Addresses never
// change: swapping unmaps and remaps physical memory behind the same range.
//
// Protocol (thread-safe; one mutex, never held across reback or a host wait):
//   pin(ptr, s)    work on stream s will use the block containing ptr (interior pointers and
//                  nested pins are fine). If it is not resident it is mapped and copied back,
//                  and s waits on the copy's event: no host synchronisation.
//   unpin(ptr, s, wrote)  that work is enqueued; an event recorded on s marks the end of the
//                  use. wrote=false keeps a valid host copy valid (a later eviction is free).
//   prefetch(ptr) / evict(ptr)  hints: start a swap-in / swap-out now, asynchronously.
//   evict_bytes(n) the allocator's eviction hook: free at least n mapped bytes now (may wait
//                  on copies). Never a pinned block. Victims by next use in the recorded step
//                  (Belady) when a plan is active, else least recently used; clean blocks
//                  (unchanged since their host copy) are preferred and cost no copy.
//   track(base, size) the allocator made a new block (optional: blocks are also found at
//                  their first pin); untouched blocks move without copies.
//   release(base, s) the allocator is freeing the block on stream s: immediate for the caller
//                  wherever the bytes are; s waits on any copy still writing the memory.
// Steps: pins are grouped into ops (an op starts at the first pin after an unpin, or at
// begin_op). With policy plan, the first step after begin_step() is recorded; end_step()
// turns it into a graph::Trace and a plan; later steps execute the plan's prefetches and
// evictions, adapting the look-ahead when prefetches arrive late, and fall back to reactive
// eviction (and re-record) when the step deviates from the trace.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

#include "core/config.hpp"
#include "core/link_model.hpp"
#include "device/device.hpp"
#include "graph/trace.hpp"
#include "swapper/residency.hpp"

namespace spill {

enum class Residence { Resident, SwappingOut, OnHost, SwappingIn };
const char* to_string(Residence r);

struct SwapperOptions {
  SwapPolicy policy = SwapPolicy::Plan;
  std::size_t chunk_bytes = 16u << 20;  // copies move in chunks of this size (pipelining)
  std::uint64_t budget = 0;             // for planning (the allocator's budget)
  LinkModel link = link_preset("pcie4");  // for planning
  std::size_t min_swap_bytes = 1u << 20;  // blocks below this are never planned to move
};

struct SwapStats {
  std::uint64_t bytes_out = 0, bytes_in = 0;    // copied each way
  std::uint64_t swap_outs = 0, swap_ins = 0;    // copies each way
  std::uint64_t clean_evictions = 0;            // evicted with no copy (host copy valid)
  std::uint64_t prefetches = 0;                 // swap-ins started by a hint or the plan
  std::uint64_t prefetches_skipped = 0;         // no free room: left for later or on demand
  std::uint64_t prefetch_hits = 0;              // pinned after the prefetch had landed
  std::uint64_t prefetch_late = 0;              // pinned while the prefetch was in flight
  std::uint64_t demand_fetches = 0;             // pinned while on the host (a miss)
  std::uint64_t evictions_reactive = 0;         // victims chosen by the eviction hook
  std::uint64_t evictions_planned = 0;          // evictions by hint or plan
  double host_wait_s = 0;                       // host time spent waiting for swap-outs
  std::uint64_t host_bytes = 0;                 // pinned host memory held now
  std::uint64_t resident_bytes = 0, on_host_bytes = 0;  // tracked blocks, now
  std::uint64_t steps_recorded = 0, steps_planned = 0, deviations = 0;
};

class Swapper {
 public:
  Swapper(Device& device, ResidencyBackend& backend, HostMemory& host, SwapperOptions options);
  ~Swapper();
  Swapper(const Swapper&) = delete;
  Swapper& operator=(const Swapper&) = delete;

  void pin(const void* ptr, Stream stream);
  void unpin(const void* ptr, Stream stream, bool wrote = true);
  void prefetch(const void* ptr);
  void evict(const void* ptr);
  std::size_t evict_bytes(std::size_t needed);
  void release(void* base, Stream stream);
  // The allocator hands out a new swappable block: it can be evicted before it is ever used,
  // at no cost (its bytes are undefined until written).
  void track(void* base, std::size_t size);
  // `stream` is about to be destroyed: waits for it and forgets it as a user of any block
  // (swap-outs record their wait events on the streams that used a block).
  void forget_stream(Stream stream);

  void begin_op(std::string_view name = {});
  void begin_step();
  void end_step();

  Residence residence(const void* ptr) const;
  SwapStats stats() const;
  // The last recorded step (empty before the first end_step with policy plan).
  graph::Trace last_trace() const;
  // Waits for every copy in flight and completes them (tests and shutdown).
  void quiesce();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace spill

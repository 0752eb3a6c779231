// The swapper: residence of large blocks. A block is Resident (physical memory mapped),
// SwappingOut (copy to host in flight; device bytes still valid), OnHost (unmapped, bytes in a
// pinned host buffer) or SwappingIn (mapped again, copy back in flight). Addresses never
// change: swapping unmaps and remaps physical memory behind the same range.
//
// Protocol (thread-safe; one mutex, never held across reback or a host wait):
//   pin(ptr, s)    work on stream s will use the block containing ptr (interior pointers and
//                  nested pins are fine). If it is not resident it is mapped and copied back,
//                  and s waits on the copy's event: no host synchronisation. Returns a token.
//   pin_for_host(ptr)  the same for the host: returns once the bytes may be touched by host
//                  code (the block is resident and no copy of spill's touches it).
//   unpin(token, s, wrote)  that work is enqueued; s is remembered as a user of the block (a
//                  swap-out waits for it). wrote=false keeps a valid host copy valid (a later
//                  eviction is free). A token whose block was freed meanwhile (its address
//                  perhaps reused by a new block) is a harmless no-op, counted as stale.
//   unpin(ptr, s, wrote)  the same by pointer (an error when the block is not pinned), in the
//                  calling thread's current scope.
//   prefetch(ptr) / evict(ptr)  hints: start a swap-in / swap-out now, asynchronously.
//   evict_bytes(n) the allocator's eviction hook: free at least n mapped bytes now (may wait
//                  on copies). Victims by next use in the recorded step (Belady) when a plan is
//                  active, else least recently used; clean blocks (unchanged since their host
//                  copy) are preferred and cost no copy.
//   track(base, size, s) the allocator made a new block on stream s (blocks are also found at
//                  their first pin); release(base, s) it is freeing one on stream s: immediate
//                  for the caller wherever the bytes are; s waits on any copy still writing it.
//
// Residency rules (what lets a framework whose code also touches blocks outside the hooks use
// the swapper safely):
//   - Only a swappable, unpinned block is ever evicted. With opt_in (the C API's mode:
//     frameworks allocate buffers no hook ever sees in use, and write blocks before any hook
//     sees them), a block is swappable only after set_swappable(ptr, true), which promises that
//     every later use is pinned: a fresh block is protected until its declaration. Without
//     opt_in (C++ callers that pin every use, the first write included), every tracked block is
//     swappable from birth.
//   - A fresh block's allocation counts as a use by the allocating stream, so a swap-out orders
//     after the work its producer enqueued there.
//   - No silent data loss: an eviction skips the copy only when the host copy is known to be
//     current (every write since it was made was bracketed by pin/unpin(wrote)); declaring a
//     block swappable makes it dirty. Only without opt_in, where writes are pinned by
//     contract, may a block never written since its allocation move with no copy.
//   - Pins and unpins of blocks that never move (the allocator's small pool) are no-ops with
//     an empty token; a pointer no block contains is an InvalidArgument naming it. Pins of
//     undeclared large blocks are real (cheap, no copy): a declaration while one is in flight
//     stays safe.
//   - Freeing a pinned block (stream-ordered frees of blocks an op still uses) is normal.
// Steps belong to a scope (a caller-chosen number; 0 by default), so that two training loops
// in one process do not disturb each other's recordings. begin_step(scope) and
// begin_op(name, scope) make `scope` the calling thread's current scope on this swapper; a pin
// belongs to the current scope of the thread that makes it, and its unpin to the same scope
// (the token's), whichever thread's pins come in between: a thread that reads the blocks of
// a training loop from another scope (a checkpoint or logging thread, scope 0 when it never
// named one) neither enters nor splits the loop's recorded ops. Within a scope, pins are grouped
// into ops (an op starts at the first pin after an unpin, or at begin_op). With policy plan,
// the first step after begin_step() is recorded; end_step() turns it into a graph::Trace and a
// plan; later steps execute the plan's prefetches and evictions, adapting the look-ahead when
// prefetches arrive late, and fall back to reactive eviction (and re-record) when the step
// deviates from the trace. end_scope(scope) drops a scope's recordings and plan once its user
// is done with it (a scope's state is otherwise kept for the swapper's life).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
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
  // Opt-in swappability: a block may be evicted only once set_swappable(ptr, true) declared
  // that every later use of it is pinned. Off: every tracked block is swappable.
  bool opt_in = false;
};

// What pin returns and unpin takes: which life of which block was pinned, and in which step
// scope. An empty token (block 0) comes from a block that never moves; unpinning it does
// nothing. A token made without a scope (the C API's spill_pin_token has no room for one)
// unpins in the current scope of the thread that unpins.
struct PinToken {
  std::uintptr_t block = 0;      // the block's base address
  std::uint64_t generation = 0;  // distinguishes blocks that reuse one address
  bool host = false;             // from pin_for_host: unpin ignores its stream
  std::optional<std::uint64_t> scope;  // the pinning thread's current scope
  // This pin's id among the block's pins (0: not told apart from them, checked by count):
  // unpinning a token twice is an error even while other pins hold the block.
  std::uint64_t pin = 0;
  explicit operator bool() const { return block != 0; }
};

struct SwapStats {
  std::uint64_t bytes_out = 0, bytes_in = 0;    // copied each way
  std::uint64_t swap_outs = 0, swap_ins = 0;    // copies each way
  std::uint64_t clean_evictions = 0;            // evicted with no copy (host copy valid)
  std::uint64_t prefetches = 0;                 // swap-ins started by a hint or the plan
  std::uint64_t prefetches_skipped = 0;         // tries that found no free room (retried)
  std::uint64_t prefetch_hits = 0;              // pinned after the prefetch had landed
  std::uint64_t prefetch_late = 0;              // pinned while the prefetch was in flight
  std::uint64_t demand_fetches = 0;             // pinned while on the host (a miss)
  std::uint64_t evictions_reactive = 0;         // victims chosen by the eviction hook
  std::uint64_t evictions_planned = 0;          // evictions by hint or plan
  double host_wait_s = 0;                       // host time spent waiting for swap-outs
  // Time the host waited on swaps (pin_for_host for swap-ins and cancelled swap-outs, the
  // eviction hook for swap-outs) on the trace's clock: simulated time on SimDevice (the link
  // model's), the host's steady clock elsewhere. A pin_for_host of a block on the host (a
  // demand fetch) counts the clock's whole advance from the pin until its bytes have landed,
  // however the host learned that they had (a wait, or a query finding the copy done).
  // host_wait_s is the swap-out part in wall time.
  double stall_s = 0;
  std::uint64_t host_bytes = 0;                 // pinned host memory held now
  std::uint64_t resident_bytes = 0, on_host_bytes = 0;  // tracked blocks, now
  // Blocks evicted whose copy has not completed (still mapped, counted in resident_bytes):
  // with the allocator's swapped_out_bytes, the bytes a trace counts on the host.
  std::uint64_t swapping_out_bytes = 0;
  std::uint64_t steps_recorded = 0, steps_planned = 0, deviations = 0;
  // Steps that left their plan at some access (each counted in deviations) and followed it
  // again after (skipping the plan's ops the step did not have, or serving its own extra ops
  // reactively) to the step's end.
  std::uint64_t steps_resynced = 0;
  std::uint64_t stale_unpins = 0;   // unpins whose block was freed meanwhile (ignored)
  // Prefetches that returned the allocator's cache to find room the plan had timed
  // (Swapper::prefetch with wait_for_room, planned prefetches on a stream).
  std::uint64_t cache_returns = 0;
  // Tracked blocks now, by what keeps them from being evicted (a block may count twice).
  std::uint64_t pinned_bytes = 0, unswappable_bytes = 0;
};

// The counters accumulated from `before` to `now` (copies, evictions, prefetches, waits: what
// one step did); gauges (bytes held now) and step counts keep `now`'s values.
SwapStats swaps_since(const SwapStats& now, const SwapStats& before);
// Adds `more`'s counters (those swaps_since takes differences of) to `total`'s; gauges and step
// counts stay `total`'s.
void add_swaps(SwapStats& total, const SwapStats& more);

class Swapper {
 public:
  Swapper(Device& device, ResidencyBackend& backend, HostMemory& host, SwapperOptions options);
  ~Swapper();
  Swapper(const Swapper&) = delete;
  Swapper& operator=(const Swapper&) = delete;

  PinToken pin(const void* ptr, Stream stream);
  PinToken pin_for_host(const void* ptr);
  void unpin(const void* ptr, Stream stream, bool wrote = true);
  void unpin(const PinToken& token, Stream stream, bool wrote = true);
  // Starts bringing a block on the host back, into free budget only (it never evicts). With
  // `wait_for_room`, when the budget is short it returns the allocator's cache, waiting for the
  // work queued on it (a plan counts a freed block gone at its op; counted in cache_returns),
  // then waits (on the host) for swap-outs already in flight to free the room it still lacks,
  // as a plan that timed them expects; else it gives up (counted in prefetches_skipped).
  void prefetch(const void* ptr, bool wait_for_room = false);
  // A no-op for a pinned, protected or unswappable block, and one under min_swap_bytes.
  void evict(const void* ptr);
  // The block's bytes are dead: its caller is about to overwrite all of them (zeroing a
  // gradient in place). One on the host then comes back with no copy (its bytes undefined
  // until written); a resident one is untouched. A no-op for blocks that never move.
  void discard(const void* ptr);
  std::size_t evict_bytes(std::size_t needed);
  void release(void* base, Stream stream);
  // Declares whether the block containing ptr may be evicted (see the rules above). Declaring
  // it unswappable brings it back first if it is on the host and returns once it is resident.
  void set_swappable(const void* ptr, bool swappable);
  // The block is also used by work on `stream`: a swap-out waits for that stream too.
  void record_stream(const void* ptr, Stream stream);
  // The allocator hands out a new block on `stream` (see the rules above).
  // `request`: the allocation's request rounded to the granule (0: `size`), which a reused
  // cached block may exceed; a step whose blocks come from larger requests than its plan's
  // makes the plan again at their sizes (docs/architecture.md, "Steps and plans").
  void track(void* base, std::size_t size, Stream stream = nullptr, std::size_t request = 0);
  // `stream` is about to be destroyed: waits for it and forgets it as a user of any block
  // (swap-outs record their wait events on the streams that used a block).
  void forget_stream(Stream stream);

  // Steps of the calling thread's current scope (0 unless set), or of `scope` (which becomes
  // the thread's current scope on this swapper).
  void begin_op(std::string_view name = {});
  void begin_op(std::string_view name, std::uint64_t scope);
  void begin_step();
  void begin_step(std::uint64_t scope);
  void end_step();
  void end_step(std::uint64_t scope);
  // Says which variant of the scope's steps the step begun is, by a key of the caller's (a
  // hash of the batch's shapes). A scope keeps the plan of each variant whose steps differ in
  // their blocks (up to StepState::kPlanVariants), by the keys of the steps that ended on it;
  // a step whose key another plan has than the one it would follow switches to that plan, if
  // no pin of the step came yet (after one, the key only goes with the plan the step ends on).
  // Steps without a key, or all of one key, follow one plan as before. Unlike the other step
  // calls, it leaves the calling thread's current scope as it is.
  void set_step_key(std::uint64_t scope, std::uint64_t key);
  // Names `scope` for traces and reports (e.g. the model it trains): a ScopeName event now and
  // before each of its steps' marks; "" clears it. Naming again replaces it; end_scope drops
  // it. Touches no step state and not the calling thread's current scope.
  void set_scope_name(std::uint64_t scope, std::string_view name);
  // The scope's name ("" for none).
  std::string scope_name(std::uint64_t scope) const;
  // Makes `scope` the calling thread's current scope on this swapper, touching no step state
  // (a thread joining a step another began: begin_op would also stop ops starting at pins).
  void set_scope(std::uint64_t scope);
  // Drops everything held for `scope` (its recordings and plan); returns false when the
  // swapper holds nothing for it (never begun, or already ended). A step of the scope in
  // progress is abandoned first: not recorded, not counted, no plan made from it; copies it
  // started finish as usual. Pins made later in the scope (a thread whose current scope it
  // still is) touch no step state until begin_step or begin_op names it again, which starts
  // it afresh (recorded again). Safe to call from any thread, like the other step calls.
  bool end_scope(std::uint64_t scope);

  // The budget the plans are made for changed: recordings start again at the next step.
  void set_budget(std::uint64_t bytes);

  // Where the block's bytes are. A swap-out whose copy has finished still reads SwappingOut
  // (its device memory mapped) until spill next needs room or runs a step's op: the trainer's
  // executor cancels such a swap-out instead of copying the block back.
  Residence residence(const void* ptr) const;
  // residence(), after completing the block's swap-out when its copy has finished (its device
  // memory goes back now): what spill_get_residence answers, so that a block evicted between
  // steps settles on the host for a caller who looks.
  Residence settle(const void* ptr);
  // Which life of its address the tracked block containing `ptr` is in (the generation a pin
  // token carries), without pinning it, so without an access of the step; 0 when no tracked
  // block contains it (memory that never moves). A caller that keeps an address across
  // blocks' lives tells a new block there from the one it knew.
  std::uint64_t generation(const void* ptr) const;
  // Completes every swap-out whose copy has finished (their device memory goes back now);
  // the bytes given back. spill_evict calls it, after starting its own copy.
  std::size_t reap();
  // reap(), after waiting for the copies of blocks freed while one was in flight: their host
  // buffers, freed only once those copies are done, go back to the host pool now (what
  // spill_empty_cache does before the pool returns its empty chunks).
  void reap_freed();
  bool swappable(const void* ptr) const;  // false for blocks that never move
  // What spill_get_block_info reports of the tracked block containing `ptr`, read under one
  // lock; nullopt when no tracked block contains it (memory that never moves).
  struct BlockUse {
    Residence residence = Residence::Resident;
    bool swappable = false;
    int pins = 0;  // open pins, the swapper's own brief holds (a copy's) included
    std::uint64_t generation = 0;
  };
  std::optional<BlockUse> use_of(const void* ptr) const;
  SwapStats stats() const;
  // Which resident tracked blocks cannot be evicted now and why (pinned, not declared
  // swappable), with the first few addresses: for error messages.
  std::string residency_report() const;
  // The resident (or arriving) bytes of those blocks, by reason: for out-of-memory messages.
  LargeBlockObserver::Unevictable unevictable() const;
  // The last recorded step of any scope, or of `scope` (empty before the first end_step that
  // recorded, with policy plan).
  graph::Trace last_trace() const;
  graph::Trace last_trace(std::uint64_t scope) const;
  // Waits for every copy in flight and completes them (tests and shutdown).
  void quiesce();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace spill

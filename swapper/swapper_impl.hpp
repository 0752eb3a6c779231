// Internal state of the Swapper, shared by its translation units: swapper.cpp (protocol),
// eviction.cpp (victims, swap-out completion, the eviction hook) and step.cpp (recording a
// step and executing its plan). Every *_locked function requires `mu` held.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "graph/plan.hpp"
#include "swapper/swapper.hpp"

namespace spill {

struct SwapBlock {
  void* base = nullptr;
  std::size_t size = 0;
  // What the allocation asked for, rounded to the granule: `size` may be up to a quarter more
  // (a reused cached block). The same code allocates the same requests each step.
  std::size_t request = 0;
  Residence state = Residence::Resident;
  int pins = 0;
  // The ids of up to kTrackedPins of its pins not yet unpinned (0: a free slot), so that a
  // token unpinned twice is refused even while other pins hold the block; pins beyond them
  // (and the swapper's own short holds) are counted in `pins` alone.
  static constexpr std::size_t kTrackedPins = 4;
  std::array<std::uint64_t, kTrackedPins> pin_ids{};
  // The latest pin id given out before this life of the block began: its own pins' ids are
  // above it, so a token with an id at or below it was never a pin of this block.
  std::uint64_t pins_after = 0;
  int tracked_pins() const {
    return static_cast<int>(kTrackedPins -
                            std::count(pin_ids.begin(), pin_ids.end(), std::uint64_t{0}));
  }
  // Streams that used the block since it was last made resident. No event is recorded at
  // unpin (the hot path); a swap-out records one on each of these streams when it starts,
  // which covers every use enqueued before it.
  std::vector<Stream> use_streams;
  void* host = nullptr;          // pinned host buffer, kept once allocated
  bool host_valid = false;       // the host buffer holds the current bytes once out_done is done
  Event out_done = nullptr;      // the latest swap-out copy (or marker) on the D2H stream
  std::uint64_t out_order = 0;   // when that swap-out was issued (the D2H stream's FIFO order)
  Event in_done = nullptr;       // the latest swap-in copy on the H2D stream
  bool busy = false;             // a thread is mapping it outside the lock
  bool prefetched = false;       // the pending swap-in was a prefetch (for hit/late stats)
  bool swappable = true;         // may be evicted (opt-in mode: once declared)
  // Never written since it was tracked, in C++ mode (opt_in off), where every write is pinned:
  // it moves with no copy. Never set in opt-in mode (code outside the hooks may write).
  bool untouched = false;
  // Pinned for the host (pin_for_host): the host reads and writes its memory directly, so the
  // memory's next owner may be written by the host at once, in no stream's order (release).
  bool host_used = false;
  // Pinned in some step (of any scope) since it was tracked: a block from before a step that
  // no step has used yet may take the place of a plan's block that lives on (the next batch
  // of a list made before the loop; id_for_block_locked).
  bool stepped = false;
  std::uint64_t generation = 0;  // this life of the address (pin tokens)
  // The step scope of its latest pin from a scope the swapper holds steps for (whose plan
  // says when it is next used); a pin from a scope without steps (a reader thread) keeps it.
  std::uint64_t scope = 0;
  std::uint64_t born = 0;        // the clock when it was tracked or found
  std::uint64_t last_use = 0;    // LRU clock
};

// A prefetch the plan wants, by block id, still waiting for room.
struct PlannedPrefetch {
  std::uint64_t id = 0;
};

// A scope's plan and what finds its blocks in a later step: the latest step's ids of blocks
// (which the plan's ids name), sizes and requests it was made for. A scope whose steps come in
// variants (spill_step_key: batches of a few lengths, some of whose tensors fall under
// swap_threshold at one length and not at another, so that the steps differ in their blocks)
// keeps the plan of each variant and follows the one of the step's key (see step.cpp).
struct PlanFields {
  graph::Plan plan;
  graph::Trace plan_trace;       // the recording the plan was made from (deviation checks)
  std::vector<bool> plan_starts;  // per access of plan_trace: its block's first in the step
  std::vector<std::vector<std::size_t>> plan_positions;  // plan id -> indices in plan_trace
  std::vector<std::int64_t> tensor_id;              // plan tensor index -> block id
  std::vector<std::vector<std::uint32_t>> use_ops;  // block id -> ops using it (Belady)
  // The plan's ops are the recording's ops that touched blocks: plan op j is recorded op
  // plan_op_ids[j] (ops whose pins were all of small blocks are not in the plan).
  std::vector<std::uint32_t> plan_op_ids;
  // (plan op << 32 | tensor) -> the plan op of that eviction's prefetch.
  std::unordered_map<std::uint64_t, std::int64_t> prefetch_of_eviction;
  // id -> base and generation of its block in the latest step that followed the plan (or made
  // it), and the inverse.
  std::vector<std::uintptr_t> base_of_id_prev;
  std::vector<std::uint64_t> gen_of_id_prev;
  std::unordered_map<std::uintptr_t, std::uint64_t> prev_id_of_base;
  std::vector<std::size_t> size_of_id;  // from the planned trace, then the block followed
  // id -> the block's request the plan was made for. Tensor sizes may change from step to step
  // (batches padded to their own longest sequence): a plan is made for the largest request,
  // block size (plan_bytes_of_id) and, per recorded op, memory the recording did not show
  // (plan_other_bytes) of the steps since its recording; a step that outgrows it plans again.
  std::vector<std::size_t> request_of_id_planned;
  std::vector<std::size_t> plan_bytes_of_id;
  std::vector<std::uint64_t> plan_other_bytes;
  std::vector<char> existed_of_id_planned;  // id -> its block existed before the plan's step
  // The plan's recording's births (StepState::id_of_birth, request_of_birth).
  std::vector<std::int64_t> id_of_birth_planned;
  std::vector<std::size_t> request_of_birth_planned;
  // Blocks from before the step that took turns under one of the plan's ids, each in another
  // step (the batches of a list made before the loop, epoch after epoch; heads chosen
  // round-robin; two models trained in alternate steps): base -> the id, the block's
  // generation, and the block that took the id after it the latest time (0: none seen yet).
  // A block that held the id before may take it again at the plan's place, and the plan's
  // prefetches of the id bring in the block that came after the latest step's (see step.cpp).
  struct Turn {
    std::uint64_t id = 0;
    std::uint64_t generation = 0;
    std::uintptr_t next = 0;
    std::uint64_t next_generation = 0;
  };
  std::unordered_map<std::uintptr_t, Turn> turns;
  std::uint64_t plan_begin_tick = 0;  // begin_tick of the step the plan was made at
  bool plan_spliced = false;          // the plan was made by splicing a step into the last one
  bool fresh_plan = false;       // made at the last step's end, which ran without it
  std::uint64_t last_shape = 0;  // a hash of the latest step's accesses (its blocks in order)
  int lookahead = 0;             // extra ops of prefetch, adapted
  // Variants: the step keys whose latest step ended on this plan, the hash of its recording's
  // accesses in their order of first access (a step of another key that made the same plan
  // joins it), and begin_tick of the latest step that followed it.
  std::vector<std::uint64_t> keys;
  std::uint64_t shape = 0;
  std::uint64_t followed_tick = 0;
  bool has_key(std::uint64_t key) const {
    return std::find(keys.begin(), keys.end(), key) != keys.end();
  }
};

// One step scope's recording and plan. Every step is recorded (policy plan with a budget);
// the recording becomes the plan when the scope has none yet, when the step had ops its plan
// lacks (or matched less than half of it), or when the budget changed; a step that ran layers
// its plan's step skipped is spliced into the plan (see step.cpp).
struct StepState : PlanFields {
  std::uint64_t scope = 0;       // its number
  std::uint64_t steps_begun = 0;  // begin_step calls so far (the trace's step marks)
  std::uint64_t begin_tick = 0;  // the clock at begin_step: blocks born before it pre-exist
  bool in_step = false;
  bool recording = false;        // this step's accesses are being recorded
  bool executing = false;        // a plan drives this step (unless it gave up on it)
  bool planned_step = false;     // the step began under a plan
  bool replan = true;            // plan from this step's recording at its end
  bool auto_ops = true;          // ops are inferred from pin/unpin groups
  bool after_unpin = true;
  std::int64_t op = -1;
  std::uint64_t next_id = 0;     // the next id for a block the plan does not know
  std::unordered_map<std::uintptr_t, std::uint64_t> id_of;       // base -> id, this step
  // The bytes of the blocks born in the step that are not on the host and not yet in id_of
  // (no pin has given them an id): what sample_other_locked counts beside the memory no
  // block tracks. Kept as blocks are born, take ids, move to and from the host and go
  // (count_fresh_locked); a scan of every block at each pin and op was the recording's
  // largest cost in the swapper once a step had hundreds of blocks.
  std::size_t fresh_bytes = 0;
  // id -> base, this step's (ids are the plan's: see plan_ids; the latest step's in PlanFields).
  std::vector<std::uintptr_t> base_of_id;
  // id -> the generation of the block at that base when it was pinned: a later block at the
  // same address (the recorded one freed) is another block.
  std::vector<std::uint64_t> gen_of_id;
  // id -> the block's request (SwapBlock::request), this step's (the plan's: PlanFields).
  std::vector<std::size_t> request_of_id;
  // id -> whether its block existed before the step, this step's (the plan's: PlanFields).
  std::vector<char> existed_of_id;
  bool outgrew_plan = false;     // a block of this step was made by a larger request
  std::unordered_map<std::uint64_t, std::size_t> access_of_id_op;  // id -> index in trace
  // Blocks born in the step (allocated in its scope while it runs) are also known by their
  // birth order: birth k of the recording became block id_of_birth[k] at its first pin (-1:
  // none in the step). A step following a plan gives the block born at the same position with
  // the same request that id at birth (expected_id_of), so that the plan knows it before its
  // first pin: a gradient the backward makes and the optimizer reads first is neither taken
  // for a block no plan knows (the first victim when room runs short) nor missed by the
  // plan's prefetch, which looked for the previous step's block under that id.
  std::uint64_t births = 0;
  std::unordered_map<std::uintptr_t, std::uint64_t> birth_of;  // base -> birth, recording
  std::vector<std::int64_t> id_of_birth;
  std::vector<std::size_t> request_of_birth;
  std::vector<std::uint32_t> op_of_birth;  // the recorded op each birth came in
  struct Expected {
    std::uint64_t id = 0;
    std::uint64_t generation = 0;
  };
  std::unordered_map<std::uintptr_t, Expected> expected_id_of;  // base -> id until first pin
  std::unordered_map<std::uint64_t, std::uintptr_t> expected_base_of_id;
  std::unordered_map<std::uint64_t, std::size_t> first_access_of_id;  // id -> first index
  // The recording's blocks made in the step whose first pin came after the op they were
  // born in (an output its op made unpinned; a gradient the backward wrote outside the hooks
  // and the optimizer pins first): (index of that first access in the trace, op at birth).
  // The step's graph has each live from its birth (see end_step_locked).
  std::vector<std::pair<std::size_t, std::uint32_t>> born_before_pin;
  // Following a plan with resynchronisation (see step.cpp). A block's id in a step that has a
  // plan is the plan's id of the same block where one is found (by base and generation for a
  // block from before the step, by birth or by its place after the step's previous access for
  // one made in it), else an id past the plan's (plan_ids). `cursor` is the plan access the
  // step expects next; plan_op the plan's op (recorded numbering) the step is at.
  std::uint64_t plan_ids = 0;    // ids of the plan's blocks are below this
  std::size_t cursor = 0;
  std::int64_t plan_op = -1;
  bool deviated = false;         // an access of this step was not where its plan had it
  std::size_t misses = 0;        // consecutive accesses the plan did not have
  std::size_t extras = 0;        // accesses of the step the plan does not have
  std::size_t matched = 0;       // accesses of the step found in the plan
  bool plan_made_older = false;  // a block from before the step was made in the plan's step
  // Blocks of this step from before the plan's step that the plan lacks (the weights of a
  // layer the plan's step skipped): the step is spliced into the plan (see step.cpp).
  std::size_t unplanned_old = 0;
  std::int64_t prev_block = -1;  // the id of the step's latest recorded access
  // Per access of the trace (of plan_trace): whether it is its block's first in the step. An
  // id passes from a block freed in the step to a later one (id_for_block_locked), so an id's
  // first position is not the only place a block of the plan's step begins.
  std::vector<bool> trace_starts;
  graph::Trace trace, last_trace;
  std::vector<PlannedPrefetch> pending;  // planned prefetches that found no room yet
  // Per op of the recording: the most bytes mapped that its blocks did not account for (small
  // segments, blocks no pin of the step touched, cache), so that the plan leaves room for them.
  std::vector<std::uint64_t> other_bytes;

  // Executing a plan, or between two steps of a scope whose next step will follow it.
  bool follows_plan() const;
  // The plan's evictions that found their block still in use (pinned: a module's input stays
  // pinned while its submodules run; busy; not yet declared swappable), by block base: each
  // is issued when the block becomes evictable (its last unpin, or a later op), unless the
  // plan's prefetch of it has been issued meanwhile (then it stays).
  struct DeferredEviction {
    std::uint64_t generation = 0;
    std::int64_t prefetch_at = 0;  // plan op of its prefetch (>= the op count: next step)
  };
  std::unordered_map<std::uintptr_t, DeferredEviction> deferred;
  std::size_t prefetched_upto = 0;                  // plan ops whose prefetches were issued
  std::size_t evicted_upto = 0;                     // plan ops whose evictions were issued
  // The step's start on the host's steady clock, and the swapper's waited_ns then: recorded
  // times are since the start less the host's waits inside the swapper (see step_time_locked).
  std::uint64_t t0_ns = 0;
  std::uint64_t waited0_ns = 0;
  double last_time_s = 0;        // the latest recorded time (they never go back)
  // Op times. A step whose first pin is on a stream (pins ordered on the device) is timed on
  // that stream, not by the host, which runs ahead of the device there: an event at each op's
  // first pin and a pair around each wait the swapper makes that stream or the host do, so
  // that the stall between them is not counted as the op's. Read (one host wait) only when the
  // recording becomes a plan. A step whose first pin is a host pin keeps the host's clock
  // (less its waits in the swapper: t0_ns, waited0_ns).
  enum class Timing { Undecided, Host, Device };
  enum class MarkKind { OpStart, StallBegin, StallEnd, StepEnd };
  struct Mark {
    Event event;
    std::int64_t op;
    MarkKind kind;
  };
  Timing timing = Timing::Undecided;
  Stream timing_stream = nullptr;
  std::int64_t marked_op = -1;
  std::vector<Mark> marks;
  std::uint32_t stream_count = 0;
  std::unordered_map<std::uintptr_t, std::uint32_t> stream_ids;
  // Threads using this state without the lock (planned prefetches): end_scope waits for them.
  int users = 0;
  // The step's key (spill_step_key), and the plans of the scope's other variants, in the order
  // they were last followed (the least recent first; at most kPlanVariants with the current).
  std::optional<std::uint64_t> step_key;
  std::vector<PlanFields> variants;
  static constexpr std::size_t kPlanVariants = 8;
};

struct Swapper::Impl {
  Impl(Device& d, ResidencyBackend& b, HostMemory& h, SwapperOptions o);

  Device& dev;
  const std::int32_t ordinal;  // the device's, in trace events
  ResidencyBackend& backend;
  HostMemory& host;
  SwapperOptions opt;
  Stream d2h = nullptr, h2d = nullptr;
  // Trace time at which the last copy recorded on d2h / h2d ended. The streams run their copies
  // in order, so a copy issued behind others starts when the one before it ends: its slice
  // starts there, not at its issue (else queued copies would overlap and show more bandwidth
  // than the link has). Written by the streams' host callbacks only.
  std::atomic<std::uint64_t> d2h_trace_end{0}, h2d_trace_end{0};

  mutable std::mutex mu;
  std::condition_variable cv;  // a block stopped being busy
  std::map<std::uintptr_t, SwapBlock> blocks;
  // Why the last reactive eviction (evict_bytes) could not swap a block out for want of a
  // host buffer ("" when it could), for the out-of-memory message (Swapper::unevictable).
  std::string host_refusal;
  // The blocks whose state is SwappingOut, in the order of `blocks` (reap_locked completes
  // theirs without a scan of every block at each op).
  std::set<std::uintptr_t> swapping_out;
  std::vector<Event> event_pool;
  std::vector<Event> timing_pool;  // events with timing, for StepState::marks
  struct Zombie {  // host buffer of a released block, freed once its copy is done
    void* host;
    std::size_t size;
    Event done;
  };
  std::vector<Zombie> zombies;
  SwapStats stats;
  std::uint64_t tick = 0;
  std::uint64_t next_pin = 0;  // the latest pin id given (PinToken::pin)
  std::uint64_t next_out_order = 0;
  // Host time (steady clock, ns) that callers spent blocked inside the swapper: waiting for a
  // swap-in or a cancelled swap-out to land (host pins) and for swap-outs to free room. A
  // recorded step's op times leave it out, so a plan made from a step that stalled sees the
  // compute it has to hide copies behind, not the stalls.
  std::uint64_t waited_ns = 0;
  const std::uint64_t serial;            // tells swappers apart in thread-local scopes
  std::map<std::uint64_t, StepState> scopes;
  // Named scopes (set_scope_name); a name is interned as a trace tag only when recorded (the
  // tag table keeps each name for the process's life).
  std::map<std::uint64_t, std::string> scope_names;
  graph::Trace last_trace_any;            // the latest recording of any scope
  std::uint64_t last_trace_any_scope = 0;  // whose

  // ---- swapper.cpp
  Event get_event_locked();
  void put_event_locked(Event& e);
  // The tracked block containing ptr (found through the backend if new); nullptr for a block
  // that never moves; InvalidArgument naming `op` and ptr when no block contains it.
  SwapBlock* lookup_locked(const void* ptr, const char* op);
  // The tracked block containing ptr once no thread is mapping it (waits unlocked), or null
  // (none, or freed meanwhile).
  SwapBlock* idle_block_locked(std::unique_lock<std::mutex>& lock, const void* ptr,
                               const char* op);
  SwapBlock* find_tracked_locked(const void* ptr);
  SwapBlock& add_block_locked(void* base, std::size_t size);
  bool evictable_locked(const SwapBlock& b) const {
    return b.pins == 0 && !b.busy && b.swappable;
  }
  PinToken pin(const void* ptr, Stream stream, bool host);
  // Which resident blocks cannot be evicted (pinned, undeclared), with a few addresses.
  std::string unevictable_report_locked() const;
  // `scope`: the scope of the pin it ends (its step state, if any, sees the unpin).
  void unpin_locked(SwapBlock& b, Stream stream, bool wrote, bool host, std::uint64_t scope);
  // The calling thread's current scope on this swapper (0 when it never named one).
  std::uint64_t current_scope() const;
  void set_current_scope(std::uint64_t scope) const;
  StepState& scope_locked(std::uint64_t scope) {
    StepState& s = scopes[scope];
    s.scope = scope;
    return s;
  }
  // The scope's state, or nullptr when the swapper holds none (never begun, or ended): pins
  // and unpins then touch no step state. Only begin_step/begin_op create a scope.
  StepState* find_scope_locked(std::uint64_t scope) {
    auto it = scopes.find(scope);
    return it == scopes.end() ? nullptr : &it->second;
  }
  void wait_not_busy(std::unique_lock<std::mutex>& lock, std::uintptr_t base);
  // How a prefetch that finds no room waits for it (make_room_for_prefetch), in the order its
  // plan counts the room free: the graph planner's (the executor's prefetches) counts a freed
  // block gone at its op, so the cache comes first; the swapper's recorded plans time the
  // swap-outs, so those do.
  enum class RoomWait { None, CacheThenSwapOuts, SwapOutsThenCache };
  // Maps the block again and starts the copy back; drops and retakes the lock around reback.
  // Returns false (block unchanged) when `optional` and the budget cannot be met.
  bool swap_in(std::unique_lock<std::mutex>& lock, std::uintptr_t base, bool prefetch,
               RoomWait wait = RoomWait::None);
  void settle_locked(SwapBlock& b);  // SwappingIn whose copy is done -> Resident
  // The host waits for `e`, a copy of the block at `base`, without the lock, the block pinned
  // meanwhile (nothing moves it); then unpins and settles it if it is still that block.
  // Returns the wait's error, if any.
  std::exception_ptr host_wait_pinned(std::unique_lock<std::mutex>& lock, std::uintptr_t base,
                                      Event e);
  // SwappingOut -> Resident, or SwappingIn while the swap-in it started on is still landing.
  void cancel_swap_out_locked(SwapBlock& b);
  void copy_chunks(void* dst, const void* src, std::size_t bytes, CopyKind kind, Stream s);

  // ---- eviction.cpp
  void start_swap_out_locked(SwapBlock& b);  // may throw OutOfMemory (host cap)
  std::size_t complete_swap_out_locked(SwapBlock& b);
  std::size_t reap_locked();
  // Frees the host buffers of released blocks whose last copy has landed (part of reap).
  void reap_zombies_locked();
  std::vector<std::uintptr_t> rank_victims_locked();
  std::size_t evict_bytes(std::size_t needed);
  // Waits (without the lock) for swap-outs already in flight until `needed` bytes are
  // unmapped or none is left; chooses no new victims. Returns the bytes freed.
  std::size_t wait_inflight(std::size_t needed);

  // ---- step.cpp (each on one scope's state)
  void on_pin_locked(StepState& s, SwapBlock& b, Stream stream);
  void on_unpin_locked(StepState& s, SwapBlock& b, bool wrote);
  // A large block allocated while the scope's step runs (Swapper::track).
  void on_birth_locked(StepState& s, SwapBlock& b);
  void live_from_birth_locked(StepState& s, graph::Graph& g);
  // The block at `base` was pinned or freed: it is no longer known by its birth alone.
  void forget_expected_locked(StepState& s, std::uintptr_t base);
  // Starts a new op when the pin/unpin grouping says so (or `force`), issues the plan's
  // evictions, and returns the blocks the plan wants prefetched now (the caller swaps them in
  // without the lock).
  std::vector<PlannedPrefetch> advance_op_locked(StepState& s, bool force);
  void issue_evictions_locked(StepState& s, std::int64_t op);
  void planned_evict_locked(SwapBlock& b);  // starts its swap-out (not at the host cap)
  // Issues `base`'s deferred eviction if its block is evictable now, or drops it when it no
  // longer applies; returns whether the entry is gone.
  bool issue_deferred_locked(StepState& s, std::uintptr_t base);
  // Issues planned prefetches (without the lock around each swap-in); one that finds no room
  // starts evictions of blocks needed after it and waits in `s.pending` for a later op.
  void prefetch_planned(std::unique_lock<std::mutex>& lock, StepState& s,
                        std::vector<PlannedPrefetch> wanted);
  // A prefetch whose plan timed room that is not free yet (called without the lock, the block
  // busy, the cache no queued work touches already returned: try_reback): returns the rest of
  // the allocator's cache (waiting for the work queued on it) and waits for the swap-outs in
  // flight, in `wait`'s order, each only for what the prefetch still lacks. Whether it is
  // mapped.
  bool make_room_for_prefetch(void* ptr, std::size_t size, RoomWait wait);
  // Returns what the allocator's cache can give of the room a block of `size` bytes lacks,
  // waiting for the work queued on it (without the lock); counted in cache_returns. With
  // `reap`, then completes the swap-outs whose copies are done. Whether it returned any.
  bool return_cache_for(std::size_t size, bool reap);
  // At the end of a step that keeps its plan: the prefetches of the next step's first ops.
  std::vector<PlannedPrefetch> next_step_prefetches_locked(StepState& s);
  // The blocks of the plan's tensors that it has resident when its step begins, in the order
  // of their first use (ids).
  std::vector<std::uint64_t> resident_at_start_locked(const StepState& s) const;
  // At the start of a step that follows its plan: those of them on the host now, or on their
  // way there (moved between the steps: every tensor evicted by the caller, an evaluation pass
  // under the budget), to be brought back as the fresh plan's are.
  std::vector<PlannedPrefetch> moved_since_plan_locked(StepState& s);
  // Starts swap-outs of evictable resident blocks whose next use is more than `horizon` ops
  // away (farthest first) until `needed` bytes are on their way out. Returns the bytes coming.
  std::size_t make_room_locked(std::size_t needed, std::int64_t horizon);
  // Ops until block `id` of scope `s` is next used (INT64_MAX when unknown).
  std::int64_t next_use_of_id_locked(const StepState& s, std::uint64_t id) const;
  // Device timing of a recording step (StepState::Timing::Device).
  // At a pin on `stream`: decides the step's timing on its first pin, marks an op's start.
  void mark_op_start_locked(StepState& s, Stream stream, bool host);
  // Records a mark of `kind` on the step's timing stream (no-op unless it is device-timed).
  void mark_locked(StepState& s, StepState::MarkKind kind);
  // The recording scope of the calling thread that is timed on the device, or nullptr.
  StepState* device_timed_scope_locked();
  // Replaces the recording's times by the device's, net of the marked stalls (waits once for
  // the last mark).
  void time_on_device_locked(StepState& s);
  void release_marks_locked(StepState& s);
  // Notes the memory mapped outside the recording's blocks at this point of the step.
  void sample_other_locked(StepState& s, bool at_pin);
  // Whether block `b` (at `base`) is among step `s`'s fresh bytes (StepState::fresh_bytes).
  static bool fresh_in(const StepState& s, std::uintptr_t base, const SwapBlock& b) {
    return b.born >= s.begin_tick && b.state != Residence::OnHost && s.id_of.count(base) == 0;
  }
  // Adds (`sign` +1) or takes out (-1) block `b`'s bytes in the fresh bytes of every scope
  // that counts it: around a change of its residence to or from the host, its birth and its
  // end. A change of one scope's id_of adjusts that scope alone.
  void count_fresh_locked(std::uintptr_t base, const SwapBlock& b, int sign) {
    for (auto& [scope, st] : scopes)
      if (fresh_in(st, base, b)) st.fresh_bytes = sign > 0 ? st.fresh_bytes + b.size
                                                            : st.fresh_bytes - b.size;
  }
  // Gives block `b` at `base`, which has no id in step `s`, the id `id` (it leaves the step's
  // fresh bytes; returns its entry), and takes the id of the entry at `it` back (its block, if
  // still tracked, counts as fresh again; returns the next entry): every change of id_of but
  // its clearing at the step's start and a block's end goes through these.
  using IdOf = std::unordered_map<std::uintptr_t, std::uint64_t>;
  IdOf::iterator give_id_locked(StepState& s, std::uintptr_t base, const SwapBlock& b,
                                std::uint64_t id) {
    if (fresh_in(s, base, b)) s.fresh_bytes -= b.size;
    return s.id_of.emplace(base, id).first;
  }
  IdOf::iterator take_id_locked(StepState& s, IdOf::iterator it) {
    const std::uintptr_t base = it->first;
    it = s.id_of.erase(it);
    auto b = blocks.find(base);
    if (b != blocks.end() && fresh_in(s, base, b->second)) s.fresh_bytes += b->second.size;
    return it;
  }
  void prefetch_all(std::unique_lock<std::mutex>& lock, const std::vector<std::uintptr_t>& bases,
                    RoomWait wait = RoomWait::None);
  // The block of the plan's id `id` in this step: the one that took it, else the one expected
  // to (born where the plan's was), else the latest step's. With `next_use` (a prefetch: the
  // block that will be used at the id's next access), a latest step's block that took turns
  // under the id gives way to the block that came after it the latest time (none when no
  // block has yet).
  std::optional<std::uintptr_t> base_for_id_locked(StepState& s, std::int64_t id,
                                                   bool next_use = false);
  // Block `b` at `base`, from before the step, took the plan's id `id` at its first pin: when
  // the id's block of the latest step lives on (another turn), both are noted (PlanFields::turns).
  void note_turn_locked(StepState& s, std::uintptr_t base, const SwapBlock& b, std::uint64_t id);
  // Whether the block at `base` took turns under `id` (a noted turn of this life of it).
  bool takes_turns_locked(const StepState& s, std::uintptr_t base, std::uint64_t id) const;
  // Whether block `b` at `base`, which took turns under `id` in the latest step (between
  // steps: the step that ended), has had its turn: another block took the id in this step, or
  // the block that came after it the latest time is there to take it in the next.
  bool turn_over_locked(const StepState& s, std::uintptr_t base, const SwapBlock& b,
                        std::uint64_t id) const;
  // Ops until the block's next use in its scope's plan (INT64_MAX when unknown).
  std::int64_t next_use_locked(const SwapBlock& b) const;
  // What next_use_locked gives, while some scope follows a plan, for a block that no plan
  // knows; a use in a later step ranks farther still, a use later in this step nearer.
  static constexpr std::int64_t kUnknownUse = std::int64_t{1} << 31;
  // What it gives for a block whose turn under an id is over (turn_over_locked): after every
  // use in the next step.
  static constexpr std::int64_t kLaterTurn = std::int64_t{1} << 33;
  // Seconds since the step began on the host, less the time waited inside the swapper since.
  double step_time_locked(StepState& s);
  // The id a block gets at its first pin in the step (see StepState::plan_ids).
  std::uint64_t id_for_block_locked(StepState& s, const SwapBlock& b);
  // Matches the step's access of block `id` against its plan: follows, skips ahead or
  // resynchronises the cursor, or counts an access the plan does not have.
  void follow_access_locked(StepState& s, std::uint64_t id);
  // Moves the step to plan op `op` (recorded numbering): issues the evictions of the plan ops
  // before it and queues (s.pending) the prefetches due by then.
  void follow_to_locked(StepState& s, std::int64_t op);
  // prev_id_of_base from base_of_id_prev.
  void set_prev_identity_locked(StepState& s);
  // At the end of a step that ran layers its plan lacks: makes the step's recording (s.trace,
  // s.other_bytes, the ids' blocks) the plan's accesses with the step's spliced in, in the
  // order of both (see step.cpp). Returns false (nothing changed) when the steps are too long
  // to align.
  bool splice_into_plan_locked(StepState& s);
  void begin_step_locked(StepState& s);
  // A step begun (or switched to another variant's plan before its first pin) follows its plan
  // from the start, if it has one and records: the cursor and issue marks at the start.
  void follow_plan_from_start_locked(StepState& s);
  // Sets the step's key; switches to the plan of that key's variant when the step has no pin
  // yet, returning the prefetches that plan wants at its start (see step.cpp).
  std::vector<PlannedPrefetch> set_step_key_locked(StepState& s, std::uint64_t key);
  // The variant whose plan a step keyed `key` now would switch to; variants.end() for none (the
  // step has pinned, its plan has the key, or no variant's keys are nearer).
  std::vector<PlanFields>::iterator variant_for_key_locked(StepState& s, std::uint64_t key) const;
  // The key of a step that ended on its plan becomes the plan's (no other variant's; with
  // from_variants false, only a key no variant has).
  void claim_step_key_locked(StepState& s, bool from_variants);
  // Evicts what the plan has on the host at its start (a planned step's last evictions do).
  void evict_plan_start_locked(StepState& s);
  // The prefetches of the plan's first ops (look-ahead included).
  void first_ops_prefetches_locked(const StepState& s, std::vector<PlannedPrefetch>& wanted) const;
  // Birth k of the step is expected to become the plan's block of the recording's birth k.
  void expect_birth_locked(StepState& s, std::uint64_t k, const SwapBlock& b);
  void end_step_locked(StepState& s);
};

}  // namespace spill

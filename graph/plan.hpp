// A swap plan for one training step: what the swapper executes and what the simulator costs.
// Per op index i:
//   prefetch_at[i]  - tensors whose host-to-device copy is issued when op i-1 completes (so it
//                     overlaps op i and later ones); their memory is mapped at that moment.
//   evict_after[i]  - tensors that leave the device once op i completes: copied to the host
//                     first unless the host copy is still valid (not written since), then unmapped.
//   drop_after[i]  - tensors freed once op i completes (no copy): the plan remakes them later.
//   recompute_before[i] - tensors remade just before op i by running their producing op again
//                     (a recomputable op, graph/ir.hpp) on the compute stream, in list order;
//                     their memory is mapped then.
// A tensor evicted for the rest of the step (Swap::to_step_end) is in an evict_after list and in
// no prefetch_at list.
// start_on_host lists weights/optimizer state/inputs that are on the host when the step begins;
// a repeatable plan evicts them again before the step ends. Tensors are graph indices; for a
// graph built from a Trace, graph.tensors[t].id is the swapper's block id.
// Invariant (check_plan): a tensor is evicted only while resident and not used until its
// prefetch; it is prefetched only while on the host. A recompute's producer finds every other
// tensor it touches resident when it runs again: none of them swapped out or written since, and
// none dropped unless it is remade before the same op, earlier in its list (a chain: a dropped
// input remade first, to a depth the plan chooses) - see check_plan.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "graph/ir.hpp"

namespace spill::graph {

// One decision: evict `tensor` after op `evict_after`, bring it back starting at op
// `prefetch_at`, for its use at op `next_use`. For a gap that wraps into the next step,
// prefetch_at and next_use are >= the number of ops (index into the next step + n). A tensor
// held to the step's end past its last use (Tensor::held_to_step_end), and not carried over to
// the next, may leave for the rest of the step (`to_step_end`): prefetch_at and next_use are
// then the number of ops, and nothing brings it back (the step frees it at its end, wherever
// it is).
struct Swap {
  TensorIndex tensor = 0;
  std::int64_t evict_after = 0;
  std::int64_t prefetch_at = 0;
  std::int64_t next_use = 0;
  bool to_step_end = false;
};

// Drop activation `tensor` after op `drop_after` (freed, nothing copied) and remake it just
// before op `next_use` by running the op that made it again. Within one step. A link of a chain
// is remade earlier, before op `at` (drop_after + 1 < at < next_use), where a later remake in
// the same op's list reads it; it stays resident from there to its next use.
struct Recompute {
  TensorIndex tensor = 0;
  std::int64_t drop_after = 0;
  std::int64_t next_use = 0;
  std::int64_t at = -1;  // the op it is remade before; -1: next_use
  std::int64_t remade_before() const { return at < 0 ? next_use : at; }
};

struct PlanStep {
  std::vector<TensorIndex> evict_after;
  std::vector<TensorIndex> prefetch_at;
  std::vector<TensorIndex> drop_after;
  std::vector<TensorIndex> recompute_before;
  // Whether the plan acts before this op (prefetches or remakes), which the executor times by
  // an op's completion; evictions and drops follow the op in stream order.
  bool acts_before() const { return !prefetch_at.empty() || !recompute_before.empty(); }
};

struct Plan {
  std::string policy;                   // "spill", "vdnn", "threshold", "none"
  std::uint64_t budget_bytes = 0;
  bool feasible = true;                 // false: the budget cannot be met (see reason)
  std::string reason;                   // why infeasible, naming the op and the excess
  std::vector<TensorIndex> start_on_host;
  std::vector<PlanStep> steps;          // one per op
  std::vector<Swap> swaps;              // the decisions the steps were built from
  std::vector<Recompute> recomputes;    // likewise

  // Builds steps and start_on_host from `swaps` (and `recomputes`) for a graph of `n_ops` ops.
  static Plan from_swaps(std::string policy, std::uint64_t budget, std::size_t n_ops,
                         std::vector<Swap> swaps, std::vector<Recompute> recomputes = {});
  std::uint64_t recomputed_bytes(const Graph& g) const;
  std::size_t chain_links() const;  // recomputes remade before an op other than their next use
};

// The op that makes `t` when it can remake it: its only writer, recomputable (graph/ir.hpp); -1
// when there is none.
std::int64_t remaking_op(const Graph& g, TensorIndex t);

// Orders each op's recompute_before by the producers' order in the graph, so that a chain's
// links are remade before the remakes that read them (from_swaps orders them by drop_after).
void order_remakes(const Graph& g, Plan& p);

// Throws InvalidArgument when a swap is out of range, evicts a tensor its own window uses, or
// two swaps of one tensor overlap, or when a swap to the step's end is of a tensor not held to
// it; or when a recompute is out of range, its tensor has no
// recomputable producer or is used, swapped or dropped again inside its window, or a tensor the
// producer touches (other than the one remade) is not resident and unchanged at the recompute:
// dead there (before its first or after its last use), written by an op since the producer,
// inside a swap's window, or dropped and not remade before the same op earlier in its list (a
// chain out of order, or whose first link's input is absent: the error names the tensor).
void check_plan(const Graph& g, const Plan& p);

// Bytes resident during each op when the plan is followed and every copy is on time: the
// liveness curve minus each swapped tensor over ops evict_after+1 .. prefetch_at-1 and each
// recomputed one over drop_after+1 .. remade_before()-1; at the op a remake runs before, the
// producer's workspace where it exceeds the op's own.
std::vector<std::uint64_t> planned_memory(const Graph& g, const Plan& p);

}  // namespace spill::graph

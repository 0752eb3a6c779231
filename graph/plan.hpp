// A swap plan for one training step: what the swapper executes and what the simulator costs.
// Per op index i:
//   prefetch_at[i]  - tensors whose host-to-device copy is issued when op i-1 completes (so it
//                     overlaps op i and later ones); their memory is mapped at that moment.
//   evict_after[i]  - tensors that leave the device once op i completes: copied to the host
//                     first unless the host copy is still valid (not written since), then unmapped.
// start_on_host lists weights/optimizer state/inputs that are on the host when the step begins;
// a repeatable plan evicts them again before the step ends. Tensors are graph indices; for a
// graph built from a Trace, graph.tensors[t].id is the swapper's block id.
// Invariant (check_plan): a tensor is evicted only while resident and not used until its
// prefetch; it is prefetched only while on the host.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "graph/ir.hpp"

namespace spill::graph {

// One decision: evict `tensor` after op `evict_after`, bring it back starting at op
// `prefetch_at`, for its use at op `next_use`. For a gap that wraps into the next step,
// prefetch_at and next_use are >= the number of ops (index into the next step + n).
struct Swap {
  TensorIndex tensor = 0;
  std::int64_t evict_after = 0;
  std::int64_t prefetch_at = 0;
  std::int64_t next_use = 0;
};

struct PlanStep {
  std::vector<TensorIndex> evict_after;
  std::vector<TensorIndex> prefetch_at;
};

struct Plan {
  std::string policy;                   // "spill", "vdnn", "threshold", "none"
  std::uint64_t budget_bytes = 0;
  bool feasible = true;                 // false: the budget cannot be met (see reason)
  std::string reason;                   // why infeasible, naming the op and the excess
  std::vector<TensorIndex> start_on_host;
  std::vector<PlanStep> steps;          // one per op
  std::vector<Swap> swaps;              // the decisions the steps were built from

  // Builds steps and start_on_host from `swaps` for a graph of `n_ops` ops.
  static Plan from_swaps(std::string policy, std::uint64_t budget, std::size_t n_ops,
                         std::vector<Swap> swaps);
};

// Throws InvalidArgument when a swap is out of range, evicts a tensor its own window uses, or
// two swaps of one tensor overlap.
void check_plan(const Graph& g, const Plan& p);

// Bytes resident during each op when the plan is followed and every copy is on time: the
// liveness curve minus each swapped tensor over ops evict_after+1 .. prefetch_at-1.
std::vector<std::uint64_t> planned_memory(const Graph& g, const Plan& p);

}  // namespace spill::graph

// Swap planning under a memory budget: the spill planner and the baselines it is compared with.
//   spill     - chooses tensors and idle gaps (activations, gradients, weights, optimizer state)
//               so that the planned memory curve never passes the budget, starting each
//               prefetch early enough to hide it (behind the copies queued before it) where
//               memory allows; cost model = simulator. With PlannerOptions::recompute, an
//               activation's gap may instead be a recompute (dropped, remade by its producer
//               before the next use) where that costs less than the stall of its swap, or than
//               the link time when the link is the bottleneck; the fastest simulated plan wins,
//               the swap-only one among the candidates, so recomputation never predicts slower.
//   vdnn      - every activation leaves after its last forward use and is prefetched one layer
//               ahead of its backward use (Rhu et al., vDNN, 2016); no budget awareness.
//   threshold - activations of at least a size threshold leave after their forward use and come
//               back a fixed number of ops ahead (TFLMS-style); with threshold 0 the largest
//               threshold whose planned memory fits the budget is chosen.
//   none      - no swapping.
// Guarantee of spill (tested): when the plan is feasible, simulating it never maps more than
// the budget. When no plan can fit, Plan::reason names the op whose own working set (plus
// tensors too small to swap) exceeds the budget, and by how much.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/link_model.hpp"
#include "graph/ir.hpp"
#include "graph/plan.hpp"
#include "graph/simulator.hpp"

namespace spill::graph {

enum class Policy { Spill, Vdnn, Threshold, None };
const char* to_string(Policy p);
Policy parse_policy(std::string_view s);  // spill | vdnn | threshold | none
const std::vector<Policy>& all_policies();

struct PlannerOptions {
  std::uint64_t budget = 0;
  std::uint64_t min_swap_bytes = 1ull << 20;  // smaller tensors never move (as in the swapper)
  std::uint64_t threshold_bytes = 0;          // threshold policy: 0 = choose automatically
  int threshold_lookahead_ops = 4;            // threshold policy: prefetch this many ops ahead
  StepModel model;  // spill: how its candidate plans are simulated (the prediction's model)
  // spill: an activation made by a recomputable op may also be dropped and remade before its
  // next use (graph/plan.hpp Recompute) where the simulated step is faster for it.
  bool recompute = true;
};

// Whether any plan can meet the budget: the lowest memory each op can run with is the planned
// curve with every swappable idle tensor gone.
struct BudgetCheck {
  bool feasible = true;
  std::int64_t worst_op = -1;
  std::uint64_t required = 0;     // minimum resident bytes at worst_op
  std::uint64_t working_set = 0;  // worst_op's own tensors and workspace
  std::string message;
};
BudgetCheck check_budget(const Graph& g, const PlannerOptions& o);

Plan plan_spill(const Graph& g, const std::vector<double>& op_times, const LinkModel& link,
                const PlannerOptions& o);
Plan plan_vdnn(const Graph& g, const PlannerOptions& o);
Plan plan_threshold(const Graph& g, const PlannerOptions& o);
Plan plan_none(const Graph& g, const PlannerOptions& o);
Plan make_plan(Policy p, const Graph& g, const std::vector<double>& op_times,
               const LinkModel& link, const PlannerOptions& o);

// Sets plan.feasible/reason from its planned memory curve against plan.budget_bytes.
void judge_plan(const Graph& g, Plan& plan);

}  // namespace spill::graph

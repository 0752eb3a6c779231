// The baseline policies the spill planner is compared with (vDNN-style, TFLMS-style threshold,
// none), the budget feasibility check, and policy names.
#include <algorithm>
#include <limits>
#include <set>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "graph/liveness.hpp"
#include "graph/planner.hpp"

namespace spill::graph {

const char* to_string(Policy p) {
  switch (p) {
    case Policy::Spill: return "spill";
    case Policy::Vdnn: return "vdnn";
    case Policy::Threshold: return "threshold";
    case Policy::None: return "none";
  }
  return "?";
}

Policy parse_policy(std::string_view s) {
  for (Policy p : all_policies())
    if (s == to_string(p)) return p;
  throw InvalidArgument("unknown policy '" + std::string(s) +
                        "' (known: spill, vdnn, threshold, none)");
}

const std::vector<Policy>& all_policies() {
  static const std::vector<Policy> p{Policy::Spill, Policy::Vdnn, Policy::Threshold, Policy::None};
  return p;
}

BudgetCheck check_budget(const Graph& g, const PlannerOptions& o) {
  Liveness l = analyze_liveness(g);
  const auto n = std::int64_t(g.ops.size());
  // Bytes that can leave at each op: every swappable tensor idle there.
  std::vector<std::int64_t> delta(g.ops.size() + 1, 0);
  auto add = [&](std::int64_t a, std::int64_t b, std::uint64_t bytes) {  // ops [a, b)
    if (a >= b) return;
    delta[std::size_t(a)] += std::int64_t(bytes);
    delta[std::size_t(b)] -= std::int64_t(bytes);
  };
  for (const Gap& gp : idle_gaps(g, l, std::max<std::uint64_t>(o.min_swap_bytes, 1))) {
    const std::uint64_t bytes = g.tensors[gp.tensor].bytes;
    if (gp.to <= n) {
      add(gp.from + 1, gp.to, bytes);
    } else {
      add(gp.from + 1, n, bytes);
      add(0, gp.to - n, bytes);
    }
  }
  std::vector<std::uint64_t> ws = working_sets(g);
  BudgetCheck c;
  std::int64_t movable = 0;
  std::uint64_t worst_excess = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    movable += delta[std::size_t(i)];
    const std::uint64_t required = l.memory[std::size_t(i)] - std::uint64_t(movable);
    // Unsigned throughout: a budget may be any 64-bit size, even one no signed type holds.
    if (required > o.budget && required - o.budget > worst_excess) {
      worst_excess = required - o.budget;
      c = {false, i, required, ws[std::size_t(i)], ""};
    }
  }
  if (!c.feasible) {
    const Op& op = g.ops[std::size_t(c.worst_op)];
    // Tensors carried over to the next step stay where they are past their last use (no gap).
    std::uint64_t carried = 0;
    for (std::size_t t = 0; t < g.tensors.size(); ++t)
      if (g.tensors[t].carried_over && !l.uses[t].empty() && l.uses[t].back() < c.worst_op)
        carried += g.tensors[t].bytes;
    c.message = "no plan fits the budget of " + format_bytes(o.budget) + ": op " +
                std::to_string(c.worst_op) + " '" + op.name + "' needs " +
                format_bytes(c.required) + " resident (its own working set " +
                format_bytes(c.working_set) + " + " +
                format_bytes(c.required - std::min(c.required, c.working_set)) +
                " that cannot move: tensors under " + format_bytes(o.min_swap_bytes) +
                " or inputs before their first use" +
                (carried > 0 ? ", " + format_bytes(carried) +
                                   " of it carried over to the next step past their last use "
                                   "(in a captured step, optimizer state replaced out of "
                                   "place)"
                             : std::string()) +
                "), over by " + format_bytes(worst_excess);
  }
  return c;
}

void judge_plan(const Graph& g, Plan& plan) {
  std::vector<std::uint64_t> mem = planned_memory(g, plan);
  plan.feasible = true;
  plan.reason.clear();
  for (std::size_t i = 0; i < mem.size(); ++i) {
    if (mem[i] > plan.budget_bytes) {
      plan.feasible = false;
      plan.reason = "policy '" + plan.policy + "' keeps " + format_bytes(mem[i]) +
                    " resident at op " + std::to_string(i) + " '" + g.ops[i].name +
                    "', over the budget of " + format_bytes(plan.budget_bytes) + " by " +
                    format_bytes(mem[i] - plan.budget_bytes);
      break;
    }
  }
}

namespace {

// Activations that wait from a forward use to a backward use: (tensor, gap).
std::vector<Gap> forward_to_backward_gaps(const Graph& g, std::uint64_t min_bytes) {
  Liveness l = analyze_liveness(g);
  std::vector<Gap> out;
  for (const Gap& gp : idle_gaps(g, l, std::max<std::uint64_t>(min_bytes, 1))) {
    if (gp.wraps || gp.dead || g.tensors[gp.tensor].kind != TensorKind::Activation) continue;
    if (g.ops[std::size_t(gp.from)].phase == Phase::Forward &&
        g.ops[std::size_t(gp.to)].phase == Phase::Backward)
      out.push_back(gp);
  }
  return out;
}

// The first op of the backward layer that runs just before the layer of op `use`.
std::int64_t one_layer_ahead(const Graph& g, std::int64_t use) {
  const int layer = g.ops[std::size_t(use)].layer;
  if (layer < 0) return use - 1;
  std::int64_t i = use;
  while (i > 0 && g.ops[std::size_t(i - 1)].layer == layer &&
         g.ops[std::size_t(i - 1)].phase == Phase::Backward)
    --i;
  if (i == 0 || g.ops[std::size_t(i - 1)].phase != Phase::Backward) return i;
  const int prev = g.ops[std::size_t(i - 1)].layer;
  --i;
  while (i > 0 && g.ops[std::size_t(i - 1)].layer == prev &&
         g.ops[std::size_t(i - 1)].phase == Phase::Backward)
    --i;
  return i;
}

Plan threshold_plan(const Graph& g, const PlannerOptions& o, std::uint64_t threshold,
                    const std::vector<Gap>& gaps) {
  std::vector<Swap> swaps;
  for (const Gap& gp : gaps) {
    if (g.tensors[gp.tensor].bytes < threshold) continue;
    std::int64_t p = std::max(gp.from + 1, gp.to - std::int64_t(o.threshold_lookahead_ops));
    swaps.push_back({gp.tensor, gp.from, p, gp.to});
  }
  Plan plan = Plan::from_swaps("threshold", o.budget, g.ops.size(), std::move(swaps));
  judge_plan(g, plan);
  return plan;
}

}  // namespace

Plan plan_vdnn(const Graph& g, const PlannerOptions& o) {
  std::vector<Swap> swaps;
  for (const Gap& gp : forward_to_backward_gaps(g, o.min_swap_bytes)) {
    std::int64_t p = std::max(gp.from + 1, one_layer_ahead(g, gp.to));
    swaps.push_back({gp.tensor, gp.from, p, gp.to});
  }
  Plan plan = Plan::from_swaps("vdnn", o.budget, g.ops.size(), std::move(swaps));
  judge_plan(g, plan);
  return plan;
}

Plan plan_threshold(const Graph& g, const PlannerOptions& o) {
  SPILL_EXPECTS(o.threshold_lookahead_ops >= 1, "threshold policy: lookahead must be >= 1 op");
  std::vector<Gap> gaps = forward_to_backward_gaps(g, o.min_swap_bytes);
  if (o.threshold_bytes > 0) return threshold_plan(g, o, o.threshold_bytes, gaps);
  // Automatic: the largest threshold that fits (fewest bytes moved), else the smallest.
  std::set<std::uint64_t, std::greater<>> sizes;
  for (const Gap& gp : gaps) sizes.insert(g.tensors[gp.tensor].bytes);
  Plan none = threshold_plan(g, o, std::numeric_limits<std::uint64_t>::max(), gaps);
  if (none.feasible || sizes.empty()) return none;
  Plan last;
  for (std::uint64_t s : sizes) {
    last = threshold_plan(g, o, s, gaps);
    if (last.feasible) return last;
  }
  return last;
}

Plan plan_none(const Graph& g, const PlannerOptions& o) {
  Plan plan = Plan::from_swaps("none", o.budget, g.ops.size(), {});
  judge_plan(g, plan);
  return plan;
}

Plan make_plan(Policy p, const Graph& g, const std::vector<double>& op_times,
               const LinkModel& link, const PlannerOptions& o) {
  switch (p) {
    case Policy::Spill: return plan_spill(g, op_times, link, o);
    case Policy::Vdnn: return plan_vdnn(g, o);
    case Policy::Threshold: return plan_threshold(g, o);
    case Policy::None: return plan_none(g, o);
  }
  return plan_none(g, o);
}

}  // namespace spill::graph

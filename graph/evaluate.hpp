// One-call evaluation of a policy on a graph (plan + simulation + the unlimited-memory
// reference) and the search for the largest batch that fits with bounded overhead. Shared by
// `spill plan`, the benchmarks and the published-result checks. All numbers are simulated.
#pragma once

#include <functional>
#include <optional>

#include "graph/device_model.hpp"
#include "graph/planner.hpp"
#include "graph/simulator.hpp"

namespace spill::graph {

struct PolicyResult {
  Policy policy = Policy::None;
  Plan plan;
  SimResult sim;
  double unlimited_step_time_s = 0;  // same device, memory never a constraint
  bool feasible = false;             // planned and simulated memory stay within the budget
  double overhead() const { return sim.step_time_s / unlimited_step_time_s - 1.0; }
};

PolicyResult evaluate_policy(Policy p, const Graph& g, const GpuModel& gpu, const LinkModel& link,
                             const PlannerOptions& o, bool record_timeline = false);

// The largest batch in [1, max_batch] for which `build(batch)` is feasible under `p` with
// overhead at most `max_overhead` (0.1 = 10%); nullopt when even batch 1 is not. Assumes
// feasibility falls with the batch (doubling, then bisection). `capped`: every batch tried fit,
// so the largest is only known to be at least `batch` (the search stops at max_batch).
struct BatchSearch {
  int batch = 0;
  PolicyResult result;
  bool capped = false;
};
std::optional<BatchSearch> find_max_batch(const std::function<Graph(int)>& build, Policy p,
                                          const GpuModel& gpu, const LinkModel& link,
                                          const PlannerOptions& o, double max_overhead,
                                          int max_batch = 1 << 14);

}  // namespace spill::graph

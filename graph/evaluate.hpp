// One-call evaluation of a policy on a graph (plan + simulation + the unlimited-memory
// reference) and the search for the largest batch that fits with bounded overhead. Shared by
// `spill plan`, the benchmarks and the published-result checks. All numbers are simulated.
#pragma once

#include <functional>
#include <limits>
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
  // A step with no compute time (every op 0 s) has no overhead unless the plan adds time.
  double overhead() const {
    if (unlimited_step_time_s > 0) return sim.step_time_s / unlimited_step_time_s - 1.0;
    return sim.step_time_s > 0 ? std::numeric_limits<double>::infinity() : 0.0;
  }
};

PolicyResult evaluate_policy(Policy p, const Graph& g, const GpuModel& gpu, const LinkModel& link,
                             const PlannerOptions& o, bool record_timeline = false);

// The least step time that any plan meeting `budget` by swapping alone (no recomputation)
// can reach on this link, a lower bound for every policy. At an op k, what the budget cannot
// hold beside the op's own bytes and workspace is absent. Of the bytes made during the step
// and live there (`Liveness`), the excess Out(k) went out over D2H since the step began; of
// those (but the ones held to the step's end past their last use, which need not come back)
// and the bytes from before the step that a later op uses, the excess Back(k) comes in over
// H2D before the step ends. With C(k) the compute before op k and C the step's compute:
//   step >= max(C(k), Out(k) / d2h) + max(C - C(k), Back(k) / h2d).
// Optimistic everywhere else (each direction at full bandwidth, both at once, no latency;
// tensors from before the step go out for free and may be absent when the step begins), so
// no plan beats it. nullopt when an op's working set alone exceeds the budget.
struct SwapFloor {
  double step_s = 0;            // the bound (the step's compute when no stall is forced)
  OpIndex op = 0;               // the op that sets it
  std::uint64_t must_move = 0;  // Out(k) there: bytes made in the step that must be out
  std::uint64_t must_fetch = 0;  // Back(k) there: bytes that must still come in
};
std::optional<SwapFloor> swap_floor(const Graph& g, const std::vector<double>& op_times,
                                    const LinkModel& link, std::uint64_t budget);

// The largest batch in [1, max_batch] for which `build(batch)` is feasible under `p` with
// overhead at most `max_overhead` (0.1 = 10%); nullopt when no batch tried is. Assumes that
// fitting the memory falls with the batch, not the overhead (doubling up to the first batch
// that does not fit, then bisection after the largest that passed). `capped`: every batch tried
// fit, so the largest is only known to be at least `batch` (the search stops at max_batch).
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

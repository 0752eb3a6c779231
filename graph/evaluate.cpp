#include "graph/evaluate.hpp"

namespace spill::graph {

PolicyResult evaluate_policy(Policy p, const Graph& g, const GpuModel& gpu, const LinkModel& link,
                             const PlannerOptions& o, bool record_timeline) {
  PolicyResult r;
  r.policy = p;
  std::vector<double> times = op_times_s(g, gpu);
  r.plan = make_plan(p, g, times, link, o);
  r.sim = simulate(g, times, link, &r.plan, {o.budget, record_timeline});
  r.unlimited_step_time_s = r.sim.compute_time_s;  // no stalls: the sum of op times
  r.feasible = r.plan.feasible && r.sim.within_budget;
  return r;
}

std::optional<BatchSearch> find_max_batch(const std::function<Graph(int)>& build, Policy p,
                                          const GpuModel& gpu, const LinkModel& link,
                                          const PlannerOptions& o, double max_overhead,
                                          int max_batch) {
  auto try_batch = [&](int b) -> std::optional<PolicyResult> {
    PolicyResult r = evaluate_policy(p, build(b), gpu, link, o);
    if (r.feasible && r.overhead() <= max_overhead) return r;
    return std::nullopt;
  };
  auto first = try_batch(1);
  if (!first) return std::nullopt;
  BatchSearch best{1, std::move(*first)};
  int bad = 0;
  for (int b = 2; b <= max_batch; b *= 2) {
    auto r = try_batch(b);
    if (!r) {
      bad = b;
      break;
    }
    best = {b, std::move(*r)};
  }
  if (bad == 0) {  // fits up to the cap
    best.capped = true;
    return best;
  }
  int lo = best.batch, hi = bad;  // lo fits, hi does not
  while (hi - lo > 1) {
    int mid = lo + (hi - lo) / 2;
    if (auto r = try_batch(mid)) {
      lo = mid;
      best = {mid, std::move(*r)};
    } else {
      hi = mid;
    }
  }
  return best;
}

}  // namespace spill::graph

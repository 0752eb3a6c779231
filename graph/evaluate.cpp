#include "graph/evaluate.hpp"

#include <algorithm>

#include "core/errors.hpp"
#include "graph/liveness.hpp"

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

std::optional<SwapFloor> swap_floor(const Graph& g, const std::vector<double>& op_times,
                                    const LinkModel& link, std::uint64_t budget) {
  SPILL_EXPECTS(op_times.size() == g.ops.size(), "swap_floor: " +
                                                     std::to_string(op_times.size()) +
                                                     " op times for " +
                                                     std::to_string(g.ops.size()) + " ops");
  SPILL_EXPECTS(link.h2d_gbps > 0 && link.d2h_gbps > 0,
                "swap_floor: link '" + link.name + "' has no bandwidth");
  if (g.ops.empty()) return std::nullopt;  // nothing runs, nothing to bound
  const Liveness l = analyze_liveness(g);
  const std::size_t n = g.ops.size();
  // Per op (difference arrays): bytes made in the step and live there, and bytes of tensors
  // that existed at the step's start and are used after it.
  // Of the bytes made in the step and held to its end, past their last use: `dead_delta`, those
  // that may be out there and never need to come back; `kept_delta`, those carried over to the
  // next step, which no plan moves there: resident as `others` are, not among the bytes made.
  std::vector<std::int64_t> made_delta(n + 1, 0), later_delta(n + 1, 0), dead_delta(n + 1, 0),
      kept_delta(n + 1, 0);
  for (std::size_t t = 0; t < g.tensors.size(); ++t) {
    const auto bytes = static_cast<std::int64_t>(g.tensors[t].bytes);
    if (exists_at_start(g.tensors[t].kind)) {
      if (!l.uses[t].empty()) {
        later_delta[0] += bytes;
        later_delta[l.uses[t].back()] -= bytes;
      }
      continue;
    }
    const Interval& iv = l.live[t];
    if (iv.first < 0) continue;
    made_delta[iv.first] += bytes;
    made_delta[iv.last + 1] -= bytes;
    if (g.tensors[t].held_to_step_end)
      (g.tensors[t].carried_over ? kept_delta : dead_delta)[l.uses[t].back() + 1] += bytes;
  }
  double total = 0;
  for (double t : op_times) total += t;
  SwapFloor best{total, 0, 0, 0};
  const double d2h = link.d2h_gbps * 1e9, h2d = link.h2d_gbps * 1e9;
  std::int64_t made = 0, later = 0, dead = 0, kept = 0;
  double before = 0;  // C(k)
  std::vector<TensorIndex> touched;
  auto excess = [&](std::uint64_t wanted, std::uint64_t room) {
    return wanted > room ? wanted - room : std::uint64_t{0};
  };
  for (std::size_t k = 0; k < n; ++k) {
    made += made_delta[k];
    later += later_delta[k];
    dead += dead_delta[k];
    kept += kept_delta[k];
    const Op& op = g.ops[k];
    op_tensors(op, touched);
    // The op's own bytes are resident; `others` are those of them (and its workspace) that
    // are not made in the step, `later_here` those of them counted in `later`.
    std::uint64_t working = op.workspace_bytes, others = op.workspace_bytes, later_here = 0;
    for (TensorIndex t : touched) {
      working += g.tensors[t].bytes;
      if (!exists_at_start(g.tensors[t].kind)) continue;
      others += g.tensors[t].bytes;
      if (l.uses[t].back() > k) later_here += g.tensors[t].bytes;
    }
    const auto stuck = static_cast<std::uint64_t>(kept);
    if (working > budget || stuck > budget - working) return std::nullopt;
    others += stuck;
    const auto movable = static_cast<std::uint64_t>(made - kept);
    // Made in the step and absent here: out since the step began.
    const std::uint64_t out = excess(movable, budget - others);
    // Absent here and needed later in the step (those made in it but dead ones, and tensors
    // from before the step that an op after this one uses): back before the step ends.
    const std::uint64_t back = excess(
        static_cast<std::uint64_t>(made - kept - dead + later) - later_here, budget - others);
    const double bound = std::max(before, static_cast<double>(out) / d2h) +
                         std::max(total - before, static_cast<double>(back) / h2d);
    if (bound > best.step_s) best = {bound, static_cast<OpIndex>(k), out, back};
    before += op_times[k];
  }
  return best;
}

std::optional<BatchSearch> find_max_batch(const std::function<Graph(int)>& build, Policy p,
                                          const GpuModel& gpu, const LinkModel& link,
                                          const PlannerOptions& o, double max_overhead,
                                          int max_batch) {
  // Whether a batch fits the memory falls with the batch; its overhead need not (a weight's
  // copies cost the same at every batch, its compute grows: a captured MLP's overhead was
  // 25.1% at batch 1 and 8.9% at 64). So the doubling goes on past batches whose overhead is
  // too high, and stops only at one that does not fit at all.
  bool stopped = false;  // by a batch that does not fit (else by max_batch)
  auto try_batch = [&](int b) -> std::optional<PolicyResult> {
    PolicyResult r = evaluate_policy(p, build(b), gpu, link, o);
    if (!r.feasible) stopped = true;
    if (r.feasible && r.overhead() <= max_overhead) return r;
    return std::nullopt;
  };
  std::optional<BatchSearch> best;
  int next = 0;  // the batch tried after the best one (0: none)
  for (int b = 1; b <= max_batch && !stopped; b = b > max_batch / 2 ? max_batch + 1 : b * 2) {
    if (auto r = try_batch(b)) {
      best = BatchSearch{b, std::move(*r)};
      next = 0;
    } else if (best && next == 0) {
      next = b;
    }
  }
  if (!best) return std::nullopt;
  if (next == 0) {  // the best is the last batch tried: the search ran into max_batch
    best->capped = true;
    return best;
  }
  int lo = best->batch, hi = next;  // lo fits, hi does not
  while (hi - lo > 1) {
    int mid = lo + (hi - lo) / 2;
    if (auto r = try_batch(mid)) {
      lo = mid;
      best = BatchSearch{mid, std::move(*r)};
    } else {
      hi = mid;
    }
  }
  return best;
}

}  // namespace spill::graph

#include "train/predict.hpp"

#include <ctime>
#include <numeric>

#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"
#include "device/sim_device.hpp"
#include "graph/device_model.hpp"
#include "graph/liveness.hpp"
#include "train/small_pool.hpp"

namespace spill::train {
namespace {

double process_cpu_s() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

}  // namespace

std::uint64_t mapped_bytes(std::uint64_t bytes, std::uint64_t granularity,
                           std::uint64_t small_limit) {
  const std::uint64_t to = bytes <= small_limit ? kSmallRound : std::max<std::uint64_t>(granularity, 1);
  return (bytes + to - 1) / to * to;
}

kernels::Roofline make_roofline(const graph::GpuModel& m) {
  kernels::Roofline r;
  r.flops_per_s = m.peak_flops(graph::DType::F32) * m.compute_efficiency;
  r.bytes_per_s = m.mem_bw_gbps * 1e9 * m.memory_efficiency;
  r.launch_s = m.op_overhead_us * 1e-6;
  return r;
}

graph::StepModel steady_state(const Program& p, const graph::Graph& g) {
  const graph::Liveness live = graph::analyze_liveness(g);
  graph::StepModel model{2, {}};
  for (std::size_t t = 0; t < g.tensors.size(); ++t)
    if (p.tensors[t].kind == graph::TensorKind::Input && !live.uses[t].empty())
      model.uploads.push_back({graph::TensorIndex(t), p.tensors[t].bytes});
  return model;
}

PlannerBudget planner_budget(const graph::Graph& g, std::uint64_t budget,
                             std::uint64_t granularity, std::uint64_t small_limit) {
  // Large blocks are whole granules, small-pool segments whole kSmallSegments: the allocator
  // maps multiples of their gcd.
  const std::uint64_t quantum = std::gcd<std::uint64_t>(std::max<std::uint64_t>(granularity, 1),
                                                        kSmallSegment);
  const SmallPoolUse use = small_pool_use(g, small_limit, kSmallSegment);
  PlannerBudget b;
  b.quantum = quantum;
  b.mappable = budget - budget % quantum;
  b.small_reserve = small_pool_reserve(use, b.mappable, quantum);
  b.planner = b.mappable > b.small_reserve ? b.mappable - b.small_reserve : 0;
  b.unswapped_peak = use.mapped;
  return b;
}

std::string in_budget(std::uint64_t budget, std::uint64_t mappable, std::uint64_t granularity,
                      std::uint64_t reserve) {
  std::string s = "in a budget of " + format_bytes(budget) + " (";
  if (mappable < budget)
    s += format_bytes(mappable) + " of it mappable in whole " + format_bytes(granularity) +
         " granules, ";
  return s + format_bytes(reserve) + " of it kept for the small pool's segments)";
}

graph::SimOptions prediction_options(std::uint64_t budget, const graph::StepModel& model,
                                     std::uint64_t small_limit) {
  return {budget, false, model, {small_limit, kSmallSegment}, /*swapper_rules=*/true};
}

Prediction predict(const Program& p, const PredictOptions& o) {
  Prediction r;
  r.gpu = &graph::gpu_preset(o.device);
  r.link = o.link_model ? *o.link_model : graph::resolve_link(o.link);
  SPILL_EXPECTS(o.granularity > 0, "predict: the granularity must be above zero");
  const kernels::Roofline roofline = make_roofline(*r.gpu);
  // The kernels only record their costs here; a small simulated device hosts them.
  SimOptions so;
  so.capacity = 64ull << 20;
  so.granularity = o.granularity;
  SimDevice costing(so);
  std::unique_ptr<kernels::Kernels> k = kernels::make_kernels(costing, {roofline});
  const std::uint64_t small_limit = small_limit_for(o.swap_threshold);
  auto sizes = [&](std::uint64_t b) { return mapped_bytes(b, o.granularity, small_limit); };
  r.graph = to_graph(p, *k, roofline, sizes);
  const graph::Graph& g = r.graph;
  r.footprint = graph::analyze_liveness(g).peak;
  r.budget = o.budget ? *o.budget : r.footprint / 3;
  SPILL_EXPECTS(r.budget > 0, "predict: the budget must be above zero");
  std::vector<double> times;
  for (const graph::Op& op : g.ops) times.push_back(*op.time_s);
  const graph::StepModel model = steady_state(p, g);
  const graph::SimOptions sim = prediction_options(r.budget, model, small_limit);
  graph::SimOptions unlimited = sim;
  unlimited.budget = std::numeric_limits<std::uint64_t>::max();
  r.unlimited = graph::simulate(g, times, r.link, nullptr, unlimited);

  graph::PlannerOptions po;
  const PlannerBudget shares = planner_budget(g, r.budget, o.granularity, small_limit);
  r.unswapped_peak = shares.unswapped_peak;
  r.planner_budget = shares.planner;
  po.budget = r.planner_budget;
  po.min_swap_bytes = min_movable_request(o.swap_threshold, o.granularity);
  po.model = model;
  const graph::BudgetCheck check = graph::check_budget(g, po);
  if (!check.feasible)
    throw InvalidArgument("'" + p.name + "' cannot train " +
                          in_budget(r.budget, shares.mappable, o.granularity,
                                    shares.small_reserve) +
                          ": " +
                          check.message);
  const double cpu0 = process_cpu_s();
  po.recompute = false;
  r.swap_plan = graph::plan_spill(g, times, r.link, po);
  if (o.recompute) {
    po.recompute = true;
    r.plan = graph::plan_spill(g, times, r.link, po);
  } else {
    r.plan = r.swap_plan;
  }
  r.plan_cpu_s = process_cpu_s() - cpu0;
  graph::check_plan(g, r.swap_plan);
  graph::check_plan(g, r.plan);
  r.swap_only = graph::simulate(g, times, r.link, &r.swap_plan, sim);
  graph::SimOptions chosen = sim;
  chosen.record_timeline = o.timeline;
  r.predicted = graph::simulate(g, times, r.link, &r.plan, chosen);
  r.floor = graph::swap_floor(g, times, r.link, r.planner_budget);
  return r;
}

std::vector<PhaseTime> phase_times(const graph::Graph& g, const graph::SimResult& r) {
  using Kind = graph::TimelineEvent::Kind;
  // Phase of each op: 0 forward (and anything before the first backward op), 1 backward (to
  // the last backward op, the updates done among them included), 2 what follows.
  std::vector<int> phase(g.ops.size(), 0);
  std::size_t first = g.ops.size(), last = 0;
  for (std::size_t i = 0; i < g.ops.size(); ++i)
    if (g.ops[i].phase == graph::Phase::Backward) {
      first = std::min(first, i);
      last = i;
    }
  for (std::size_t i = first; i < g.ops.size(); ++i) phase[i] = i <= last ? 1 : 2;
  std::vector<PhaseTime> out(3);
  out[0].name = "forward";
  out[1].name = "backward";
  out[2].name = "optimizer";
  std::vector<double> end(3, 0.0);
  for (const graph::TimelineEvent& e : r.timeline)
    if (e.kind == Kind::Compute && e.op >= 0) {
      const int ph = phase[std::size_t(e.op)];
      end[std::size_t(ph)] = std::max(end[std::size_t(ph)], e.end_s);
    }
  for (int ph = 1; ph < 3; ++ph) end[std::size_t(ph)] = std::max(end[std::size_t(ph)], end[std::size_t(ph - 1)]);
  auto overlap = [](double a, double b, double lo, double hi) {
    return std::max(0.0, std::min(b, hi) - std::max(a, lo));
  };
  for (int ph = 0; ph < 3; ++ph) {
    const double lo = ph == 0 ? 0.0 : end[std::size_t(ph - 1)], hi = end[std::size_t(ph)];
    PhaseTime& t = out[std::size_t(ph)];
    t.span_s = hi - lo;
    for (const graph::TimelineEvent& e : r.timeline) {
      const bool mine = e.op >= 0 && std::size_t(e.op) < phase.size() && phase[std::size_t(e.op)] == ph;
      switch (e.kind) {
        case Kind::Compute: if (mine) t.compute_s += e.end_s - e.start_s; break;
        case Kind::Recompute:
          if (mine) {
            t.recompute_s += e.end_s - e.start_s;
            ++t.recomputes;
            t.recomputed_bytes += e.bytes;
          }
          break;
        case Kind::Stall: if (mine) t.stall_s += e.end_s - e.start_s; break;
        case Kind::SwapIn:
        case Kind::Upload:
          t.h2d_busy_s += overlap(e.start_s, e.end_s, lo, hi);
          if (mine && e.kind == Kind::SwapIn) t.bytes_in += e.bytes;
          break;
        case Kind::SwapOut:
          t.d2h_busy_s += overlap(e.start_s, e.end_s, lo, hi);
          if (mine) t.bytes_out += e.bytes;
          break;
      }
    }
  }
  return out;
}

}  // namespace spill::train

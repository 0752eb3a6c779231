// How the executor plans a step at a budget, shared with a prediction made without a device
// (`spill train MODEL --predict --device PRESET --link PRESET`): the planner's budget is the
// runtime's rounded down to whole granules (planner_budget) less the small pool's segment
// slack (small_pool_reserve, train/small_pool.hpp: the most its segments hold beyond the small
// tensors at an op whose unswapped step passes the budget, less what whole granules leave
// free), candidates are
// scored in the steady state (two steps back to back, the inputs uploaded first), and the
// prediction simulates the memory the allocator maps (small tensors in whole segments) with the
// swapper's rules. A prediction for a GPU preset times the kernels by that preset's roofline
// (as the executor's first plan on that GPU does, before it measures op times) and sizes the
// tensors as the caching allocator maps them with a 2 MiB granule.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/link_model.hpp"
#include "graph/evaluate.hpp"
#include "graph/planner.hpp"
#include "graph/simulator.hpp"
#include "kernels/kernels.hpp"
#include "train/program.hpp"

namespace spill::train {

// What the caching allocator maps for a request of `bytes` (allocator/caching_allocator.hpp):
// small requests (at most `small_limit`) rounded to 512 B, larger ones to whole granules.
std::uint64_t mapped_bytes(std::uint64_t bytes, std::uint64_t granularity,
                           std::uint64_t small_limit);

// The kernel roofline of a GPU preset (graph/device_model.hpp): FP32 peak and memory bandwidth
// times their assumed efficiencies, plus the per-op launch overhead.
kernels::Roofline make_roofline(const graph::GpuModel& m);

// Each step's input uploads (inputs in tensor order, their requested bytes) and two steps back
// to back: the steady state the executor runs in.
graph::StepModel steady_state(const Program& p, const graph::Graph& g);

// How a runtime `budget` is shared out for the planner (the executor's and a prediction's).
struct PlannerBudget {
  // The bytes of the budget the caching allocator can map: a whole number of granules (its
  // large blocks are whole granules, its small-pool segments too); the rest can never be used,
  // so the planner must not count it.
  std::uint64_t mappable = 0;
  std::uint64_t quantum = 0;         // what it maps in: gcd(granule, small-pool segment)
  std::uint64_t small_reserve = 0;   // kept for the small pool's segments (small_pool_reserve)
  std::uint64_t planner = 0;         // mappable less small_reserve (0 when that takes it all)
  std::uint64_t unswapped_peak = 0;  // mapped with nothing swapped (SmallPoolUse::mapped)
};
PlannerBudget planner_budget(const graph::Graph& g, std::uint64_t budget,
                             std::uint64_t granularity, std::uint64_t small_limit);
// "in a budget of B (M of it mappable in whole G granules, R of it kept for the small pool's
// segments)" for a refusal's message (the mappable part only when M < B).
std::string in_budget(std::uint64_t budget, std::uint64_t mappable, std::uint64_t granularity,
                      std::uint64_t reserve);

// The prediction's simulation options at the runtime's whole `budget`.
graph::SimOptions prediction_options(std::uint64_t budget, const graph::StepModel& model,
                                     std::uint64_t small_limit);

struct PredictOptions {
  std::string device = "h200";          // GPU preset: its roofline times the kernels
  std::string link = "pcie5";           // link preset or a `spill bench link --json` file
  std::optional<LinkModel> link_model;  // when set, used instead of `link`
  std::optional<std::uint64_t> budget;  // mapped bytes; default: a third of the footprint
  std::uint64_t granularity = 2ull << 20;
  std::uint64_t swap_threshold = 1ull << 20;  // as Config::swap_threshold
  bool recompute = true;  // the plan may remake (the swap-only plan is predicted as well)
  bool timeline = false;  // record the chosen plan's simulated timeline
};

struct Prediction {
  graph::Graph graph;
  const graph::GpuModel* gpu = nullptr;
  LinkModel link;
  std::uint64_t footprint = 0;       // the step's live tensors at their peak
  std::uint64_t unswapped_peak = 0;  // mapped with nothing swapped (SmallPoolUse::mapped)
  std::uint64_t budget = 0;          // the runtime's
  std::uint64_t planner_budget = 0;  // less the small pool's reserve
  graph::SimResult unlimited;        // no budget, no plan
  graph::Plan swap_plan;             // the planner with recomputation off
  graph::SimResult swap_only;
  graph::Plan plan;                  // the planner as `recompute` says (what policy graph runs)
  graph::SimResult predicted;
  std::optional<graph::SwapFloor> floor;  // of the step's ops at the planner's budget
  double plan_cpu_s = 0;                  // host CPU time spent planning (both plans)
};

// Where a simulated step's time goes, per phase (forward: ops before the first backward op;
// backward: up to the last backward op, updates among them included; optimizer: the rest). A phase runs from the end of
// the previous one's last op (the step's start for the first) to its own last op's end; the
// engines' busy time is what of their copies falls inside it. Needs a recorded timeline.
struct PhaseTime {
  std::string name;
  double span_s = 0;
  double compute_s = 0, recompute_s = 0, stall_s = 0;  // compute stream
  double h2d_busy_s = 0, d2h_busy_s = 0;               // copy engines within the span
  std::uint64_t bytes_in = 0, bytes_out = 0;           // copies issued at its ops
  std::uint32_t recomputes = 0;
  std::uint64_t recomputed_bytes = 0;
};
std::vector<PhaseTime> phase_times(const graph::Graph& g, const graph::SimResult& r);

// The plan and prediction of `p` on a GPU preset over a link, without running anything.
// Throws InvalidArgument naming the preset, the link or the op a budget cannot fit.
Prediction predict(const Program& p, const PredictOptions& o);

}  // namespace spill::train

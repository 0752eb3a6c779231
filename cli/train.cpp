// `spill train MODEL`: trains one of the reference models out-of-core on the default device.
// Per step it prints the loss, the peak of mapped bytes, bytes moved each way, stall and step
// time, demand fetches and prefetch hits, with the planner's predictions beside them (on the
// simulated device both are simulated time). The budget defaults to a third of the step's
// footprint. --check runs the same steps again with nothing swapped (policy none, with at least
// the run's budget) and requires bit-identical
// losses, weights and optimizer state. After the steps it prints the bytes moved before step 1
// (set-up), in the steps and after them (--check's read-back): a trace counts all three.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <optional>

#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "cli/options.hpp"
#include "core/errors.hpp"
#include "core/output_file.hpp"
#include "core/units.hpp"
#include "profiling/chrome_trace.hpp"
#include "profiling/events.hpp"
#include "graph/graph_json.hpp"
#include "train/models.hpp"
#include "train/predict.hpp"
#include "train/session.hpp"

namespace spill::cli {
namespace {

struct TrainArgs {
  std::string model;
  train::ModelOptions model_options;
  std::string budget;
  int steps = 10;
  std::string policy = "graph";
  bool check = false;
  bool no_recompute = false;
  int lag = 0;  // 0: the executor's default
  bool wait_every_op = false;
  std::string trace;
  std::string json;
  bool predict = false;  // plan and simulate on a GPU preset and link; run nothing
  std::string device = "h200";
  std::string link = "pcie5";
  std::string timeline;
  std::string plan_out;
};

// Whether the executor's prediction is of the run: policies lru and plan do not follow the
// graph planner's plan (the executor still makes one, swap-only), so its simulation predicts
// nothing they do (audit 40a #4).
bool predicts_the_run(train::Policy p) {
  return p == train::Policy::Graph || p == train::Policy::None;
}

nlohmann::json step_json(const train::StepStats& s, bool predicted) {
  nlohmann::json j = {{"step", s.step + 1},
          {"loss", s.loss},
          {"step_s", s.step_s},
          {"stall_s", s.stall_s},
          {"peak_mapped", s.peak_mapped},
          {"bytes_out", s.swaps.bytes_out},
          {"bytes_in", s.swaps.bytes_in},
          {"demand_fetches", s.swaps.demand_fetches},
          {"prefetch_hits", s.swaps.prefetch_hits},
          {"prefetch_late", s.swaps.prefetch_late},
          {"evictions_reactive", s.swaps.evictions_reactive},
          {"cache_returns", s.swaps.cache_returns},
          {"small_segment_frees", s.plain_frees},
          {"recomputes", s.recomputes},
          {"recomputed_bytes", s.recomputed_bytes},
          {"wall_s", s.wall_s},
          {"spill_s", s.spill_s},
          {"spill_cpu_s", s.spill_cpu_s},
          {"spill_vmm_cpu_s", s.spill_vmm_cpu_s},
          {"swap_out_wait_s", s.swaps.host_wait_s},
          {"prefetches_skipped", s.swaps.prefetches_skipped},
          {"op_waits", s.op_waits},
          {"alloc_waits", s.alloc_waits},
          {"alloc_wait_s", s.alloc_wait_s},
          {"cache_takeovers", s.cache_takeovers}};
  if (predicted) {
    j["predicted_step_s"] = s.predicted_step_s;
    j["predicted_stall_s"] = s.predicted_stall_s;
    j["predicted_peak"] = s.predicted_peak;
  }
  if (s.ops_s) j["ops_s"] = *s.ops_s;
  // The step's virtual-memory calls: {"map": {"calls": N, "s": host seconds}, ...}.
  const std::pair<const char*, const VmmCalls::Tally*> vmm[] = {
      {"reserve", &s.vmm.reserve}, {"create", &s.vmm.create},   {"map", &s.vmm.map},
      {"unmap", &s.vmm.unmap},     {"release", &s.vmm.release}, {"unreserve", &s.vmm.unreserve}};
  for (const auto& [name, t] : vmm) j["vmm"][name] = {{"calls", t->calls}, {"s", t->seconds}};
  if (!s.op_start_s.empty()) {
    j["op_start_s"] = s.op_start_s;
    j["op_end_s"] = s.op_end_s;
  }
  return j;
}

// Swaps outside the steps (set-up, read-back) and the run's: what the trace's events sum to.
nlohmann::json swaps_json(const SwapStats& s) {
  return {{"bytes_out", s.bytes_out},
          {"bytes_in", s.bytes_in},
          {"swap_outs", s.swap_outs},
          {"swap_ins", s.swap_ins},
          {"clean_evictions", s.clean_evictions},
          {"evictions_planned", s.evictions_planned},
          {"evictions_reactive", s.evictions_reactive},
          {"prefetches", s.prefetches},
          {"demand_fetches", s.demand_fetches}};
}

std::string ms(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2fms", s * 1e3);
  return b;
}

// The budget --budget gives (refused when zero), else the configuration's (budget:), if any.
std::optional<std::uint64_t> given_budget(const Config& config, const TrainArgs& a) {
  if (a.budget.empty()) return config.budget;
  const std::uint64_t budget = parse_size(a.budget, "--budget");
  SPILL_EXPECTS(budget > 0, "--budget: '" + a.budget + "' is not above zero bytes");
  return budget;
}

// `spill train MODEL --predict`: the plan policy graph would run on a GPU preset over a link and
// its simulated step, beside the unlimited step, the swap-only plan and the swap floor.
int run_predict(const Config& config, const TrainArgs& a) {
  const std::pair<const std::string*, const char*> outputs[] = {
      {&a.json, "--json"}, {&a.timeline, "--timeline"}, {&a.plan_out, "--plan-out"}};
  for (std::size_t i = 0; i < std::size(outputs); ++i) {
    if (outputs[i].first->empty()) continue;
    check_writable(*outputs[i].first, outputs[i].second);
    // Not the link file it reads (a measurement that took minutes), as `spill plan`.
    std::error_code ec;
    if (std::filesystem::is_regular_file(a.link, ec))
      check_not_same(*outputs[i].first, outputs[i].second, a.link, "the --link file");
    for (std::size_t j = 0; j < i; ++j)
      check_not_same(*outputs[i].first, outputs[i].second, *outputs[j].first, outputs[j].second);
  }
  train::Program program = train::build_model(a.model, a.model_options);
  train::PredictOptions po;
  po.device = a.device;
  po.link = a.link;
  po.budget = given_budget(config, a);
  po.swap_threshold = config.swap_threshold;
  po.recompute = !a.no_recompute;
  po.timeline = true;
  const train::Prediction r = train::predict(program, po);
  const graph::Graph& g = r.graph;
  const double unlimited = r.unlimited.step_time_s;
  auto ratio = [&](double s) {
    char b[64];
    std::snprintf(b, sizeof b, "%s (%.2fx)", ms(s).c_str(), s / unlimited);
    return std::string(b);
  };
  std::printf("model:     %s, %.2fM parameters, %zu ops per step (nothing runs: a prediction)\n",
              program.name.c_str(), double(program.parameters) / 1e6, program.ops.size());
  std::printf("device:    %s (simulated: its kernel roofline times the ops; tensors as the "
              "caching allocator maps them, %s granule)\n",
              r.gpu->name.c_str(), format_bytes(po.granularity).c_str());
  std::printf("link:      %s: %s, modelled %.1f GB/s h2d, %.1f GB/s d2h, duplex %.2f\n",
              printable_name(r.link.name).c_str(), printable_name(r.link.description).c_str(),
              r.link.h2d_gbps, r.link.d2h_gbps, r.link.duplex_efficiency);
  // The liveness peak, not a mapped figure: labelled so (audit 40a #18).
  std::printf("footprint: %s (the step's live tensors at their peak; %s mapped with nothing "
              "swapped)   budget: %s (%.2fx; the planner's %s, less the small "
              "pool's segments)\n",
              format_bytes(r.footprint).c_str(),
              format_bytes(r.unswapped_peak).c_str(), format_bytes(r.budget).c_str(),
              double(r.footprint) / double(r.budget), format_bytes(r.planner_budget).c_str());
  if (r.budget > r.gpu->memory_bytes)
    std::printf("note:      the budget is larger than the %s's %s: the prediction assumes "
                "memory the card does not have\n",
                r.gpu->name.c_str(), format_bytes(r.gpu->memory_bytes).c_str());
  std::printf("\n%-20s %18s %10s %10s %10s %10s  %s\n", "step (steady state)", "time", "stall",
              "out", "in", "peak", "remade (tensors, bytes, compute)");
  auto row = [&](const char* what, const graph::SimResult& s) {
    std::printf("%-20s %18s %10s %10s %10s %10s  %u, %s, %s\n", what, ratio(s.step_time_s).c_str(),
                ms(s.stall_time_s).c_str(), format_bytes(s.swapped_out_bytes).c_str(),
                format_bytes(s.swapped_in_bytes).c_str(), format_bytes(s.peak_bytes).c_str(),
                s.recomputes, format_bytes(s.recomputed_bytes).c_str(),
                ms(s.recompute_time_s).c_str());
  };
  row("unlimited memory", r.unlimited);
  row("swap only", r.swap_only);
  if (!a.no_recompute) {
    row("with recomputation", r.predicted);
    if (const std::size_t links = r.plan.chain_links())
      std::printf("%-20s %zu of the remakes are links of chains (remade early for a remake "
                  "that reads them)\n", "", links);
  }
  // The floor bounds the ops alone; the rows above also count the inputs' upload, so a ratio
  // to the unlimited step put it below that step (audit 40a #17): to the ops' compute instead.
  if (r.floor)
    std::printf("%-20s %9s (%.2fx the ops' compute, %s; the rows above also upload the "
                "inputs): no plan that only swaps does better at the planner's budget on this "
                "link%s\n",
                "floor (swap only)", ms(r.floor->step_s).c_str(),
                r.floor->step_s / r.unlimited.compute_time_s,
                ms(r.unlimited.compute_time_s).c_str(),
                a.no_recompute ? "" : "; a plan that recomputes is not bound by it");
  std::printf("\nwhere the %s step goes (phases split at the first and after the last backward "
              "op; engines busy within each):\n",
              a.no_recompute ? "swap-only" : "planned");
  std::printf("%-10s %10s %10s %10s %10s %10s %10s %10s %10s\n", "phase", "span", "compute",
              "remake", "stall", "h2d busy", "d2h busy", "in", "out");
  const std::vector<train::PhaseTime> phases = train::phase_times(g, r.predicted);
  nlohmann::json pj = nlohmann::json::array();
  for (const train::PhaseTime& ph : phases) {
    std::printf("%-10s %10s %10s %10s %10s %10s %10s %10s %10s\n", ph.name.c_str(),
                ms(ph.span_s).c_str(), ms(ph.compute_s).c_str(), ms(ph.recompute_s).c_str(),
                ms(ph.stall_s).c_str(), ms(ph.h2d_busy_s).c_str(), ms(ph.d2h_busy_s).c_str(),
                format_bytes(ph.bytes_in).c_str(), format_bytes(ph.bytes_out).c_str());
    pj.push_back({{"phase", ph.name}, {"span_s", ph.span_s}, {"compute_s", ph.compute_s},
                  {"recompute_s", ph.recompute_s}, {"stall_s", ph.stall_s},
                  {"h2d_busy_s", ph.h2d_busy_s}, {"d2h_busy_s", ph.d2h_busy_s},
                  {"bytes_in", ph.bytes_in}, {"bytes_out", ph.bytes_out},
                  {"recomputes", ph.recomputes}, {"recomputed_bytes", ph.recomputed_bytes}});
  }
  std::printf("planning: %.2f s of CPU for both plans (this machine)\n", r.plan_cpu_s);
  std::printf("(all step figures simulated: %s roofline, %s link model)\n", r.gpu->name.c_str(),
              printable_name(r.link.name).c_str());
  auto sim_json = [](const graph::SimResult& s) {
    return nlohmann::json{{"step_s", s.step_time_s},          {"stall_s", s.stall_time_s},
                          {"compute_s", s.compute_time_s},    {"peak_bytes", s.peak_bytes},
                          {"peak_host_bytes", s.peak_host_bytes},
                          {"bytes_out", s.swapped_out_bytes}, {"bytes_in", s.swapped_in_bytes},
                          {"recomputes", s.recomputes},       {"recomputed_bytes", s.recomputed_bytes},
                          {"recompute_s", s.recompute_time_s}};
  };
  if (!a.json.empty()) {
    nlohmann::json doc = {{"format", "spill-train-predict"},
                          {"version", 1},
                          {"model", a.model},
                          {"device", r.gpu->name},
                          {"link", r.link.name},
                          {"simulated", true},
                          {"footprint", r.footprint},
                          {"budget", r.budget},
                          {"planner_budget", r.planner_budget},
                          {"unlimited", sim_json(r.unlimited)},
                          {"swap_only", sim_json(r.swap_only)},
                          {"planned", sim_json(r.predicted)},
                          {"phases", pj}};
    if (r.floor) doc["floor_step_s"] = r.floor->step_s;
    write_file(a.json, doc.dump(1) + "\n", "--json");
    std::printf("prediction written to %s\n", output_name(a.json).c_str());
  }
  if (!a.timeline.empty()) {
    write_file(a.timeline, graph::timeline_to_json(g, r.predicted).dump(1) + "\n", "--timeline");
    std::printf("timeline written to %s\n", output_name(a.timeline).c_str());
  }
  if (!a.plan_out.empty()) {
    write_file(a.plan_out, graph::plan_to_json(g, r.plan).dump(1) + "\n", "--plan-out");
    std::printf("plan written to %s\n", output_name(a.plan_out).c_str());
  }
  return 0;
}

int run_train(Config config, const TrainArgs& a) {
  // The trainer reads step times in simulated time (sim_queries:simulated); with time_scale
  // the host's clock paces the simulated one, so the host's CPU kernels (divided by the
  // scale) would enter every simulated step and stall (audit 40a #10).
  if (config.time_scale > 0) {
    char scale[32];
    std::snprintf(scale, sizeof scale, "%g", config.time_scale);
    throw InvalidArgument(std::string("time_scale: spill train's step times are simulated; "
                                      "time_scale:") + scale +
                          " would add this machine's kernel time to them (leave it at 0)");
  }
  if (!a.trace.empty()) check_writable(a.trace, "--trace");
  if (!a.json.empty()) check_writable(a.json, "--json");
  check_not_same(a.json, "--json", a.trace, "--trace");
  const train::Policy policy = train::parse_policy(a.policy);
  std::optional<std::uint64_t> budget = given_budget(config, a);
  train::Program program = train::build_model(a.model, a.model_options);
  const std::uint64_t footprint = train::footprint(config, program);
  // Default: a third of the footprint; with policy none (nothing can move), no budget.
  if (!budget && policy != train::Policy::None) budget = footprint / 3;
  const bool default_budget = budget && a.budget.empty() && !config.budget;
  // --check's reference run: policy none with the allocator's default budget (the device's
  // free memory less a reserve), raised to this run's budget where that is larger (a budget
  // may go up to the device's whole memory): the run it checks must never get more memory than
  // its reference (audit 40a #5).
  std::optional<std::uint64_t> reference_budget;
  if (a.check) {
    // The reference run must fit the device: found out before the steps, not after them as an
    // error about a policy and budget nobody gave.
    Config unlimited = config;
    unlimited.budget.reset();
    unlimited.policy = SwapPolicy::None;
    std::uint64_t default_budget_bytes = 0;
    try {
      {
        Runtime rt(unlimited);
        default_budget_bytes = rt.allocator().budget();
      }
      if (budget && *budget > default_budget_bytes) reference_budget = budget;
      unlimited.budget = reference_budget;
      Runtime rt(unlimited);
      train::ExecOptions eo;
      eo.policy = train::Policy::None;
      train::Executor probe(rt, program, eo);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(
          "--check: the run to compare with (policy none, nothing swapped, in " +
          std::string(reference_budget ? "this run's budget, larger than the device's default"
                                       : "the device's default budget, its free memory less a "
                                         "reserve") +
          ") cannot run on this device: " + e.what());
    }
  }
  // The trace is taken from the recorder after every step, not only at the end: its rings
  // hold 65,536 events per thread, which a long run overflows (audit 40a #3).
  auto& rec = profiling::TraceRecorder::global();
  rec.set_enabled(!a.trace.empty());
  rec.collect();
  const std::uint64_t dropped_before = rec.dropped();
  std::vector<profiling::TraceEvent> trace_events;
  auto take_trace = [&] {
    if (a.trace.empty()) return;
    std::vector<profiling::TraceEvent> more = rec.collect();
    trace_events.insert(trace_events.end(), more.begin(), more.end());
  };
  std::uint64_t trace_dropped = 0;

  train::RunOptions ro;
  ro.policy = policy;
  ro.budget = budget;
  ro.steps = a.steps;
  ro.keep_state = a.check;
  ro.exec.recompute = !a.no_recompute;
  ro.exec.lag = a.lag;
  if (a.wait_every_op) ro.exec.wait_every_op = true;
  bool simulated = true;
  std::string device_name;
  bool started = false;
  auto on_start = [&](const train::Executor& ex, Runtime& rt) {
    started = true;
    take_trace();  // the set-up's events
    const DeviceInfo& d = rt.device().info();
    simulated = d.simulated;
    device_name = d.name;
    const graph::SimResult& p = ex.prediction();
    std::printf("%s\n", rt.device_reason().c_str());
    std::printf("device:    %s (%s)\n", d.name.c_str(),
                d.simulated ? "simulated: times are simulated (kernel roofline, link model)"
                            : "times measured on the GPU");
    std::printf("kernels:   %s\n", ex.kernels_name().c_str());
    std::printf("model:     %s, %.2fM parameters, %zu ops per step\n", program.name.c_str(),
                double(program.parameters) / 1e6, program.ops.size());
    // The liveness peak, not a mapped figure: labelled so (audit 40a #18).
    std::printf("footprint: %s (the step's live tensors at their peak; %s mapped with nothing "
                "swapped)   budget: %s (%.2fx)   policy: %s\n",
                format_bytes(footprint).c_str(),
                format_bytes(ex.unswapped_peak()).c_str(),
                format_bytes(ex.budget()).c_str(), double(footprint) / double(ex.budget()),
                train::to_string(policy));
    if (!predicts_the_run(policy))
      std::printf("plan:      none: policy %s moves blocks as the allocator needs room, so "
                  "the (pred) columns are empty; for comparison, policy graph's swap-only plan "
                  "at this budget would be:\n",
                  train::to_string(policy));
    std::printf("%s%zu swaps, %zu recomputes (%zu early as links of chains; %s, %s); "
                "predicted peak %s (%s on the host), out %s, in %s per step, step %s (compute "
                "%s, stall %s)\n",
                predicts_the_run(policy) ? "plan:      " : "graph:     ",
                ex.plan().swaps.size(), ex.plan().recomputes.size(), ex.plan().chain_links(),
                format_bytes(p.recomputed_bytes).c_str(), ms(p.recompute_time_s).c_str(),
                format_bytes(ex.predicted_peak()).c_str(), format_bytes(p.peak_host_bytes).c_str(),
                format_bytes(p.swapped_out_bytes).c_str(), format_bytes(p.swapped_in_bytes).c_str(),
                ms(p.step_time_s).c_str(), ms(p.compute_time_s).c_str(), ms(p.stall_time_s).c_str());
    if (const auto& f = ex.floor()) {
      std::printf("floor:     %s for the step's ops alone (compute %s; the steps also upload "
                  "their inputs): no plan that only swaps does better at this budget on this "
                  "link%s\n",
                  ms(f->step_s).c_str(), ms(p.compute_time_s).c_str(),
                  ex.plan().recomputes.empty() ? "" : " (this plan also recomputes: not bound by it)");
    }
    std::printf("\n%4s %10s %11s %11s %10s %10s %9s %9s %10s %10s %6s %5s %7s\n", "step", "loss",
                "peak", "(pred)", "out", "in", "stall", "(pred)", "step", "(pred)", "demand",
                "hits", "wall");
    // Before the steps run: with stdout redirected, an error in step 1 (on stderr) otherwise
    // came before the header in the log (audit 40a #8).
    std::fflush(stdout);
  };
  std::uint64_t peak = 0;
  train::RunResult run;
  const bool predicted = predicts_the_run(policy);
  auto on_step = [&](const train::StepStats& s) {
    take_trace();
    peak = std::max(peak, s.peak_mapped);
    auto pred = [predicted](std::string text) { return predicted ? text : std::string("-"); };
    std::printf("%4d %10.6f %11s %11s %10s %10s %9s %9s %10s %10s %6llu %5llu %6.1fs\n",
                s.step + 1, double(s.loss), format_bytes(s.peak_mapped).c_str(),
                pred(format_bytes(s.predicted_peak)).c_str(), format_bytes(s.swaps.bytes_out).c_str(),
                format_bytes(s.swaps.bytes_in).c_str(), ms(s.stall_s).c_str(),
                pred(ms(s.predicted_stall_s)).c_str(), ms(s.step_s).c_str(),
                pred(ms(s.predicted_step_s)).c_str(),
                static_cast<unsigned long long>(s.swaps.demand_fetches),
                static_cast<unsigned long long>(s.swaps.prefetch_hits), s.wall_s);
    std::fflush(stdout);
  };
  auto on_end = [&](Runtime& rt) {
    if (a.trace.empty()) return;
    rt.device().synchronize();
    take_trace();  // counts its drops
    // The pieces taken after each step, in the order collect() gives each (events still in
    // flight at a step's end, such as copies, came in a later piece).
    std::stable_sort(trace_events.begin(), trace_events.end(),
                     [](const profiling::TraceEvent& x, const profiling::TraceEvent& y) {
                       return x.time_ns != y.time_ns ? x.time_ns < y.time_ns : x.order < y.order;
                     });
    trace_dropped = rec.dropped() - dropped_before;
    nlohmann::json meta = {{"command", "spill train " + a.model},
                           {"budget_bytes", rt.allocator().budget()},
                           {"policy", a.policy},
                           {"dropped_events", trace_dropped}};
    // Begun before the runtimes: nothing before it, unless events were lost (then the report
    // infers a baseline rather than trust one that the missing events contradict).
    if (trace_dropped == 0) meta["baseline"] = profiling::zero_baseline();
    profiling::write_chrome_trace(a.trace, trace_events,
                                  [&rec](std::uint32_t t) { return rec.tag_name(t); }, meta,
                                  "--trace");
  };
  try {
    run = train::run_training(config, program, ro, on_start, on_step, on_end);
  } catch (const InvalidArgument& e) {
    // What refuses a budget (the device, the planner) does not know the user gave none.
    if (!default_budget || started) throw;
    throw InvalidArgument(std::string(e.what()) + " (the default budget: a third of the step's " +
                          format_bytes(footprint) + " footprint; give --budget)");
  }
  bool ok = peak <= run.budget;
  std::printf("\nloss %.6f -> %.6f over %d steps; peak mapped %s of the %s budget%s\n",
              double(run.steps.front().loss), double(run.steps.back().loss), a.steps,
              format_bytes(peak).c_str(), format_bytes(run.budget).c_str(),
              ok ? "" : "  FAILED: over the budget");
  // The steps' figures leave out the copies before step 1 and after the last: the run's
  // figures (and a trace's swap_out and swap_in events) count them too.
  SwapStats total;  // the steps'
  std::uint64_t cancelled = 0, plain_frees = 0;
  for (const train::StepStats& st : run.steps) {
    add_swaps(total, st.swaps);
    plain_frees += st.plain_frees;
    cancelled += st.cancelled_bytes;
  }
  const SwapStats run_total = train::run_swaps(run);
  auto out_in = [](const SwapStats& s) {
    return format_bytes(s.bytes_out) + " out, " + format_bytes(s.bytes_in) + " in";
  };
  const std::string readback =
      a.check ? " --check's read-back of the state " + out_in(run.readback_swaps) + ";" : "";
  std::printf("moved:     steps %s; set-up before step 1 (writing the weights and optimizer "
              "state) %s;%s run %s\n",
              out_in(total).c_str(), out_in(run.setup_swaps).c_str(), readback.c_str(),
              out_in(run_total).c_str());
  std::printf("           (out: bytes copied to the host, in: bytes copied back, as in the "
              "table; a --trace's swap_out and swap_in events sum to the run's; %llu clean "
              "evictions copied nothing, their host copy being current)\n",
              (unsigned long long)run_total.clean_evictions);
  std::printf("swaps:     in the steps, %llu prefetches (%llu hits, %llu late, %llu skipped for "
              "want of room; the cache returned first %llu times, %llu small-pool segments freed), "
              "%llu demand fetches, %llu planned and %llu reactive evictions (%llu clean), %s of "
              "planned prefetches still on the device\n",
              (unsigned long long)total.prefetches, (unsigned long long)total.prefetch_hits,
              (unsigned long long)total.prefetch_late,
              (unsigned long long)total.prefetches_skipped, (unsigned long long)total.cache_returns,
              (unsigned long long)plain_frees,
              (unsigned long long)total.demand_fetches, (unsigned long long)total.evictions_planned,
              (unsigned long long)total.evictions_reactive, (unsigned long long)total.clean_evictions,
              format_bytes(cancelled).c_str());
  if (simulated) std::printf("(step times are simulated; wall is this machine's time per step)\n");
  if (!a.trace.empty())
    std::printf("trace written to %s (open in Perfetto or chrome://tracing, or spill report)\n",
                output_name(a.trace).c_str());
  if (trace_dropped > 0)
    std::printf("trace:     INCOMPLETE: %llu events were lost (more than a recorder ring holds "
                "between two steps); its sums fall short of the run's figures\n",
                (unsigned long long)trace_dropped);
  nlohmann::json doc = {{"format", "spill-train"},
                        {"version", 1},
                        {"model", a.model},
                        {"device", device_name},
                        {"simulated", simulated},
                        {"policy", a.policy},
                        {"footprint", run.footprint},
                        {"budget", run.budget},
                        {"steps", nlohmann::json::array()}};
  // The ops' names, and those with planned prefetches or remakes (the last plan's), to read
  // the steps' op_start_s and op_end_s against.
  doc["ops"] = nlohmann::json::array();
  for (const train::OpSpec& op : program.ops) doc["ops"].push_back(op.name);
  if (predicted) {
    if (run.floor) doc["floor_step_s"] = run.floor->step_s;  // of the plan the last step followed
    doc["predicted_host_peak"] = run.prediction.peak_host_bytes;  // pinned host bytes at once
    doc["acting_ops"] = nlohmann::json::array();
    for (std::size_t i = 0; i < run.plan.steps.size(); ++i)
      if (run.plan.steps[i].acts_before()) doc["acting_ops"].push_back(i);
  } else {
    // Policies lru and plan follow no graph plan: the steps carry no prediction, and this is
    // policy graph's swap-only plan at the same budget, for comparison (audit 40a #4).
    const graph::SimResult& p = run.prediction;
    doc["graph_plan_for_comparison"] = {{"swaps", run.plan.swaps.size()},
                                        {"step_s", p.step_time_s},
                                        {"stall_s", p.stall_time_s},
                                        {"compute_s", p.compute_time_s},
                                        {"peak", run.predicted_peak},
                                        {"host_peak", p.peak_host_bytes},
                                        {"bytes_out", p.swapped_out_bytes},
                                        {"bytes_in", p.swapped_in_bytes}};
  }
  for (const train::StepStats& st : run.steps) doc["steps"].push_back(step_json(st, predicted));
  // Copies outside the steps, and the run's (set-up, steps and read-back): a trace of the run
  // counts the run's.
  doc["setup"] = swaps_json(run.setup_swaps);
  if (a.check) doc["readback"] = swaps_json(run.readback_swaps);
  doc["run"] = swaps_json(run_total);
  if (a.check) {
    train::RunOptions ref = ro;
    ref.policy = train::Policy::None;
    ref.budget = reference_budget;
    profiling::TraceRecorder::global().set_enabled(false);
    train::RunResult unlimited = train::run_training(config, program, ref);
    train::Comparison c = train::compare_runs(run, unlimited);
    std::printf("check: %s with nothing swapped: %s\n",
                c.identical ? "bit-identical to the run" : "FAILED: differs from the run",
                c.detail.c_str());
    ok &= c.identical;
    doc["check"] = {{"identical", c.identical}, {"detail", c.detail}};
  }
  if (!a.json.empty()) {
    write_file(a.json, doc.dump(1) + "\n", "--json");
    std::printf("steps written to %s\n", output_name(a.json).c_str());
  }
  return ok ? 0 : 1;
}

}  // namespace

void add_train(CLI::App& app, Runner& run) {
  auto a = std::make_shared<TrainArgs>();
  CLI::App* cmd = app.add_subcommand(
      "train", "train a reference model out-of-core with real kernels (mlp, cnn, gpt-mini, "
               "gpt-medium), by default in a third of its footprint");
  cmd->add_option("model", a->model, "mlp | cnn | gpt-mini | gpt-medium")->required();
  cmd->add_option("--batch", a->model_options.batch, "batch size (default: the model's)")
      ->check(int_in(1, train::kMaxModelBatch));
  cmd->add_option("--layers", a->model_options.layers, "layers (default: the model's)")
      ->check(int_in(1, train::kMaxModelLayers));
  cmd->add_option("--width", a->model_options.width, "width (default: the model's)")
      ->check(int_in(1, train::kMaxModelWidth));
  cmd->add_option("--seq", a->model_options.seq, "sequence length (gpt; default: the model's)")
      ->check(int_in(1, train::kMaxModelSeq));
  cmd->add_option("--budget", a->budget,
                  "mapped device bytes (default: budget: in --conf, else a third of the footprint)")
      // Given empty, it meant "not given" (the default budget) without a word (audit 40a #6).
      ->check(CLI::Validator(
          [](std::string& v) -> std::string {
            return v.empty() ? "expected a size such as 8GiB, got ''" : "";
          },
          "SIZE"))
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  // The last of a repeated option wins, so that scripts/run.sh's defaults can be overridden.
  cmd->add_option("--steps", a->steps, "steps to run")
      ->capture_default_str()
      ->check(int_in(1, 100000))
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  cmd->add_option("--policy", a->policy, "graph | plan | lru | none")
      ->capture_default_str()
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  cmd->add_flag("--check", a->check,
                "run again with nothing swapped (policy none, at least this run's budget) and "
                "require bit-identical losses and state");
  cmd->add_flag("--no-recompute", a->no_recompute,
                "policy graph: swap only (by default the plan may also drop activations and "
                "remake them by running their producing op again where that is faster)");
  cmd->add_option("--lag", a->lag,
                  "ops the host may issue ahead of the device, waiting for op i - N before it "
                  "issues op i and its plan actions (default: 1 on the simulated device, 8 on a "
                  "GPU)")
      ->check(int_in(1, 1024));
  cmd->add_flag("--wait-every-op", a->wait_every_op,
                "wait for op i - lag before every op i: policy graph, not only before the ops "
                "with planned prefetches or remakes; policy none, at all on a GPU (both do on the "
                "simulated device by default; policies plan and lru always do)");
  cmd->add_option("--trace", a->trace, "write a Chrome/Perfetto trace of the run here")
      ->transform(file_path());
  cmd->add_option("--json", a->json, "write the steps' figures (and predictions) as JSON here")
      ->transform(file_path());
  cmd->add_flag("--predict", a->predict,
                "run nothing: plan the step on a GPU preset (--device) over a link (--link) and "
                "print the simulated step unlimited, swapping only, as planned, and the floor");
  auto* dev = cmd->add_option("--device", a->device,
                              "--predict: GPU preset whose roofline times the kernels (h200, "
                              "h100-sxm, a100-40gb, ...)")
                  ->capture_default_str();
  auto* link = cmd->add_option("--link", a->link,
                               "--predict: link preset (pcie3, pcie4, pcie5, nvlink-c2c, ...) or "
                               "a `spill bench link --json` file")
                   ->capture_default_str();
  auto* timeline = cmd->add_option("--timeline", a->timeline,
                                   "--predict: write the planned step's simulated timeline here")
                   ->transform(file_path());
  auto* plan_out = cmd->add_option("--plan-out", a->plan_out, "--predict: write the plan here")
                   ->transform(file_path());
  cmd->footer("--budget, --steps and --policy may be repeated: the last one given counts (so "
              "that a script's defaults can be overridden); every other option may be given "
              "once. Options that the model or policy would not read (--seq but for gpt models; "
              "--no-recompute but for policy graph) are refused.");
  cmd->callback([&run, a, cmd, dev, link, timeline, plan_out] {
    // Options that only one of the two modes reads are refused in the other (checked as the
    // command runs, so that the error is the CLI's usual invalid input).
    std::string refused;
    if (a->predict) {
      for (const char* o :
           {"--check", "--trace", "--steps", "--policy", "--lag", "--wait-every-op"})
        if (cmd->count(o) > 0) refused = std::string(o) + " runs steps: not with --predict";
    } else {
      for (const CLI::Option* o : {dev, link, timeline, plan_out})
        if (o->count() > 0) refused = o->get_name() + " is for --predict only";
      // Options the run would not read were accepted and ignored (audit 40a #12).
      if (cmd->count("--no-recompute") > 0 && a->policy != "graph")
        refused = "--no-recompute is for policy graph (the others never recompute), not '" +
                  a->policy + "'";
    }
    if (cmd->count("--seq") > 0 && a->model.rfind("gpt", 0) != 0)
      refused = "--seq: " + a->model + " has no sequence (only the gpt models have one)";
    run = [a, refused](const Config& c) {
      SPILL_EXPECTS(refused.empty(), refused);
      return a->predict ? run_predict(c, *a) : run_train(c, *a);
    };
  });
}

}  // namespace spill::cli

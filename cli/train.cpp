// `spill train MODEL`: trains one of the reference models out-of-core on the default device.
// Per step it prints the loss, the peak of mapped bytes, bytes moved each way, stall and step
// time, demand fetches and prefetch hits, with the planner's predictions beside them (on the
// simulated device both are simulated time). The budget defaults to a third of the step's
// footprint. --check runs the same steps again with no budget and requires bit-identical
// losses, weights and optimizer state.
#include <cstdio>
#include <fstream>
#include <optional>

#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "cli/options.hpp"
#include "core/errors.hpp"
#include "core/output_file.hpp"
#include "core/units.hpp"
#include "profiling/chrome_trace.hpp"
#include "profiling/events.hpp"
#include "train/models.hpp"
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
  std::string trace;
  std::string json;
};

nlohmann::json step_json(const train::StepStats& s) {
  return {{"step", s.step + 1},
          {"loss", s.loss},
          {"step_s", s.step_s},
          {"predicted_step_s", s.predicted_step_s},
          {"stall_s", s.stall_s},
          {"predicted_stall_s", s.predicted_stall_s},
          {"peak_mapped", s.peak_mapped},
          {"predicted_peak", s.predicted_peak},
          {"bytes_out", s.swaps.bytes_out},
          {"bytes_in", s.swaps.bytes_in},
          {"demand_fetches", s.swaps.demand_fetches},
          {"prefetch_hits", s.swaps.prefetch_hits},
          {"prefetch_late", s.swaps.prefetch_late},
          {"evictions_reactive", s.swaps.evictions_reactive},
          {"cache_returns", s.cache_returns},
          {"small_segment_frees", s.plain_frees},
          {"recomputes", s.recomputes},
          {"recomputed_bytes", s.recomputed_bytes},
          {"wall_s", s.wall_s},
          {"spill_cpu_s", s.spill_cpu_s}};
}

std::string ms(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2fms", s * 1e3);
  return b;
}

int run_train(Config config, const TrainArgs& a) {
  if (!a.trace.empty()) check_writable(a.trace, "--trace");
  if (!a.json.empty()) check_writable(a.json, "--json");
  check_not_same(a.json, "--json", a.trace, "--trace");
  const train::Policy policy = train::parse_policy(a.policy);
  train::Program program = train::build_model(a.model, a.model_options);
  const std::uint64_t footprint = train::footprint(config, program);
  // Default: a third of the footprint; with policy none (nothing can move), no budget.
  std::optional<std::uint64_t> budget;
  if (!a.budget.empty()) budget = parse_size(a.budget, "--budget");
  else if (config.budget) budget = *config.budget;
  else if (policy != train::Policy::None) budget = footprint / 3;
  SPILL_EXPECTS(!budget || *budget > 0, "--budget: must be above zero");
  profiling::TraceRecorder::global().set_enabled(!a.trace.empty());
  profiling::TraceRecorder::global().collect();

  train::RunOptions ro;
  ro.policy = policy;
  ro.budget = budget;
  ro.steps = a.steps;
  ro.keep_state = a.check;
  ro.exec.recompute = !a.no_recompute;
  bool simulated = true;
  std::string device_name;
  auto on_start = [&](const train::Executor& ex, Runtime& rt) {
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
    std::printf("footprint: %s (step peak with unlimited memory)   budget: %s (%.2fx)   policy: %s\n",
                format_bytes(footprint).c_str(), format_bytes(ex.budget()).c_str(),
                double(footprint) / double(ex.budget()), train::to_string(policy));
    std::printf("plan:      %zu swaps, %zu recomputes (%s, %s); predicted peak %s, out %s, in %s "
                "per step, step %s (compute %s, stall %s)\n",
                ex.plan().swaps.size(), ex.plan().recomputes.size(),
                format_bytes(p.recomputed_bytes).c_str(), ms(p.recompute_time_s).c_str(),
                format_bytes(ex.predicted_peak()).c_str(),
                format_bytes(p.swapped_out_bytes).c_str(), format_bytes(p.swapped_in_bytes).c_str(),
                ms(p.step_time_s).c_str(), ms(p.compute_time_s).c_str(), ms(p.stall_time_s).c_str());
    if (const auto& f = ex.floor()) {
      std::printf("floor:     %s for the step's ops (compute %s): no plan that only swaps does "
                  "better at this budget on this link%s\n",
                  ms(f->step_s).c_str(), ms(p.compute_time_s).c_str(),
                  ex.plan().recomputes.empty() ? "" : " (this plan also recomputes: not bound by it)");
    }
    std::printf("\n%4s %10s %11s %11s %10s %10s %9s %9s %10s %10s %6s %5s %7s\n", "step", "loss",
                "peak", "(pred)", "out", "in", "stall", "(pred)", "step", "(pred)", "demand",
                "hits", "wall");
  };
  std::uint64_t peak = 0;
  train::RunResult run;
  auto on_step = [&](const train::StepStats& s) {
    peak = std::max(peak, s.peak_mapped);
    std::printf("%4d %10.6f %11s %11s %10s %10s %9s %9s %10s %10s %6llu %5llu %6.1fs\n",
                s.step + 1, double(s.loss), format_bytes(s.peak_mapped).c_str(),
                format_bytes(s.predicted_peak).c_str(), format_bytes(s.swaps.bytes_out).c_str(),
                format_bytes(s.swaps.bytes_in).c_str(), ms(s.stall_s).c_str(),
                ms(s.predicted_stall_s).c_str(), ms(s.step_s).c_str(), ms(s.predicted_step_s).c_str(),
                static_cast<unsigned long long>(s.swaps.demand_fetches),
                static_cast<unsigned long long>(s.swaps.prefetch_hits), s.wall_s);
    std::fflush(stdout);
  };
  auto on_end = [&](Runtime& rt) {
    if (a.trace.empty()) return;
    rt.device().synchronize();
    auto& rec = profiling::TraceRecorder::global();
    profiling::write_chrome_trace(a.trace, rec.collect(),
                                  [&rec](std::uint32_t t) { return rec.tag_name(t); },
                                  {{"command", "spill train " + a.model},
                                   {"budget_bytes", rt.allocator().budget()},
                                   {"policy", a.policy}});
  };
  run = train::run_training(config, program, ro, on_start, on_step, on_end);
  bool ok = peak <= run.budget;
  std::printf("\nloss %.6f -> %.6f over %d steps; peak mapped %s of the %s budget%s\n",
              double(run.steps.front().loss), double(run.steps.back().loss), a.steps,
              format_bytes(peak).c_str(), format_bytes(run.budget).c_str(),
              ok ? "" : "  FAILED: over the budget");
  SwapStats total;
  std::uint64_t cancelled = 0, returns = 0, plain_frees = 0;
  for (const train::StepStats& st : run.steps) {
    returns += st.cache_returns;
    plain_frees += st.plain_frees;
    total.prefetches += st.swaps.prefetches;
    total.prefetch_hits += st.swaps.prefetch_hits;
    total.prefetch_late += st.swaps.prefetch_late;
    total.prefetches_skipped += st.swaps.prefetches_skipped;
    total.demand_fetches += st.swaps.demand_fetches;
    total.evictions_planned += st.swaps.evictions_planned;
    total.evictions_reactive += st.swaps.evictions_reactive;
    total.clean_evictions += st.swaps.clean_evictions;
    cancelled += st.cancelled_bytes;
  }
  std::printf("swaps:     %llu prefetches (%llu hits, %llu late, %llu skipped for want of room; "
              "the cache returned first %llu times, %llu small-pool segments freed), "
              "%llu demand fetches, %llu planned and %llu reactive evictions (%llu clean), %s of "
              "planned prefetches still on the device\n",
              (unsigned long long)total.prefetches, (unsigned long long)total.prefetch_hits,
              (unsigned long long)total.prefetch_late,
              (unsigned long long)total.prefetches_skipped, (unsigned long long)returns,
              (unsigned long long)plain_frees,
              (unsigned long long)total.demand_fetches, (unsigned long long)total.evictions_planned,
              (unsigned long long)total.evictions_reactive, (unsigned long long)total.clean_evictions,
              format_bytes(cancelled).c_str());
  if (simulated) std::printf("(step times are simulated; wall is this machine's time per step)\n");
  if (!a.trace.empty())
    std::printf("trace written to %s (open in Perfetto or chrome://tracing, or spill report)\n",
                a.trace.c_str());
  nlohmann::json doc = {{"format", "spill-train"},
                        {"version", 1},
                        {"model", a.model},
                        {"device", device_name},
                        {"simulated", simulated},
                        {"policy", a.policy},
                        {"footprint", run.footprint},
                        {"budget", run.budget},
                        {"steps", nlohmann::json::array()}};
  if (run.floor) doc["floor_step_s"] = run.floor->step_s;  // of the plan the last step followed
  for (const train::StepStats& st : run.steps) doc["steps"].push_back(step_json(st));
  if (a.check) {
    train::RunOptions ref = ro;
    ref.policy = train::Policy::None;
    ref.budget.reset();
    profiling::TraceRecorder::global().set_enabled(false);
    train::RunResult unlimited = train::run_training(config, program, ref);
    train::Comparison c = train::compare_runs(run, unlimited);
    std::printf("check: %s with no budget: %s\n",
                c.identical ? "bit-identical to the run" : "FAILED: differs from the run",
                c.detail.c_str());
    ok &= c.identical;
    doc["check"] = {{"identical", c.identical}, {"detail", c.detail}};
  }
  if (!a.json.empty()) {
    std::ofstream out(a.json);
    SPILL_EXPECTS(out.good(), "--json: cannot write '" + a.json + "'");
    out << doc.dump(1) << "\n";
    std::printf("steps written to %s\n", a.json.c_str());
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
                "run again with no budget and require bit-identical losses and state");
  cmd->add_flag("--no-recompute", a->no_recompute,
                "policy graph: swap only (by default the plan may also drop activations and "
                "remake them by running their producing op again where that is faster)");
  cmd->add_option("--trace", a->trace, "write a Chrome/Perfetto trace of the run here");
  cmd->add_option("--json", a->json, "write the steps' figures (and predictions) as JSON here");
  cmd->callback([&run, a] { run = [a](const Config& c) { return run_train(c, *a); }; });
}

}  // namespace spill::cli

// `spill demo`: the main job until the reference trainer lands. A synthetic training step
// (a chain of layers, forward then backward, activations kept for backward) whose footprint is
// at least three times the budget runs on the default device: first recorded (reactive
// swapping), then driven by the plan made from the recording (under policy:lru, every step
// swaps reactively). Prints footprint, budget, peak
// mapped bytes, bytes moved each way, stall and step time per step; checks every block's
// contents and exits non-zero on any mismatch.
#include <cstdio>

#include "cli/commands.hpp"
#include "cli/options.hpp"
#include "core/errors.hpp"
#include "core/output_file.hpp"
#include "core/units.hpp"
#include "profiling/chrome_trace.hpp"
#include "profiling/events.hpp"
#include "swapper/runtime.hpp"

namespace spill::cli {
namespace {

struct DemoArgs {
  std::string budget = "256MiB";
  bool budget_given = false;  // --budget on the command line: wins over budget: in the config
  int layers = 16;
  int steps = 3;
  std::string trace;
};

int run_demo(Config config, const DemoArgs& a) {
  if (!a.trace.empty()) check_writable(a.trace, "--trace");
  // --budget, else budget: in --conf or SPILL_CONF, else --budget's default (as spill train).
  const bool from_config = config.budget && !a.budget_given;
  const char* budget_from = from_config ? "budget: (--conf or SPILL_CONF)" : "--budget";
  if (!from_config) config.budget = parse_size(a.budget, "--budget");
  if (config.policy == SwapPolicy::None)
    throw InvalidArgument("spill demo needs swapping: policy:none cannot run a step 3x the budget");
  profiling::TraceRecorder::global().set_enabled(config.trace || !a.trace.empty());
  profiling::TraceRecorder::global().collect();  // start the trace at the demo
  Runtime rt(config);
  const std::size_t budget = rt.allocator().budget();
  // Activations a, weights a/2, a gradient a: footprint a * (1.5 L + 1) >= 3.2 x budget.
  SyntheticStepConfig c;
  c.layers = a.layers;
  auto activation_for = [&](int layers) {
    const double per_a = 1.5 * layers + 1;
    std::size_t act = static_cast<std::size_t>(3.2 * static_cast<double>(budget) / per_a);
    return std::max<std::size_t>((act + MiB - 1) / MiB * MiB, 2 * MiB);
  };
  const std::size_t act = activation_for(a.layers);
  c.activation_bytes = act;
  c.weight_bytes = act / 2;
  c.steps = a.steps;
  // The trace's events are taken after every step (the recorder's per-thread rings hold 65,536
  // events: taken only at the end, a long demo lost its earliest ones).
  std::vector<profiling::TraceEvent> events;
  if (!a.trace.empty()) {
    c.after_step = [&events](int) {
      std::vector<profiling::TraceEvent> more = profiling::TraceRecorder::global().collect();
      events.insert(events.end(), more.begin(), more.end());
    };
  }
  SPILL_EXPECTS(3 * act <= budget, std::string(budget_from) + " " + format_bytes(budget) +
                                       " is too small for " + std::to_string(a.layers) +
                                       " layers: one op needs " + format_bytes(3 * act));
  // Weights at or under the swap threshold come from the small pool, which never moves: with
  // many layers they alone passed the budget (40 layers at 32 MiB ended out of memory).
  if (c.weight_bytes <= config.swap_threshold) {
    int most = a.layers;
    while (most > 1 && activation_for(most) / 2 <= config.swap_threshold) --most;
    throw InvalidArgument("--layers " + std::to_string(a.layers) + " is too many for " +
                          budget_from + " " + format_bytes(budget) + ": each weight would be " +
                          format_bytes(c.weight_bytes) + ", not above swap_threshold (" +
                          format_bytes(config.swap_threshold) + "), so none could move; use " +
                          (most >= 6 ? "at most " + std::to_string(most) + " layers or " : "") +
                          "a larger budget");
  }
  std::printf("%s\n", rt.device_reason().c_str());
  std::printf("device:    %s (%s)\n", rt.device().info().name.c_str(),
              rt.device().info().simulated ? "simulated: times are the link model's" : "measured");
  std::printf("model:     %d layers, activations %s, weights %s\n", c.layers,
              format_bytes(c.activation_bytes).c_str(), format_bytes(c.weight_bytes).c_str());
  std::printf("footprint: %s   budget: %s   (%.1fx)\n", format_bytes(c.footprint()).c_str(),
              format_bytes(budget).c_str(),
              static_cast<double>(c.footprint()) / static_cast<double>(budget));
  std::vector<StepResult> results =
      run_synthetic_steps(rt.device(), rt.step_memory(), *rt.swapper(), c);
  std::printf("\n%-22s %12s %12s %12s %10s %10s %7s %9s  %s\n", "step", "peak mapped", "out",
              "in", "stall", "step", "demand", "prefetch", "data");
  bool ok = true;
  for (std::size_t i = 0; i < results.size(); ++i) {
    const StepResult& r = results[i];
    const bool planned = config.policy == SwapPolicy::Plan;
    std::string name = std::to_string(i + 1) +
                       (!planned ? " (reactive, lru)" : i == 0 ? " (record, reactive)" : " (plan)");
    std::printf("%-22s %12s %12s %12s %8.2fms %8.2fms %7llu %9llu  %s\n", name.c_str(),
                format_bytes(r.peak_mapped).c_str(), format_bytes(r.swaps.bytes_out).c_str(),
                format_bytes(r.swaps.bytes_in).c_str(), r.stall_s * 1e3, r.step_time_s * 1e3,
                static_cast<unsigned long long>(r.swaps.demand_fetches),
                static_cast<unsigned long long>(r.swaps.prefetches),
                r.data_ok ? "ok" : r.first_error.c_str());
    ok &= r.data_ok && r.peak_mapped <= budget;
  }
  SwapStats s = rt.swapper()->stats();
  // The table counts the steps' copies; the run's (what a --trace's events sum to) also has
  // those outside them: the weights written before step 1 and sent to the host to make room.
  std::uint64_t steps_out = 0, steps_in = 0;
  for (const StepResult& r : results) {
    steps_out += r.swaps.bytes_out;
    steps_in += r.swaps.bytes_in;
  }
  auto out_in = [](std::uint64_t out, std::uint64_t in) {
    return format_bytes(out) + " out, " + format_bytes(in) + " in";
  };
  std::printf("\nmoved:     steps %s; outside them (writing the weights before step 1) %s; "
              "run %s\n",
              out_in(steps_out, steps_in).c_str(),
              out_in(s.bytes_out - steps_out, s.bytes_in - steps_in).c_str(),
              out_in(s.bytes_out, s.bytes_in).c_str());
  std::printf("           (out: bytes copied to the host, in: bytes copied back; a --trace's "
              "swap_out and swap_in events sum to the run's)\n");
  std::printf("planned steps %llu, deviations %llu, clean evictions %llu, prefetch hits %llu, "
              "late %llu\n",
              static_cast<unsigned long long>(s.steps_planned),
              static_cast<unsigned long long>(s.deviations),
              static_cast<unsigned long long>(s.clean_evictions),
              static_cast<unsigned long long>(s.prefetch_hits),
              static_cast<unsigned long long>(s.prefetch_late));
  if (!a.trace.empty()) {
    auto& rec = profiling::TraceRecorder::global();
    std::vector<profiling::TraceEvent> more = rec.collect();  // counts its drops
    events.insert(events.end(), more.begin(), more.end());
    nlohmann::json meta = {{"command", "spill demo"},
                           {"device", rt.device().info().name},
                           {"budget_bytes", budget},
                           {"dropped_events", rec.dropped()}};
    // Begun with the runtime: nothing before it, unless events were lost (a step with more
    // events than a ring holds): then the report infers a baseline (as spill train, audit 40a
    // #3).
    if (rec.dropped() == 0) meta["baseline"] = profiling::zero_baseline();
    profiling::write_chrome_trace(a.trace, events,
                                  [&rec](std::uint32_t t) { return rec.tag_name(t); }, meta,
                                  "--trace");
    std::printf("trace written to %s (open in Perfetto or chrome://tracing, or spill report)\n",
                output_name(a.trace).c_str());
    if (rec.dropped() > 0)
      std::printf("trace:     INCOMPLETE: %llu events were lost (more than a recorder ring "
                  "holds between two steps); its sums fall short of the run's figures\n",
                  static_cast<unsigned long long>(rec.dropped()));
  }
  std::printf("%s\n", ok ? "all blocks intact, every step within the budget"
                         : "FAILED: data mismatch or budget exceeded");
  return ok ? 0 : 1;
}

}  // namespace

void add_demo(CLI::App& app, Runner& run) {
  auto args = std::make_shared<DemoArgs>();
  CLI::App* cmd = app.add_subcommand(
      "demo", "run a synthetic training step 3x larger than the budget: recorded, then planned "
              "(policy:lru: every step reactive)");
  CLI::Option* budget =
      cmd->add_option("--budget", args->budget,
                      "device memory budget (wins over budget: in --conf or SPILL_CONF; "
                      "without either, the default)")
          ->capture_default_str();
  // The step, 3.2x the budget, is spread over the layers; an op holds three activations, so
  // with fewer than 6 layers one op needs more than any budget.
  cmd->add_option("--layers", args->layers,
                  "layers in the chain (6 or more: fewer put more than the budget in one op)")
      ->capture_default_str()
      ->check(int_in(6, 512));
  cmd->add_option("--steps", args->steps,
                  "steps to run (policy plan: the first recorded, the rest planned; lru: all "
                  "reactive)")
      ->capture_default_str()
      ->check(int_in(2, 100000));
  cmd->add_option("--trace", args->trace, "write a Chrome/Perfetto trace of the run here")
      ->transform(file_path());
  cmd->callback([&run, args, budget] {
    args->budget_given = budget->count() > 0;
    run = [args](const Config& c) { return run_demo(c, *args); };
  });
}

}  // namespace spill::cli

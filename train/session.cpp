#include "train/session.hpp"

#include <cstdio>
#include <cstring>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "graph/liveness.hpp"

namespace spill::train {

std::uint64_t footprint(const Config& base, const Program& program) {
  Config c = base;
  c.budget.reset();
  c.policy = SwapPolicy::None;
  Runtime probe(c);
  return graph::analyze_liveness(step_graph(probe, program)).peak;
}

RunResult run_training(const Config& base, const Program& program, const RunOptions& options,
                       const std::function<void(const Executor&, Runtime&)>& on_start,
                       const std::function<void(const StepStats&)>& on_step,
                       const std::function<void(Runtime&)>& on_end) {
  SPILL_EXPECTS(options.steps >= 1, "training: steps must be at least 1");
  Config c = base;
  // Step times are compared in simulated time: keep them independent of thread scheduling.
  if (!c.sim_queries) c.sim_queries = SimQueries::Simulated;
  c.budget = options.budget;
  c.policy = runtime_policy(options.policy);
  Runtime rt(c);
  ExecOptions eo = options.exec;
  eo.policy = options.policy;
  Executor ex(rt, program, eo);
  RunResult r;
  r.footprint = ex.footprint();
  r.budget = ex.budget();
  r.prediction = ex.prediction();
  r.predicted_peak = ex.predicted_peak();
  r.plan = ex.plan();
  r.setup_swaps = ex.setup_swaps();
  if (on_start) on_start(ex, rt);
  for (int s = 0; s < options.steps; ++s) {
    r.steps.push_back(ex.step());
    if (on_step) on_step(r.steps.back());
  }
  r.floor = ex.floor();  // after the steps: on a GPU, of the op times measured in the second
  if (options.keep_state) {
    Swapper* swp = rt.swapper();
    const SwapStats before = swp ? swp->stats() : SwapStats{};
    r.state = ex.state();  // the persistent tensors', in tensor order
    for (std::size_t t = 0; t < program.tensors.size(); ++t)
      if (graph::persistent(program.tensors[t].kind))
        r.state_tensors.emplace_back(program.tensors[t].name, program.tensors[t].bytes);
    if (swp) r.readback_swaps = swaps_since(swp->stats(), before);
  }
  if (on_end) on_end(rt);
  return r;
}

SwapStats run_swaps(const RunResult& r) {
  SwapStats t;
  add_swaps(t, r.setup_swaps);
  for (const StepStats& s : r.steps) add_swaps(t, s.swaps);
  add_swaps(t, r.readback_swaps);
  return t;
}

namespace {
// A float exactly: 9 significant digits tell any two apart.
std::string exact(float v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.9g", double(v));
  return b;
}
}  // namespace

Comparison compare_runs(const RunResult& a, const RunResult& b) {
  Comparison c;
  if (a.steps.size() != b.steps.size()) {
    c.detail = "the runs have " + std::to_string(a.steps.size()) + " and " +
               std::to_string(b.steps.size()) + " steps";
    return c;
  }
  for (std::size_t i = 0; i < a.steps.size(); ++i) {
    if (std::memcmp(&a.steps[i].loss, &b.steps[i].loss, sizeof(float)) != 0) {
      // std::to_string's 6 decimals printed two different losses alike (audit 40a #9).
      c.detail = "step " + std::to_string(i + 1) + ": loss " + exact(a.steps[i].loss) + " vs " +
                 exact(b.steps[i].loss);
      return c;
    }
  }
  if (a.state.size() != b.state.size()) {
    c.detail = "states of " + std::to_string(a.state.size()) + " and " +
               std::to_string(b.state.size()) + " bytes";
    return c;
  }
  if (std::memcmp(a.state.data(), b.state.data(), a.state.size()) != 0) {
    std::size_t i = 0;
    while (a.state[i] == b.state[i]) ++i;
    // Named by the tensor and element (the state is the persistent tensors in order).
    std::size_t start = 0;
    for (const auto& [name, bytes] : a.state_tensors) {
      if (i >= start + bytes) {
        start += bytes;
        continue;
      }
      const std::size_t element = (i - start) / sizeof(float);
      const std::size_t at = start + element * sizeof(float);
      if (at + sizeof(float) > a.state.size()) break;
      float x = 0, y = 0;
      std::memcpy(&x, a.state.data() + at, sizeof x);
      std::memcpy(&y, b.state.data() + at, sizeof y);
      c.detail = "weights or optimizer state differ: tensor '" + name + "' element " +
                 std::to_string(element) + ": " + exact(x) + " vs " + exact(y);
      return c;
    }
    c.detail = "weights or optimizer state differ at byte " + std::to_string(i);
    return c;
  }
  c.identical = true;
  c.detail = std::to_string(a.steps.size()) + " losses and " + format_bytes(a.state.size()) +
             " of weights and optimizer state";
  return c;
}

}  // namespace spill::train

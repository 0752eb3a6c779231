// A training run from a configuration: the footprint probe (the step's live tensors at their peak),
// a run of N steps under a policy and budget on a fresh Runtime, and the bit-for-bit comparison
// of two runs (`spill train --check`). The CLI, the tests and the benchmarks share these.
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/config.hpp"
#include "train/executor.hpp"

namespace spill::train {

// The step's peak mapped bytes with unlimited memory on the configured device.
std::uint64_t footprint(const Config& base, const Program& program);

struct RunOptions {
  Policy policy = Policy::Graph;
  std::optional<std::uint64_t> budget;  // none: no budget (the device's default)
  int steps = 10;
  ExecOptions exec;                     // exec.policy is set from `policy`
  bool keep_state = false;              // read weights and optimizer state back at the end
};

struct RunResult {
  std::vector<StepStats> steps;
  std::vector<std::byte> state;  // when keep_state
  // What `state` holds, in order: the persistent tensors' names and bytes (float32 elements).
  std::vector<std::pair<std::string, std::size_t>> state_tensors;
  std::uint64_t footprint = 0, budget = 0;
  std::uint64_t predicted_peak = 0;  // mapped bytes (Executor::predicted_peak)
  graph::SimResult prediction;
  graph::Plan plan;
  std::optional<graph::SwapFloor> floor;  // Executor::floor after the last step
  // Swaps outside the steps: setting up (Executor::setup_swaps) and reading the weights and
  // optimizer state back for keep_state (pins bring what is on the host back, and may evict).
  // A trace of the run counts them with the steps': its swap_out bytes are setup_swaps',
  // the steps' and readback_swaps' bytes_out summed (run_swaps), and so are its swap_in bytes.
  SwapStats setup_swaps, readback_swaps;
};

// The run's swaps: set-up, steps and read-back summed (the counters that swaps_since takes
// differences of; the gauges, such as host_bytes and on_host_bytes, are zero).
SwapStats run_swaps(const RunResult& r);

// Runs on a fresh Runtime from `base` with the policy and budget of `options`. `on_start` sees
// the executor before the first step (for headers), `on_step` each step as it ends, `on_end`
// the runtime after the last step, before it goes (traces are written in its clock).
RunResult run_training(const Config& base, const Program& program, const RunOptions& options,
                       const std::function<void(const Executor&, Runtime&)>& on_start = {},
                       const std::function<void(const StepStats&)>& on_step = {},
                       const std::function<void(Runtime&)>& on_end = {});

// Whether two runs' losses and states are bit-identical; `detail` says what was compared, or
// the first difference: the step and both losses (to 9 significant digits, which tell any two
// floats apart), or the tensor and element and both values.
struct Comparison {
  bool identical = false;
  std::string detail;
};
Comparison compare_runs(const RunResult& a, const RunResult& b);

}  // namespace spill::train

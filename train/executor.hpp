// The executor: runs a Program's steps on a Runtime with real kernels. Every tensor is allocated
// through the runtime's caching allocator when its first op runs (weights and optimizer state
// once, inputs at each step's start) and freed after its last op; every swappable tensor is
// pinned around each op that uses it, on the one compute stream. Swapping follows the policy:
//   graph  the graph planner's plan for this program at the runtime's budget: before op i the
//          plan's prefetches for op i (Swapper::prefetch), after it the plan's evictions
//          (Swapper::evict); tensors the plan starts on the host are evicted before step 1.
//          With ExecOptions::recompute the plan may also drop activations (freed after the op
//          it names) and remake them before their next use: a fresh allocation from the
//          caching allocator, then the producing op's code run again on the compute stream,
//          its tensors pinned as for any op (the plan keeps them resident: graph::check_plan);
//   plan   the swapper's own record-then-plan path (begin_step/begin_op/end_step);
//   lru    reactive eviction only (least recently used);
//   none   no swapper (the runtime must have policy:none).
// The host runs at most `lag` ops ahead of the device (it waits for op i - lag to finish before
// issuing op i), so the plan's actions happen when the plan says: with lag 1 a prefetch for op i
// is issued as op i - 1 completes, which is the simulator's rule. A step begins by uploading its
// inputs on the compute stream; that upload is op -1.
// The prediction simulates the steady state (graph::StepModel{2, true}: a step that starts with
// the previous step's copies in flight and uploads its inputs first); on the simulated device
// with no duplex slowdown (its copy engines do not contend) and its queries answered in
// simulated time (train::run_training sets sim_queries:simulated). It simulates the memory the
// allocator maps (the whole budget, small tensors in whole 2 MiB small-pool segments:
// graph::SmallPool) and the swapper's rules (graph::SimOptions::swapper_rules: swap-outs reaped
// only when room is needed, prefetches of blocks not yet reaped cancel their swap-out, a
// prefetch waiting for room holds the host); the plan is made for the budget less the segment
// slack at the small tensors' peak, which holds at every op.
// Determinism: kernels are deterministic and swapping only moves bytes, so the losses and final
// state are bit-identical whatever the budget and policy (tests check it).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "graph/evaluate.hpp"
#include "graph/plan.hpp"
#include "graph/simulator.hpp"
#include "swapper/runtime.hpp"
#include "train/program.hpp"

namespace spill::train {

enum class Policy { Graph, Plan, Lru, None };
const char* to_string(Policy p);
Policy parse_policy(std::string_view s);  // graph | plan | lru | none; InvalidArgument otherwise
// The runtime configuration for `policy` (graph drives the swapper by hand: policy lru).
SwapPolicy runtime_policy(Policy p);

// ExecOptions::lag's default on a GPU. gpt-medium at a third on an H200 (2026-12-04), the host
// waiting only before the ops with planned actions: in one call 578.6 ms a step at lag 2, 551.6
// at 4, 532.5 at 8 (unlimited: 469.8); in the next 549.1 at 2, 555.5 at 8, 532.4 at 16 (single
// steps varied more than that): no lag of 4 or more was worse than lag 2 beyond the noise.
inline constexpr int kGpuLag = 8;

// The 0-based step whose ops ExecOptions::measure_ops times.
inline constexpr int kMeasuredStep = 1;

struct ExecOptions {
  Policy policy = Policy::Graph;
  // Ops the host may run ahead; 0: 1 on the simulated device, kGpuLag on a GPU.
  int lag = 0;
  // Whether the host waits for op i - lag before every op i (the simulator's rule; the default
  // on the simulated device), or only before the ops the plan gives actions at (prefetches,
  // remakes: they still happen when op i - lag has finished; the default on a GPU, where
  // waiting at every op leaves at most `lag` ops queued, so the host's work between short ops
  // idles the device: gpt-medium at a third on an H200, 2026-12-04, lag 2, took 598.5 ms a step
  // waiting at every op, 578.6 ms waiting only before the ops with actions). Policies plan and
  // lru always wait at every op (the swapper times its own prefetches by the ops the host
  // begins). Policy none has no actions: it waits at every op on the simulated device (the
  // simulator's rule, which its prediction follows) and on a GPU only when this is set (audit
  // 40a #13).
  std::optional<bool> wait_every_op;
  bool poison = false;     // fill each new activation/gradient with NaN (tests: unwritten bytes)
  // Time each op of the second step (kMeasuredStep; the first pays the GPU's first uses) and
  // plan again from those times (always on a GPU, where the kernels' roofline is only a first
  // guess): the third step is the first on the measured plan.
  bool measure_ops = false;
  // Policy graph: the planner may recompute activations instead of swapping them
  // (graph::PlannerOptions::recompute).
  bool recompute = true;
};

// What one step did. Times are device times (simulated on the simulated device).
struct StepStats {
  int step = 0;                 // 0-based
  float loss = 0;
  double step_s = 0;            // step start (inputs' upload included) to last op's end
  double compute_s = 0;         // sum of the ops' kernel times, remakes included (simulated
                                // device), else 0
  double stall_s = 0;           // step_s - compute_s (simulated device)
  // With ExecOptions::measure_ops (on a GPU), the sum of this step's ops' own times (each op's
  // start to end event on the compute stream): step_s less this is time the compute stream
  // spent outside the step's ops (idle while the host issued or waited, waiting for a
  // prefetch's copy, or running remakes).
  std::optional<double> ops_s;
  // With measure_ops: each op's start and end on the compute stream, in seconds from the step's
  // start (so op_start_s[i] - op_end_s[i - 1] is the stream's time between ops i - 1 and i).
  std::vector<double> op_start_s, op_end_s;
  std::uint32_t op_waits = 0;   // ops before which the host waited for op i - lag
  double wall_s = 0;            // host wall clock of the step
  double spill_s = 0;           // host wall clock inside the allocator and the swapper
  double spill_cpu_s = 0;       // host thread CPU time inside them (blocked waits excluded)
  double spill_vmm_cpu_s = 0;   // the part of it in the device's virtual-memory calls
  // The step's virtual-memory calls (Device::vmm_calls), from any thread (the swapper's
  // included), with the host's time in them: on a GPU, the driver's cuMem* calls.
  VmmCalls vmm;
  // The allocator's host waits for queued work to pass freed blocks (AllocatorStats::
  // host_waits) in the step, and the host's seconds in them.
  std::uint64_t alloc_waits = 0;
  double alloc_wait_s = 0;
  // Prefetches that took cached blocks' memory, their copies waiting for those blocks' queued
  // work instead of the host (CachingAllocator::reback_from_cache).
  std::uint64_t cache_takeovers = 0;
  std::uint64_t peak_mapped = 0;
  // This step's swap counts (differences), from its start to its end; with measure_ops the
  // measured step's include the evictions of what the new plan starts on the host. Copies
  // outside every step: Executor::setup_swaps, RunResult::readback_swaps.
  SwapStats swaps;
  std::uint64_t cancelled_bytes = 0;  // planned prefetches of blocks still on the device (their
                                      // swap-out cancelled; predicted: SimResult::cancelled_bytes)
  std::uint64_t plain_frees = 0;    // small-pool segments freed in the step (unmapped; a
                                    // cudaFree, which waits for the whole GPU, before
                                    // 2026-12-04)
  std::uint32_t recomputes = 0;     // tensors remade by running their producer again
  std::uint64_t recomputed_bytes = 0;
  // The prediction in force for this step (the simulator on the plan; mapped peak as
  // Executor::predicted_peak).
  double predicted_step_s = 0, predicted_stall_s = 0;
  std::uint64_t predicted_peak = 0;
};

class Executor {
 public:
  // Builds the graph and the plan, allocates and initialises weights and optimizer state.
  // Throws InvalidArgument when the runtime's budget cannot fit the step (naming the op), or
  // when the runtime's swap policy does not match `options.policy`.
  Executor(Runtime& runtime, const Program& program, const ExecOptions& options);
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  StepStats step();  // runs the next step
  // What setting up moved (the constructor, before step 1): writing the weights and optimizer
  // state from the host, each that the plan starts on the host evicted as soon as it is written
  // (policy graph), or evicted reactively to make room for the next (plan, lru). A trace of the
  // run counts these copies too (swap_out events); no step's SwapStats does.
  const SwapStats& setup_swaps() const;

  const graph::Graph& graph() const;
  // The graph planner's plan at the runtime's budget (what policy graph executes).
  const graph::Plan& plan() const;
  // The simulator's prediction for a step that follows plan() (no swapping for policy none).
  const graph::SimResult& prediction() const;
  // The step's live tensors at their peak (the graph's liveness peak, each tensor at the bytes
  // the allocator gives it): what the step holds, not what it maps (audit 40a #18).
  std::uint64_t footprint() const;
  // What a step maps with nothing swapped (what policy none needs): the larger tensors' live
  // bytes plus the small pool's segments in use as the allocator places them, at its most
  // (train/small_pool.hpp).
  std::uint64_t unswapped_peak() const;
  // Predicted peak of mapped bytes: the simulator's (small tensors in whole segments).
  std::uint64_t predicted_peak() const;
  // The least step time (of the step's ops, upload aside) any plan that only swaps reaches at
  // the budget on the link the plan assumes (graph::swap_floor); nullopt with policy none.
  const std::optional<graph::SwapFloor>& floor() const;
  std::uint64_t budget() const;
  std::string kernels_name() const;
  // Bytes of every weight and optimizer-state tensor, in tensor order (synchronises).
  std::vector<std::byte> state();
  // Reads the weights back as floats (for tests of learning); synchronises.
  std::vector<float> tensor(TensorId t);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// The allocation size of a request of `bytes` under `config` on `device`: what the caching
// allocator maps (small requests rounded to 512 B, large ones to the device granularity).
std::uint64_t allocation_bytes(std::uint64_t bytes, const Config& config, const Device& device);

// Whether a block of `block` bytes in the large pool (`large`) is what the allocator may give a
// tensor the graph sizes at `graph_bytes` (its allocation_bytes) with `small_limit` the largest
// small request: the same pool, and for a large tensor its size or a cached block up to a
// quarter larger (the allocator's reuse rule: CachingAllocator reuses such a block rather than
// map more; the plan then holds a little more than it counted, which the swapper's reactive
// eviction absorbs).
bool block_fits_graph(std::uint64_t block, bool large, std::uint64_t graph_bytes,
                      std::uint64_t small_limit);

// The step's graph as an Executor on `runtime` runs it (sizes as its allocator maps them, op
// times from the device's kernel roofline): for the footprint before choosing a budget.
graph::Graph step_graph(Runtime& runtime, const Program& program);

}  // namespace spill::train

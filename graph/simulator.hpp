// Discrete-event simulation of one training step: one compute stream running the ops in order,
// one copy engine per direction (FIFO), and memory accounting of mapped device bytes.
// Rules: an op starts when the previous op is done, every tensor it touches is resident (a
// tensor on the host with no prefetch in flight is fetched on demand: a stall), and its new
// outputs and workspace fit the budget. Memory is mapped in issue order: when a mapping does not
// fit, it waits for pending releases (evictions in flight, frees at op ends); when nothing
// pending would make it fit, it proceeds and the step is marked over budget. A copy issued while
// the other direction is busy runs at the link's duplex efficiency.
// With swapper_rules, the rules of spill's swapper executing the plan (train::Executor): a
// swap-out's memory is released (reaped) only when a mapping needs room, and a tensor fetched
// (prefetch or use) before that stays on the device: the swapper cancels that swap-out (the copy
// out goes on) and nothing is copied back; a clean eviction (no copy) is released when the D2H
// engine has run the copies out issued before it (the swapper's marker is on that stream); a
// prefetch that waits for room waits on the host, so the op it is issued before starts no
// earlier than its mapping.
// A plan's recompute of tensor T before op i runs T's producer again on the compute stream once
// op i-1 is done: it waits for the producer's other tensors (the plan keeps them resident), maps
// T and the producer's workspace, and takes the producer's time; op i starts after it. A drop
// frees T when its op ends, as a last use does.
// Peak accounting is conservative: a release is counted once every earlier-issued mapping is in.
// With a small pool (SimOptions::small) small tensors count as the whole segments they fill.
// Steps (StepModel): by default one step from a cold start (idle copy engines, every tensor the
// plan starts on the host already there). With steps > 1 the steps run back to back: each starts
// as the previous one's last op ends, with that step's copies still in flight and their memory
// mapped until they end; the last step is reported (the steady state a training loop runs in).
// With uploads each step first copies those inputs to the device (compute stream, host to
// device engine) into memory mapped at the step's start; that upload counts as op -1: op 0's
// prefetches are issued when it ends.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/link_model.hpp"
#include "graph/ir.hpp"
#include "graph/plan.hpp"

namespace spill::graph {

// A copy to the device that each step makes before op 0: `bytes` of input tensor `tensor` (the
// data can be smaller than the tensor's block).
struct Upload {
  TensorIndex tensor = 0;
  std::uint64_t bytes = 0;
};

// How the steps around the graph's ops are modelled (see the header comment).
struct StepModel {
  int steps = 1;                // consecutive steps simulated; the last one is reported
  std::vector<Upload> uploads;  // each step's input uploads, in order (none: inputs are there)
};

// How a caching allocator maps small tensors: those of at most `limit` bytes share segments of
// `segment` bytes, and mapped memory counts whole segments (as many as their live bytes fill,
// rounded up; a segment emptied is returned when room is needed). segment 0: every tensor is
// mapped at its own size.
struct SmallPool {
  std::uint64_t limit = 0;
  std::uint64_t segment = 0;
};

struct SimOptions {
  std::uint64_t budget = std::numeric_limits<std::uint64_t>::max();
  bool record_timeline = false;
  StepModel model;
  SmallPool small;
  bool swapper_rules = false;  // see the header comment
};

struct TimelineEvent {
  enum class Kind { Compute, SwapIn, SwapOut, Stall, Upload, Recompute };
  Kind kind = Kind::Compute;
  std::int64_t op = 0;         // the op (compute, stall, recompute: the op it runs before) or
                               // the op the copy was issued at
  std::int64_t tensor = -1;    // copies: the tensor moved; recompute: the tensor remade
  double start_s = 0, end_s = 0;
  std::uint64_t bytes = 0;
};
const char* to_string(TimelineEvent::Kind k);

// Figures of the reported step (the last one simulated); times in a timeline are from its start.
struct SimResult {
  // One step: until the last op and the last copy finish. Several: from the previous step's
  // last op end to this step's (its copies still in flight end in the next step's time).
  double step_time_s = 0;
  double compute_time_s = 0;   // sum of op durations (the step time with unlimited memory)
  double stall_time_s = 0;     // time the compute stream waited for copies or memory
  std::uint64_t peak_bytes = 0;  // over every simulated step
  // Pinned host memory the swapper holds at most, over every simulated step: a tensor's buffer
  // from its first copy out (or the step's start on the host) until it dies.
  std::uint64_t peak_host_bytes = 0;
  bool within_budget = true;     // every simulated step
  std::uint64_t swapped_out_bytes = 0;  // device to host
  std::uint64_t swapped_in_bytes = 0;   // host to device
  std::uint64_t cancelled_bytes = 0;    // fetched before their swap-out was reaped: no copy back
  std::uint32_t demand_fetches = 0;     // uses of a tensor on the host with no prefetch
  std::uint32_t recomputes = 0;         // tensors remade by running their producer again
  std::uint64_t recomputed_bytes = 0;
  double recompute_time_s = 0;          // compute-stream time of those remakes
  std::vector<std::uint64_t> mapped_at_op;  // mapped bytes once each op's memory is in
  std::vector<TimelineEvent> timeline;
};

// Simulates `g` with op durations `op_times` (seconds, one per op) over `link`, following
// `plan` (nullptr: no swapping).
SimResult simulate(const Graph& g, const std::vector<double>& op_times, const LinkModel& link,
                   const Plan* plan, const SimOptions& options = {});

}  // namespace spill::graph

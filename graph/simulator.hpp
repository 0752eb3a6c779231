// Discrete-event simulation of one training step: one compute stream running the ops in order,
// one copy engine per direction (FIFO), and memory accounting of mapped device bytes.
// Rules: an op starts when the previous op is done, every tensor it touches is resident (a
// tensor on the host with no prefetch in flight is fetched on demand: a stall), and its new
// outputs and workspace fit the budget. Memory is mapped in issue order: when a mapping does not
// fit, it waits for pending releases (evictions in flight, frees at op ends); when nothing
// pending would make it fit, it proceeds and the step is marked over budget. A copy issued while
// the other direction is busy runs at the link's duplex efficiency.
// Peak accounting is conservative: a release is counted once every earlier-issued mapping is in.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/link_model.hpp"
#include "graph/ir.hpp"
#include "graph/plan.hpp"

namespace spill::graph {

struct SimOptions {
  std::uint64_t budget = std::numeric_limits<std::uint64_t>::max();
  bool record_timeline = false;
};

struct TimelineEvent {
  enum class Kind { Compute, SwapIn, SwapOut, Stall };
  Kind kind = Kind::Compute;
  std::int64_t op = 0;         // the op (compute, stall) or the op the copy was issued at
  std::int64_t tensor = -1;    // copies: the tensor moved
  double start_s = 0, end_s = 0;
  std::uint64_t bytes = 0;
};
const char* to_string(TimelineEvent::Kind k);

struct SimResult {
  double step_time_s = 0;      // until the last op and the last copy finish
  double compute_time_s = 0;   // sum of op durations (the step time with unlimited memory)
  double stall_time_s = 0;     // time the compute stream waited for copies or memory
  std::uint64_t peak_bytes = 0;
  bool within_budget = true;
  std::uint64_t swapped_out_bytes = 0;  // device to host
  std::uint64_t swapped_in_bytes = 0;   // host to device
  std::uint32_t demand_fetches = 0;     // uses of a tensor on the host with no prefetch
  std::vector<std::uint64_t> mapped_at_op;  // mapped bytes once each op's memory is in
  std::vector<TimelineEvent> timeline;
};

// Simulates `g` with op durations `op_times` (seconds, one per op) over `link`, following
// `plan` (nullptr: no swapping).
SimResult simulate(const Graph& g, const std::vector<double>& op_times, const LinkModel& link,
                   const Plan* plan, const SimOptions& options = {});

}  // namespace spill::graph

// A recorded training step as the swapper sees it: every access to a block, in order. The
// swapper records one step into a Trace; graph_from_trace turns it into a Graph, the planner
// makes a Plan for it, and the swapper executes that Plan on later steps (plan tensor indices
// map back to blocks through graph.tensors[t].id == block).
// Invariants (checked): op indices never decrease along the trace, times never decrease, every
// block has one size, bytes > 0. Several streams may appear; the graph model runs ops on one
// compute stream in op order, so `stream` is kept for reports only.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "graph/ir.hpp"

namespace spill::graph {

enum class Access : std::uint8_t { Read, Write, ReadWrite };
const char* to_string(Access a);

struct TraceAccess {
  std::uint32_t op = 0;       // index of the op (kernel or layer) that used the block
  std::uint64_t block = 0;    // the swapper's block id
  std::uint64_t bytes = 0;
  Access access = Access::Read;
  std::uint32_t stream = 0;
  double time_s = 0;          // when the access (the pin) happened, from step start
};

struct Trace {
  std::vector<TraceAccess> accesses;
  std::vector<std::string> op_names;  // optional, by op index
  double step_end_s = 0;              // when the step ended (0: unknown)
};

// Builds the graph of a recorded step. Ops are the distinct op indices in order; a block first
// accessed by a read existed before the step and is treated as a weight (persistent); any other
// block is an activation, freed after its last access. Op durations come from the times (the
// gap to the next op's first access; the last op runs to step_end_s) when the trace has times.
// Throws InvalidArgument naming the access index and field for malformed traces.
Graph graph_from_trace(const Trace& trace, std::string name = "trace");

// The type of every op graph_from_trace makes.
inline constexpr std::string_view kRecordedOpType = "recorded";

// Whether g is a recorded step (every op of type kRecordedOpType, also after a JSON round
// trip). Its weights are whatever blocks existed before the step (parameters, gradients,
// optimizer state, buffers, caches), as bytes: they count bytes held, not parameters.
bool is_recorded_step(const Graph& g);

}  // namespace spill::graph

// Liveness of each tensor over one step, the memory curve it implies, and each tensor's idle
// gaps (the stretches between two uses, where it could sit on the host).
// Memory model: a tensor occupies its bytes from its first write (step start for weights,
// optimizer state and inputs) to its last use (step end for weights and optimizer state, which
// outlive the step); an op's workspace occupies memory only while it runs. memory[i] is what is
// allocated while op i runs, so the curve's maximum is the peak with unlimited memory.
#pragma once

#include <cstdint>
#include <vector>

#include "graph/ir.hpp"

namespace spill::graph {

struct Interval {
  std::int64_t first = -1;  // first op at which the tensor occupies memory; -1: never
  std::int64_t last = -1;   // last such op (inclusive)
  bool live_at(std::int64_t i) const { return first >= 0 && first <= i && i <= last; }
};

struct Liveness {
  std::vector<std::vector<OpIndex>> uses;  // per tensor, the ops that read or write it, sorted
  std::vector<Interval> live;              // per tensor
  std::vector<std::uint64_t> memory;       // per op: bytes allocated while it runs
  std::uint64_t peak = 0;
  OpIndex peak_op = 0;
};

Liveness analyze_liveness(const Graph& g);

// The distinct tensors an op reads or writes, sorted, into `out` (reused between calls).
void op_tensors(const Op& op, std::vector<TensorIndex>& out);

// Bytes an op cannot run without: the unique tensors it reads or writes plus its workspace.
std::vector<std::uint64_t> working_sets(const Graph& g);

// An idle gap: the tensor is used at op `from` and next at op `to` and by nothing in between.
// For weights and optimizer state the gap from the last use in the step to the first use in the
// next step "wraps": then `to` is (first use + number of ops) and `from` the last use. A tensor
// held to the step's end (Tensor::held_to_step_end) and not carried over has a "dead" gap from
// its last use to the step's end: `to` is the number of ops, and nothing needs it back.
struct Gap {
  TensorIndex tensor = 0;
  std::int64_t from = 0;
  std::int64_t to = 0;
  bool wraps = false;
  // Evicting here needs a copy to the host: the tensor was written at or before `from` (for a
  // wrapping gap: anywhere in the step). A clean tensor's host copy is still valid.
  bool dirty = true;
  bool dead = false;  // held past its last use: evicted there, it is never prefetched
  std::int64_t idle_ops() const { return to - from - 1; }
};

// Every gap with at least one idle op, of tensors of at least `min_bytes`, sorted by `from`.
std::vector<Gap> idle_gaps(const Graph& g, const Liveness& l, std::uint64_t min_bytes = 0);

}  // namespace spill::graph

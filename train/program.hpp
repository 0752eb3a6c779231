// A model's training step as the trainer runs it: tensors with sizes and kinds, and ops in
// execution order, each reading and writing tensors and enqueuing kernels. The same structure
// becomes a graph::Graph (to_graph), so the planner plans exactly what the executor runs: the
// graph's tensor sizes are what the caching allocator maps for them, and its op costs and times
// are what the kernels charge (found by running each op with a cost recorder attached).
// Invariants (checked by to_graph through graph::Graph::validate): an op's tensors exist; a
// tensor that does not exist at step start (activation, gradient, workspace) is first
// referenced by an op that writes it, and every element of it that is read later is written
// (flat gradient blocks are filled by several ops, each writing its own part). The loss tensor
// is read back on a side stream and lives until the step's last op (the graph says so).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "device/device.hpp"
#include "graph/ir.hpp"
#include "kernels/kernels.hpp"

namespace spill::train {

using TensorId = std::uint32_t;

// How part of a persistent tensor starts: uniform in [-value, value] (seeded), or `value`.
struct InitSegment {
  std::size_t offset = 0;  // in elements
  std::size_t elems = 0;
  bool uniform = false;
  float value = 0.0f;
};

struct TensorSpec {
  std::string name;
  std::uint64_t bytes = 0;  // requested bytes
  graph::TensorKind kind = graph::TensorKind::Activation;
  graph::DType dtype = graph::DType::F32;
  std::vector<InitSegment> init;  // weights: how to fill; other persistent tensors start at 0
};

// What an op's code sees: the device address of each tensor, the kernels and the stream.
struct OpContext {
  kernels::Kernels& k;
  Stream stream;
  int step;  // optimizer step, counting from 1
  const std::vector<void*>& ptrs;
  float* f(TensorId t) const { return static_cast<float*>(ptrs[t]); }
  std::int32_t* i32(TensorId t) const { return static_cast<std::int32_t*>(ptrs[t]); }
};

struct OpSpec {
  std::string name;
  std::string type;  // "matmul", "layernorm", "attention", ... for reports
  graph::Phase phase = graph::Phase::Other;
  int layer = -1;
  std::vector<TensorId> reads, writes;  // an in-place tensor is in both
  std::function<void(const OpContext&)> run;
  // run() is a pure function of `reads` that makes `writes` (graph::Op::recomputable): the
  // executor may run it again to remake a tensor a plan dropped.
  bool recomputable = false;
};

struct Program {
  std::string name;
  std::vector<TensorSpec> tensors;
  std::vector<OpSpec> ops;
  TensorId loss = 0;  // the scalar loss (float), written by one forward op
  std::uint64_t parameters = 0;
  // Fills input tensor `t` for step `step` (0-based): the seeded synthetic task.
  std::function<void(int step, TensorId t, std::span<std::byte> out)> batch;
  std::uint64_t seed = 1;  // of the weights' initialisation

  TensorId add_tensor(TensorSpec t);
  void add_op(OpSpec op);
  // Fills a persistent tensor's initial bytes (its InitSegments; zeros elsewhere).
  void initial_value(TensorId t, std::span<std::byte> out) const;
};

// The graph of one step. `alloc_bytes` maps a requested size to what the allocator maps for
// it; each op's FLOPs and bytes are its kernels' costs and its time their `roofline` times, as
// the simulated device charges them (with `measured`, one time per op, those are used).
graph::Graph to_graph(const Program& p, kernels::Kernels& k, const kernels::Roofline& roofline,
                      const std::function<std::uint64_t(std::uint64_t)>& alloc_bytes,
                      const std::vector<double>* measured = nullptr);

// Element count of a float tensor.
inline std::size_t elems(const TensorSpec& t) { return static_cast<std::size_t>(t.bytes / 4); }

}  // namespace spill::train

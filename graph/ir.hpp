// The tensor-access graph: tensors with sizes and kinds, and ops in execution order that read
// and write them. It is what the zoo builds, what JSON files and recorded traces turn into, and
// what liveness, the planner and the simulator consume.
// Invariants (checked by validate()): every tensor referenced by an op exists; no tensor is read
// before it is written unless it exists at step start (weight, buffer, optimizer state, input);
// sizes, FLOPs, bytes and times are non-negative and finite; all tensor bytes plus the largest
// workspace stay within 2^63 - 1 (so liveness, planner and simulator sums cannot wrap);
// batch-proportional parts are at most the whole and, for tensor bytes, a whole number of bytes
// per sample; only a tensor made in the step is held to the step's end, and only a held one
// is carried over; a recomputable op writes at least one tensor, only activations, none that it reads,
// and is the only op that writes them. Execution order is the vector order, so a valid graph is acyclic by construction.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace spill::graph {

// Index of a tensor in Graph::tensors / of an op in Graph::ops. Plans and analyses use these.
using TensorIndex = std::uint32_t;
using OpIndex = std::uint32_t;

enum class DType { F32, F16, BF16, TF32, F64, I64, I32, U8 };
// Buffer: model state that is not a parameter (batch-norm running statistics, masks): exists at
// step start and outlives it like a weight, but is not counted as a parameter.
enum class TensorKind { Weight, Activation, Gradient, OptimizerState, Workspace, Input, Buffer };
enum class Phase { Forward, Backward, Optimizer, Other };

std::size_t dtype_size(DType d);
const char* to_string(DType d);
const char* to_string(TensorKind k);
const char* to_string(Phase p);
std::optional<DType> parse_dtype(std::string_view s);
std::optional<TensorKind> parse_tensor_kind(std::string_view s);
std::optional<Phase> parse_phase(std::string_view s);

// Weights, buffers, optimizer state and inputs exist when the step begins; everything else is
// created by the op that first writes it. Weights, buffers and optimizer state outlive the step.
bool exists_at_start(TensorKind k);
bool persistent(TensorKind k);

struct Tensor {
  std::uint64_t id = 0;  // caller's id (a block id for graphs from traces); unique in a graph
  std::string name;
  std::uint64_t bytes = 0;
  DType dtype = DType::F32;
  TensorKind kind = TensorKind::Activation;
  // Part of `bytes` proportional to the batch (Graph::batch samples); 0 when it does not grow.
  std::uint64_t batch_bytes = 0;
  // Freed at the step's end, not after its last use (PyTorch's parameter gradients: `.grad`
  // is kept to the next zero_grad). Only for kinds made in the step; from its last use to the
  // end it is idle: a plan may evict it there for the rest of the step (Swap::to_step_end).
  bool held_to_step_end = false;
  // Held, and the next step reads it (optimizer state replaced out of place, there an input):
  // a plan keeps it on the device past its last use, as the next step expects it there (no
  // dead gap). (Not a gradient that zero_grad() zeroes: its next step only writes it, and
  // spill brings it back without a copy.)
  bool carried_over = false;
};

struct Op {
  std::string name;
  std::string type;                 // "conv", "matmul", "relu", ... free-form, for reports
  Phase phase = Phase::Other;
  int layer = -1;                   // model layer this op belongs to, -1 when unknown
  std::vector<TensorIndex> reads;
  std::vector<TensorIndex> writes;  // a tensor both read and written (in place) is in both
  double flops = 0;                 // arithmetic work
  double bytes = 0;                 // device-memory traffic; 0 means "sum of the tensors touched"
  std::optional<double> time_s;     // measured duration; when absent a device model estimates it
  std::uint64_t workspace_bytes = 0;  // scratch that lives only while the op runs
  double batch_flops = 0;           // parts of flops / bytes proportional to the batch
  double batch_bytes = 0;
  // The op may be run again to remake what it writes (a plan's recompute, graph/plan.hpp): it is
  // a pure, deterministic function of its reads (no RNG unless its seed is a read), reads none
  // of the tensors it writes (not in place), and writes only activations that it makes (their
  // first writer, and no other op writes them). validate() checks what the graph can show.
  bool recomputable = false;
};

struct Graph {
  std::string name;
  std::vector<Tensor> tensors;
  std::vector<Op> ops;
  // Samples per step when the batch_* fields say how sizes scale with it (graph/batch.hpp);
  // 0 when the graph cannot be rescaled.
  std::uint64_t batch = 0;

  TensorIndex add_tensor(Tensor t);
  OpIndex add_op(Op op);

  // Throws InvalidArgument naming the op (index and name), the field and the tensor at fault.
  void validate() const;

  // Sum of the bytes of all tensors (the memory needed if nothing were ever freed).
  std::uint64_t total_tensor_bytes() const;
  // Parameter count: elements of all weight tensors.
  std::uint64_t parameter_count() const;
  // Sum of op FLOPs, optionally of one phase.
  double total_flops(std::optional<Phase> phase = std::nullopt) const;
};

// Bytes an op moves through device memory: its `bytes` field, or the sum of its tensors.
double op_traffic_bytes(const Graph& g, const Op& op);

}  // namespace spill::graph

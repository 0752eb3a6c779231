#include "graph/ir.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_set>

#include "core/checked.hpp"
#include "core/errors.hpp"

namespace spill::graph {
namespace {

struct DTypeName {
  DType d;
  const char* name;
  std::size_t size;
};
constexpr DTypeName kDTypes[] = {
    {DType::F32, "f32", 4}, {DType::F16, "f16", 2}, {DType::BF16, "bf16", 2},
    {DType::TF32, "tf32", 4}, {DType::F64, "f64", 8}, {DType::I64, "i64", 8},
    {DType::I32, "i32", 4}, {DType::U8, "u8", 1},
};

constexpr std::pair<TensorKind, const char*> kKinds[] = {
    {TensorKind::Weight, "weight"},         {TensorKind::Activation, "activation"},
    {TensorKind::Gradient, "gradient"},     {TensorKind::OptimizerState, "optimizer_state"},
    {TensorKind::Workspace, "workspace"},   {TensorKind::Input, "input"},
    {TensorKind::Buffer, "buffer"},
};

constexpr std::pair<Phase, const char*> kPhases[] = {
    {Phase::Forward, "forward"}, {Phase::Backward, "backward"},
    {Phase::Optimizer, "optimizer"}, {Phase::Other, "other"},
};

std::string op_where(const Graph& g, std::size_t i) {
  return "op " + std::to_string(i) + " ('" + g.ops[i].name + "')";
}

// The contract of Op::recomputable that the graph can show (purity it cannot): the op makes
// activations, reads none of them, and nothing else writes them.
void check_recomputable(const Graph& g, const std::vector<std::size_t>& first_writer) {
  std::vector<std::size_t> writers(g.tensors.size(), 0), last(g.tensors.size(), g.ops.size());
  for (std::size_t i = 0; i < g.ops.size(); ++i)
    for (TensorIndex t : g.ops[i].writes)
      if (last[t] != i) {
        last[t] = i;
        ++writers[t];
      }
  for (std::size_t i = 0; i < g.ops.size(); ++i) {
    const Op& op = g.ops[i];
    if (!op.recomputable) continue;
    const std::string at = "graph '" + g.name + "': " + op_where(g, i) + " is recomputable but ";
    SPILL_EXPECTS(!op.writes.empty(), at + "writes nothing");
    for (TensorIndex t : op.writes) {
      const std::string what = "tensor '" + g.tensors[t].name + "'";
      SPILL_EXPECTS(std::find(op.reads.begin(), op.reads.end(), t) == op.reads.end(),
                    at + "reads " + what + ", which it writes (in place)");
      SPILL_EXPECTS(g.tensors[t].kind == TensorKind::Activation,
                    at + "writes " + what + " (" + to_string(g.tensors[t].kind) +
                        "): it may write only activations");
      SPILL_EXPECTS(first_writer[t] == i && writers[t] == 1,
                    at + "does not make " + what + ": another op writes it too");
    }
  }
}

}  // namespace

std::size_t dtype_size(DType d) {
  for (const auto& e : kDTypes)
    if (e.d == d) return e.size;
  return 4;
}
const char* to_string(DType d) {
  for (const auto& e : kDTypes)
    if (e.d == d) return e.name;
  return "?";
}
const char* to_string(TensorKind k) {
  for (const auto& [v, n] : kKinds)
    if (v == k) return n;
  return "?";
}
const char* to_string(Phase p) {
  for (const auto& [v, n] : kPhases)
    if (v == p) return n;
  return "?";
}
std::optional<DType> parse_dtype(std::string_view s) {
  for (const auto& e : kDTypes)
    if (s == e.name) return e.d;
  return std::nullopt;
}
std::optional<TensorKind> parse_tensor_kind(std::string_view s) {
  for (const auto& [v, n] : kKinds)
    if (s == n) return v;
  return std::nullopt;
}
std::optional<Phase> parse_phase(std::string_view s) {
  for (const auto& [v, n] : kPhases)
    if (s == n) return v;
  return std::nullopt;
}

bool exists_at_start(TensorKind k) {
  return persistent(k) || k == TensorKind::Input;
}
bool persistent(TensorKind k) {
  return k == TensorKind::Weight || k == TensorKind::OptimizerState || k == TensorKind::Buffer;
}

TensorIndex Graph::add_tensor(Tensor t) {
  tensors.push_back(std::move(t));
  return static_cast<TensorIndex>(tensors.size() - 1);
}

OpIndex Graph::add_op(Op op) {
  ops.push_back(std::move(op));
  return static_cast<OpIndex>(ops.size() - 1);
}

void Graph::validate() const {
  SPILL_EXPECTS(tensors.size() < std::numeric_limits<TensorIndex>::max() &&
                    ops.size() < std::numeric_limits<OpIndex>::max(),
                "graph '" + name + "': " + std::to_string(tensors.size()) + " tensors and " +
                    std::to_string(ops.size()) + " ops: at most 2^32 - 2 of each");
  // Every sum of sizes downstream (liveness curves, budgets, the simulator's mapped bytes) is at
  // most all tensors plus the largest workspace: bound that, and no later sum can wrap.
  std::uint64_t total = 0;
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    auto sum = add_within(total, tensors[t].bytes);
    SPILL_EXPECTS(sum, "graph '" + name + "': tensor " + std::to_string(t) + " ('" +
                           tensors[t].name + "'): " + std::to_string(tensors[t].bytes) +
                           " bytes: the step's total passes 2^63 - 1 bytes");
    total = *sum;
  }
  for (std::size_t i = 0; i < ops.size(); ++i) {
    SPILL_EXPECTS(add_within(total, ops[i].workspace_bytes),
                  "graph '" + name + "': " + op_where(*this, i) + " workspace_bytes " +
                      std::to_string(ops[i].workspace_bytes) + ": with the tensors' " +
                      std::to_string(total) + " bytes the step's total passes 2^63 - 1 bytes");
  }
  std::unordered_set<std::uint64_t> ids;
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    SPILL_EXPECTS(ids.insert(tensors[t].id).second,
                  "graph '" + name + "': tensor " + std::to_string(t) + " ('" + tensors[t].name +
                      "') repeats id " + std::to_string(tensors[t].id));
  }
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    const Tensor& x = tensors[t];
    SPILL_EXPECTS(!x.held_to_step_end || !exists_at_start(x.kind),
                  "graph '" + name + "': tensor " + std::to_string(t) + " ('" + x.name +
                      "') is held to the step's end but its kind '" + to_string(x.kind) +
                      "' exists at the step's start (only activation, gradient and workspace "
                      "tensors, made in the step, are held)");
    SPILL_EXPECTS(!x.carried_over || x.held_to_step_end,
                  "graph '" + name + "': tensor " + std::to_string(t) + " ('" + x.name +
                      "') is carried over to the next step but not held to the step's end");
    const std::string where = "graph '" + name + "': tensor " + std::to_string(t) + " ('" +
                              x.name + "') batch_bytes ";
    SPILL_EXPECTS(x.batch_bytes <= x.bytes, where + std::to_string(x.batch_bytes) +
                                                " exceeds its bytes " + std::to_string(x.bytes));
    SPILL_EXPECTS(x.batch_bytes == 0 || (batch > 0 && x.batch_bytes % batch == 0),
                  where + std::to_string(x.batch_bytes) +
                      (batch == 0 ? " needs the graph's batch"
                                  : " is not a whole number of bytes per sample (batch " +
                                        std::to_string(batch) + ")"));
  }
  std::vector<bool> written(tensors.size(), false);
  for (std::size_t t = 0; t < tensors.size(); ++t) written[t] = exists_at_start(tensors[t].kind);
  // The first writer of each tensor, to tell "never written" from "written later" (a cycle:
  // ops listed in an order that makes one consume what a later one produces).
  std::vector<std::size_t> first_writer(tensors.size(), ops.size());
  for (std::size_t i = ops.size(); i-- > 0;)
    for (TensorIndex t : ops[i].writes)
      if (t < tensors.size()) first_writer[t] = i;
  for (std::size_t i = 0; i < ops.size(); ++i) {
    const Op& op = ops[i];
    auto check_finite = [&](double v, const char* field) {
      SPILL_EXPECTS(std::isfinite(v) && v >= 0,
                    "graph '" + name + "': " + op_where(*this, i) + " field '" + field +
                        "' must be a non-negative number, got " + std::to_string(v));
    };
    check_finite(op.flops, "flops");
    check_finite(op.bytes, "bytes");
    if (op.time_s) check_finite(*op.time_s, "time_s");
    check_finite(op.batch_flops, "batch_flops");
    check_finite(op.batch_bytes, "batch_bytes");
    SPILL_EXPECTS(op.batch_flops <= op.flops && op.batch_bytes <= op.bytes,
                  "graph '" + name + "': " + op_where(*this, i) +
                      " batch_flops / batch_bytes exceed its flops / bytes");
    SPILL_EXPECTS(batch > 0 || (op.batch_flops == 0 && op.batch_bytes == 0),
                  "graph '" + name + "': " + op_where(*this, i) +
                      " has batch_flops / batch_bytes but the graph has no batch");
    for (const char* field : {"reads", "writes"}) {
      const auto& list = field[0] == 'r' ? op.reads : op.writes;
      for (std::size_t k = 0; k < list.size(); ++k) {
        SPILL_EXPECTS(list[k] < tensors.size(),
                      "graph '" + name + "': " + op_where(*this, i) + " field '" + field + "[" +
                          std::to_string(k) + "]' refers to missing tensor index " +
                          std::to_string(list[k]));
      }
    }
    for (std::size_t k = 0; k < op.reads.size(); ++k) {
      TensorIndex t = op.reads[k];
      // A tensor read and written by the same op that nobody wrote before is still an error:
      // its input bytes would be garbage.
      if (written[t]) continue;
      std::string why = first_writer[t] < ops.size()
                            ? "which is first written later by " + op_where(*this, first_writer[t]) +
                                  " (a cycle, or ops out of execution order)"
                            : "which no op ever writes";
      throw InvalidArgument("graph '" + name + "': " + op_where(*this, i) + " field 'reads[" +
                            std::to_string(k) + "]' reads tensor '" + tensors[t].name + "' (" +
                            to_string(tensors[t].kind) + ") " + why);
    }
    for (TensorIndex t : op.writes) written[t] = true;
  }
  check_recomputable(*this, first_writer);
}

std::uint64_t Graph::total_tensor_bytes() const {
  std::uint64_t sum = 0;
  for (const Tensor& t : tensors) sum += t.bytes;
  return sum;
}

std::uint64_t Graph::parameter_count() const {
  std::uint64_t n = 0;
  for (const Tensor& t : tensors)
    if (t.kind == TensorKind::Weight) n += t.bytes / dtype_size(t.dtype);
  return n;
}

double Graph::total_flops(std::optional<Phase> phase) const {
  double sum = 0;
  for (const Op& op : ops)
    if (!phase || op.phase == *phase) sum += op.flops;
  return sum;
}

double op_traffic_bytes(const Graph& g, const Op& op) {
  if (op.bytes > 0) return op.bytes;
  double sum = 0;
  for (TensorIndex t : op.reads) sum += static_cast<double>(g.tensors[t].bytes);
  for (TensorIndex t : op.writes) sum += static_cast<double>(g.tensors[t].bytes);
  return sum;
}

}  // namespace spill::graph

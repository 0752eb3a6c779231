#include "graph/trace.hpp"

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "core/errors.hpp"

namespace spill::graph {

const char* to_string(Access a) {
  switch (a) {
    case Access::Read: return "read";
    case Access::Write: return "write";
    case Access::ReadWrite: return "read_write";
  }
  return "?";
}

bool is_recorded_step(const Graph& g) {
  return !g.ops.empty() &&
         std::all_of(g.ops.begin(), g.ops.end(), [](const Op& op) { return op.type == kRecordedOpType; });
}

Graph graph_from_trace(const Trace& trace, std::string name) {
  Graph g;
  g.name = std::move(name);
  std::unordered_map<std::uint64_t, TensorIndex> tensor_of;
  std::vector<std::uint32_t> op_ids;      // trace op index of each graph op
  std::vector<double> first_time;         // first access time of each graph op
  bool timed = false;
  for (std::size_t k = 0; k < trace.accesses.size(); ++k) {
    const TraceAccess& a = trace.accesses[k];
    const std::string at = "trace '" + g.name + "' access " + std::to_string(k);
    SPILL_EXPECTS(a.bytes > 0, at + ": field 'bytes' must be positive (block " +
                                   std::to_string(a.block) + ")");
    SPILL_EXPECTS(std::isfinite(a.time_s) && a.time_s >= 0,
                  at + ": field 'time_s' must be a non-negative number");
    if (!op_ids.empty()) {
      SPILL_EXPECTS(a.op >= op_ids.back(), at + ": field 'op' goes back from " +
                                               std::to_string(op_ids.back()) + " to " +
                                               std::to_string(a.op));
      SPILL_EXPECTS(a.time_s >= first_time.back() || a.op == op_ids.back(),
                    at + ": field 'time_s' goes back in time");
    }
    if (op_ids.empty() || a.op != op_ids.back()) {
      Op op;
      // (an op without a name has "" in op_names when a later op of the step was named)
      const bool named = a.op < trace.op_names.size() && !trace.op_names[a.op].empty();
      op.name = named ? trace.op_names[a.op] : "op" + std::to_string(a.op);
      op.type = std::string(kRecordedOpType);
      g.add_op(std::move(op));
      op_ids.push_back(a.op);
      first_time.push_back(a.time_s);
    }
    timed = timed || a.time_s > 0;
    auto [it, fresh] = tensor_of.try_emplace(a.block, TensorIndex(g.tensors.size()));
    if (fresh) {
      // A block read before anything wrote it in this step was there when the step began.
      TensorKind kind = a.access == Access::Write ? TensorKind::Activation : TensorKind::Weight;
      g.add_tensor({a.block, "block" + std::to_string(a.block), a.bytes, DType::U8, kind});
    } else {
      SPILL_EXPECTS(g.tensors[it->second].bytes == a.bytes,
                    at + ": field 'bytes' changes the size of block " + std::to_string(a.block) +
                        " from " + std::to_string(g.tensors[it->second].bytes) + " to " +
                        std::to_string(a.bytes));
    }
    Op& op = g.ops.back();
    auto add_unique = [](std::vector<TensorIndex>& v, TensorIndex t) {
      for (TensorIndex x : v)
        if (x == t) return;
      v.push_back(t);
    };
    if (a.access != Access::Write) add_unique(op.reads, it->second);
    if (a.access != Access::Read) add_unique(op.writes, it->second);
  }
  if (timed) {
    for (std::size_t i = 0; i < g.ops.size(); ++i) {
      double end = i + 1 < g.ops.size() ? first_time[i + 1]
                                        : std::max(trace.step_end_s, first_time[i]);
      g.ops[i].time_s = end - first_time[i];
    }
  }
  g.validate();
  return g;
}

}  // namespace spill::graph

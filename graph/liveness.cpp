#include "graph/liveness.hpp"

#include <algorithm>

namespace spill::graph {

Liveness analyze_liveness(const Graph& g) {
  const std::int64_t n = static_cast<std::int64_t>(g.ops.size());
  Liveness l;
  l.uses.resize(g.tensors.size());
  for (std::size_t i = 0; i < g.ops.size(); ++i) {
    for (const auto* list : {&g.ops[i].reads, &g.ops[i].writes})
      for (TensorIndex t : *list)
        if (l.uses[t].empty() || l.uses[t].back() != i) l.uses[t].push_back(OpIndex(i));
  }
  l.live.resize(g.tensors.size());
  // Difference array: +bytes where a tensor starts occupying memory, -bytes after it ends.
  std::vector<std::int64_t> delta(g.ops.size() + 1, 0);
  for (std::size_t t = 0; t < g.tensors.size(); ++t) {
    const Tensor& tensor = g.tensors[t];
    const auto& u = l.uses[t];
    Interval iv;
    if (persistent(tensor.kind)) {
      iv = {0, n - 1};
    } else if (!u.empty()) {
      iv.first = exists_at_start(tensor.kind) ? 0 : u.front();
      iv.last = tensor.held_to_step_end ? n - 1 : u.back();
    }
    if (n == 0) iv = {};
    l.live[t] = iv;
    if (iv.first < 0) continue;
    delta[iv.first] += static_cast<std::int64_t>(tensor.bytes);
    delta[iv.last + 1] -= static_cast<std::int64_t>(tensor.bytes);
  }
  l.memory.resize(g.ops.size());
  std::int64_t running = 0;
  for (std::size_t i = 0; i < g.ops.size(); ++i) {
    running += delta[i];
    l.memory[i] = static_cast<std::uint64_t>(running) + g.ops[i].workspace_bytes;
    if (l.memory[i] > l.peak) {
      l.peak = l.memory[i];
      l.peak_op = OpIndex(i);
    }
  }
  return l;
}

void op_tensors(const Op& op, std::vector<TensorIndex>& out) {
  out.assign(op.reads.begin(), op.reads.end());
  out.insert(out.end(), op.writes.begin(), op.writes.end());
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
}

std::vector<std::uint64_t> working_sets(const Graph& g) {
  std::vector<std::uint64_t> ws(g.ops.size());
  std::vector<TensorIndex> seen;
  for (std::size_t i = 0; i < g.ops.size(); ++i) {
    const Op& op = g.ops[i];
    op_tensors(op, seen);
    std::uint64_t sum = op.workspace_bytes;
    for (TensorIndex t : seen) sum += g.tensors[t].bytes;
    ws[i] = sum;
  }
  return ws;
}

std::vector<Gap> idle_gaps(const Graph& g, const Liveness& l, std::uint64_t min_bytes) {
  const std::int64_t n = static_cast<std::int64_t>(g.ops.size());
  // Per tensor, whether each use writes it, to know whether a gap starts dirty.
  std::vector<std::vector<bool>> writes(g.tensors.size());
  for (std::size_t t = 0; t < g.tensors.size(); ++t) writes[t].assign(l.uses[t].size(), false);
  for (std::size_t i = 0; i < g.ops.size(); ++i) {
    for (TensorIndex t : g.ops[i].writes) {
      const auto& u = l.uses[t];
      auto k = std::lower_bound(u.begin(), u.end(), OpIndex(i)) - u.begin();
      writes[t][k] = true;
    }
  }
  std::vector<Gap> gaps;
  for (std::size_t t = 0; t < g.tensors.size(); ++t) {
    const Tensor& tensor = g.tensors[t];
    const auto& u = l.uses[t];
    if (tensor.bytes < min_bytes || tensor.bytes == 0 || u.empty()) continue;
    bool written_so_far = false;
    for (std::size_t k = 0; k + 1 < u.size(); ++k) {
      written_so_far = written_so_far || writes[t][k];
      if (u[k + 1] > u[k] + 1)
        gaps.push_back({TensorIndex(t), u[k], u[k + 1], false, written_so_far});
    }
    if (tensor.held_to_step_end && !tensor.carried_over && u.back() + 1 < n) {
      const bool written = std::find(writes[t].begin(), writes[t].end(), true) != writes[t].end();
      gaps.push_back({TensorIndex(t), u.back(), n, false, written, true});
    }
    if (persistent(tensor.kind)) {
      Gap w{TensorIndex(t), u.back(), u.front() + n, true, false};
      for (bool b : writes[t]) w.dirty = w.dirty || b;
      if (w.idle_ops() > 0) gaps.push_back(w);
    }
  }
  std::sort(gaps.begin(), gaps.end(), [](const Gap& a, const Gap& b) {
    return a.from != b.from ? a.from < b.from : a.tensor < b.tensor;
  });
  return gaps;
}

}  // namespace spill::graph

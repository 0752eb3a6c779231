// Small builders for hand-made graphs in the graph/ tests.
#pragma once

#include <string>
#include <vector>

#include "core/link_model.hpp"
#include "graph/ir.hpp"

namespace spill::graph::testing {

inline TensorIndex tensor(Graph& g, const std::string& name, std::uint64_t bytes,
                          TensorKind kind = TensorKind::Activation) {
  return g.add_tensor({g.tensors.size(), name, bytes, DType::U8, kind});
}

inline OpIndex op(Graph& g, const std::string& name, std::vector<TensorIndex> reads,
                  std::vector<TensorIndex> writes, double time_s = 1e-3,
                  std::uint64_t workspace = 0) {
  Op o;
  o.name = name;
  o.reads = std::move(reads);
  o.writes = std::move(writes);
  o.time_s = time_s;
  o.workspace_bytes = workspace;
  return g.add_op(std::move(o));
}

// 1 GB/s each way, no latency, full duplex: 1 MB takes exactly 1 ms.
inline LinkModel unit_link(double duplex = 1.0) {
  LinkModel l;
  l.name = "unit";
  l.h2d_gbps = l.d2h_gbps = l.nominal_gbps = 1.0;
  l.latency_us = 0;
  l.duplex_efficiency = duplex;
  return l;
}

inline std::vector<double> times_of(const Graph& g) {
  std::vector<double> t;
  for (const Op& o : g.ops) t.push_back(*o.time_s);
  return t;
}

}  // namespace spill::graph::testing

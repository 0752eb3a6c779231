// JSON forms of graph/ data: the versioned graph format (docs/graph-format.md), plans (what the
// swapper would load) and simulated timelines (Chrome/Perfetto trace JSON).
// Reading is strict (core/json_read.hpp): unknown fields, wrong types, numbers out of range,
// missing tensors, reads of tensors never written, cycles and a step whose bytes pass 2^63 - 1
// are rejected with the JSON path of the offending field (e.g. "ops[3].reads[1]") and, for
// syntax errors, the line and column; nesting is limited to kMaxJsonDepth levels.
#pragma once

#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "graph/ir.hpp"
#include "graph/plan.hpp"
#include "graph/simulator.hpp"

namespace spill::graph {

// The newest version this build reads (it reads every version from 1).
inline constexpr int kGraphFormatVersion = 3;
// Bounds of an op's numbers on reading (documented in docs/graph-format.md): far above any real
// model, low enough that sums over millions of ops stay finite.
inline constexpr double kMaxGraphFlops = 1e30;
inline constexpr double kMaxOpSeconds = 1e9;

// The lowest version that holds `g`: 2 when it uses batch scaling or the buffer kind, else 1.
int graph_format_version(const Graph& g);
nlohmann::json graph_to_json(const Graph& g);
// `source` names the input (a file name) in error messages.
Graph graph_from_json(const nlohmann::json& j, std::string_view source = "graph");
Graph parse_graph(std::string_view text, std::string_view source = "graph");
Graph load_graph_file(const std::string& path);
void save_graph_file(const Graph& g, const std::string& path);

// {"format": "spill-plan", "version", "policy", "budget_bytes", "feasible", "reason",
//  "start_on_host": [tensor ids], "steps": [{"op", "evict_after": [ids], "prefetch": [ids]}]}
// with only the ops that have actions listed.
nlohmann::json plan_to_json(const Graph& g, const Plan& p);

// Chrome trace JSON: compute, stalls and each copy engine as tracks, mapped bytes as a counter.
nlohmann::json timeline_to_json(const Graph& g, const SimResult& r);

}  // namespace spill::graph

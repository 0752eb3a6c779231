#include "graph/graph_json.hpp"

#include <cmath>
#include <fstream>
#include <sstream>
#include <unordered_map>

#include "core/errors.hpp"

namespace spill::graph {

using nlohmann::json;

json graph_to_json(const Graph& g) {
  json tensors = json::array();
  for (const Tensor& t : g.tensors)
    tensors.push_back({{"id", t.id}, {"name", t.name}, {"bytes", t.bytes},
                       {"dtype", to_string(t.dtype)}, {"kind", to_string(t.kind)}});
  json ops = json::array();
  for (const Op& op : g.ops) {
    json reads = json::array(), writes = json::array();
    for (TensorIndex t : op.reads) reads.push_back(g.tensors[t].id);
    for (TensorIndex t : op.writes) writes.push_back(g.tensors[t].id);
    json o{{"name", op.name},   {"type", op.type},   {"phase", to_string(op.phase)},
           {"layer", op.layer}, {"reads", reads},    {"writes", writes},
           {"flops", op.flops}, {"bytes", op.bytes}, {"workspace_bytes", op.workspace_bytes}};
    if (op.time_s) o["time_s"] = *op.time_s;
    ops.push_back(std::move(o));
  }
  return {{"format", "spill-graph"}, {"version", kGraphFormatVersion}, {"name", g.name},
          {"tensors", tensors},      {"ops", ops}};
}

namespace {

// Reads fields of one JSON object, naming the object's path in every error.
class Fields {
 public:
  Fields(const json& j, std::string path, const std::string& source,
         std::initializer_list<const char*> known)
      : j_(j), path_(std::move(path)), source_(source) {
    SPILL_EXPECTS(j.is_object(), where("") + "must be an object");
    for (const auto& [key, value] : j.items()) {
      bool ok = false;
      for (const char* k : known) ok = ok || key == k;
      SPILL_EXPECTS(ok, where(key) + "unknown field");
    }
  }
  std::string where(const std::string& field) const {
    return source_ + ": " + path_ + (field.empty() ? "" : "." + field) + ": ";
  }
  bool has(const char* f) const { return j_.contains(f); }
  const json& get(const char* f) const {
    SPILL_EXPECTS(j_.contains(f), where(f) + "missing required field");
    return j_[f];
  }
  std::string str(const char* f, std::optional<std::string> dflt = std::nullopt) const {
    if (!has(f) && dflt) return *dflt;
    const json& v = get(f);
    SPILL_EXPECTS(v.is_string(), where(f) + "must be a string");
    return v.get<std::string>();
  }
  std::uint64_t uint(const char* f, std::optional<std::uint64_t> dflt = std::nullopt) const {
    if (!has(f) && dflt) return *dflt;
    const json& v = get(f);
    SPILL_EXPECTS(v.is_number_unsigned(),
                  where(f) + "must be a non-negative integer, got " + v.dump());
    return v.get<std::uint64_t>();
  }
  double number(const char* f, double dflt) const {
    if (!has(f)) return dflt;
    const json& v = j_[f];
    SPILL_EXPECTS(v.is_number() && std::isfinite(v.get<double>()) && v.get<double>() >= 0,
                  where(f) + "must be a non-negative number, got " + v.dump());
    return v.get<double>();
  }
  const std::string& path() const { return path_; }

 private:
  const json& j_;
  std::string path_;
  const std::string& source_;
};

std::string line_column(std::string_view text, std::size_t byte) {
  std::size_t line = 1, col = 1;
  for (std::size_t i = 0; i < byte && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      col = 1;
    } else {
      ++col;
    }
  }
  return "line " + std::to_string(line) + ", column " + std::to_string(col);
}

}  // namespace

Graph graph_from_json(const json& j, std::string_view source_view) {
  const std::string source(source_view);
  Fields top(j, "(top)", source, {"format", "version", "name", "tensors", "ops"});
  SPILL_EXPECTS(top.str("format") == "spill-graph",
                top.where("format") + "expected \"spill-graph\"");
  const std::uint64_t version = top.uint("version");
  SPILL_EXPECTS(version == kGraphFormatVersion,
                top.where("version") + "unsupported version " + std::to_string(version) +
                    " (this build reads version " + std::to_string(kGraphFormatVersion) + ")");
  Graph g;
  g.name = top.str("name", "graph");
  const json& tensors = top.get("tensors");
  SPILL_EXPECTS(tensors.is_array(), top.where("tensors") + "must be an array");
  std::unordered_map<std::uint64_t, TensorIndex> index_of;
  for (std::size_t k = 0; k < tensors.size(); ++k) {
    Fields f(tensors[k], "tensors[" + std::to_string(k) + "]", source,
             {"id", "name", "bytes", "dtype", "kind"});
    Tensor t;
    t.id = f.uint("id");
    t.name = f.str("name", "t" + std::to_string(t.id));
    t.bytes = f.uint("bytes");
    auto dtype = parse_dtype(f.str("dtype", std::string("f32")));
    SPILL_EXPECTS(dtype, f.where("dtype") + "unknown dtype '" + f.str("dtype") +
                             "' (known: f32, f16, bf16, tf32, f64, i64, i32, u8)");
    t.dtype = *dtype;
    auto kind = parse_tensor_kind(f.str("kind"));
    SPILL_EXPECTS(kind, f.where("kind") + "unknown kind '" + f.str("kind") +
                            "' (known: weight, activation, gradient, optimizer_state, "
                            "workspace, input)");
    t.kind = *kind;
    SPILL_EXPECTS(index_of.emplace(t.id, TensorIndex(k)).second,
                  f.where("id") + "repeats tensor id " + std::to_string(t.id));
    g.add_tensor(std::move(t));
  }
  const json& ops = top.get("ops");
  SPILL_EXPECTS(ops.is_array(), top.where("ops") + "must be an array");
  for (std::size_t i = 0; i < ops.size(); ++i) {
    Fields f(ops[i], "ops[" + std::to_string(i) + "]", source,
             {"name", "type", "phase", "layer", "reads", "writes", "flops", "bytes", "time_s",
              "workspace_bytes"});
    Op op;
    op.name = f.str("name", "op" + std::to_string(i));
    op.type = f.str("type", std::string(""));
    auto phase = parse_phase(f.str("phase", std::string("other")));
    SPILL_EXPECTS(phase, f.where("phase") + "unknown phase '" + f.str("phase") +
                             "' (known: forward, backward, optimizer, other)");
    op.phase = *phase;
    if (f.has("layer")) {
      const json& v = f.get("layer");
      SPILL_EXPECTS(v.is_number_integer() && v.get<std::int64_t>() >= -1,
                    f.where("layer") + "must be an integer >= -1");
      op.layer = int(v.get<std::int64_t>());
    }
    for (const char* list : {"reads", "writes"}) {
      if (!f.has(list)) continue;
      const json& arr = f.get(list);
      SPILL_EXPECTS(arr.is_array(), f.where(list) + "must be an array of tensor ids");
      for (std::size_t k = 0; k < arr.size(); ++k) {
        const std::string at = f.where(std::string(list) + "[" + std::to_string(k) + "]");
        SPILL_EXPECTS(arr[k].is_number_unsigned(), at + "must be a tensor id, got " +
                                                       arr[k].dump());
        auto it = index_of.find(arr[k].get<std::uint64_t>());
        SPILL_EXPECTS(it != index_of.end(),
                      at + "no tensor with id " + arr[k].dump() + " (op '" + op.name + "')");
        (list[0] == 'r' ? op.reads : op.writes).push_back(it->second);
      }
    }
    op.flops = f.number("flops", 0);
    op.bytes = f.number("bytes", 0);
    if (f.has("time_s")) op.time_s = f.number("time_s", 0);
    op.workspace_bytes = f.uint("workspace_bytes", 0);
    g.add_op(std::move(op));
  }
  try {
    g.validate();
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(source + ": " + e.what());
  }
  return g;
}

Graph parse_graph(std::string_view text, std::string_view source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw InvalidArgument(std::string(source) + ": not valid JSON at " +
                          line_column(text, e.byte == 0 ? 0 : e.byte - 1) + " (byte " +
                          std::to_string(e.byte) + ")");
  }
  return graph_from_json(j, source);
}

Graph load_graph_file(const std::string& path) {
  std::ifstream in(path);
  SPILL_EXPECTS(in.good(), "graph file '" + path + "' cannot be opened");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_graph(ss.str(), path);
}

void save_graph_file(const Graph& g, const std::string& path) {
  std::ofstream out(path);
  SPILL_EXPECTS(out.good(), "graph file '" + path + "' cannot be written");
  out << graph_to_json(g).dump(1) << "\n";
}

json plan_to_json(const Graph& g, const Plan& p) {
  json start = json::array(), steps = json::array();
  for (TensorIndex t : p.start_on_host) start.push_back(g.tensors[t].id);
  for (std::size_t i = 0; i < p.steps.size(); ++i) {
    const PlanStep& s = p.steps[i];
    if (s.evict_after.empty() && s.prefetch_at.empty()) continue;
    json ev = json::array(), pf = json::array();
    for (TensorIndex t : s.evict_after) ev.push_back(g.tensors[t].id);
    for (TensorIndex t : s.prefetch_at) pf.push_back(g.tensors[t].id);
    steps.push_back({{"op", i}, {"evict_after", ev}, {"prefetch", pf}});
  }
  return {{"format", "spill-plan"}, {"version", 1},           {"policy", p.policy},
          {"budget_bytes", p.budget_bytes}, {"feasible", p.feasible}, {"reason", p.reason},
          {"start_on_host", start}, {"steps", steps}};
}

json timeline_to_json(const Graph& g, const SimResult& r) {
  json events = json::array();
  auto track = [](TimelineEvent::Kind k) {
    switch (k) {
      case TimelineEvent::Kind::Compute: return 1;
      case TimelineEvent::Kind::Stall: return 2;
      case TimelineEvent::Kind::SwapIn: return 3;
      case TimelineEvent::Kind::SwapOut: return 4;
    }
    return 0;
  };
  const char* names[] = {"", "compute", "stall", "copy h2d", "copy d2h"};
  for (int tid = 1; tid <= 4; ++tid)
    events.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", 1}, {"tid", tid},
                      {"args", {{"name", names[tid]}}}});
  for (const TimelineEvent& e : r.timeline) {
    std::string name = e.tensor >= 0 ? g.tensors[std::size_t(e.tensor)].name
                                     : g.ops[std::size_t(e.op)].name;
    events.push_back({{"ph", "X"}, {"name", name}, {"cat", to_string(e.kind)}, {"pid", 1},
                      {"tid", track(e.kind)}, {"ts", e.start_s * 1e6},
                      {"dur", (e.end_s - e.start_s) * 1e6},
                      {"args", {{"op", e.op}, {"bytes", e.bytes}}}});
  }
  // Mapped bytes once each op's memory is in, at the op's compute start.
  std::size_t k = 0;
  for (const TimelineEvent& e : r.timeline) {
    if (e.kind != TimelineEvent::Kind::Compute || k >= r.mapped_at_op.size()) continue;
    events.push_back({{"ph", "C"}, {"name", "mapped bytes"}, {"pid", 1},
                      {"ts", e.start_s * 1e6}, {"args", {{"mapped", r.mapped_at_op[k++]}}}});
  }
  return {{"traceEvents", events}, {"displayTimeUnit", "ms"}, {"otherData", {{"simulated", true}}}};
}

}  // namespace spill::graph

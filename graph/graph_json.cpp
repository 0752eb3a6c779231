#include "graph/graph_json.hpp"

#include <limits>
#include <unordered_map>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "core/json_read.hpp"
#include "core/output_file.hpp"

namespace spill::graph {

using nlohmann::json;

int graph_format_version(const Graph& g) {
  bool v2 = g.batch > 0;
  for (const Tensor& t : g.tensors)
    v2 = v2 || t.kind == TensorKind::Buffer || t.batch_bytes > 0 || t.held_to_step_end ||
         t.carried_over;
  for (const Op& op : g.ops) v2 = v2 || op.batch_flops > 0 || op.batch_bytes > 0;
  for (const Op& op : g.ops)
    if (op.recomputable) return 3;
  return v2 ? 2 : 1;
}

json graph_to_json(const Graph& g) {
  json tensors = json::array();
  for (const Tensor& t : g.tensors) {
    json j{{"id", t.id},
           {"name", t.name},
           {"bytes", t.bytes},
           {"dtype", to_string(t.dtype)},
           {"kind", to_string(t.kind)}};
    if (t.batch_bytes > 0) j["batch_bytes"] = t.batch_bytes;
    if (t.held_to_step_end) j["held_to_step_end"] = true;
    if (t.carried_over) j["carried_over"] = true;
    tensors.push_back(std::move(j));
  }
  json ops = json::array();
  for (const Op& op : g.ops) {
    json reads = json::array(), writes = json::array();
    for (TensorIndex t : op.reads) reads.push_back(g.tensors[t].id);
    for (TensorIndex t : op.writes) writes.push_back(g.tensors[t].id);
    json o{{"name", op.name},   {"type", op.type},   {"phase", to_string(op.phase)},
           {"layer", op.layer}, {"reads", reads},    {"writes", writes},
           {"flops", op.flops}, {"bytes", op.bytes}, {"workspace_bytes", op.workspace_bytes}};
    if (op.time_s) o["time_s"] = *op.time_s;
    if (op.batch_flops > 0) o["batch_flops"] = op.batch_flops;
    if (op.batch_bytes > 0) o["batch_bytes"] = op.batch_bytes;
    if (op.recomputable) o["recomputable"] = true;
    ops.push_back(std::move(o));
  }
  json out{{"format", "spill-graph"}, {"version", graph_format_version(g)}, {"name", g.name}};
  if (g.batch > 0) out["batch"] = g.batch;
  out["tensors"] = std::move(tensors);
  out["ops"] = std::move(ops);
  return out;
}

namespace {

// Version 2's additions in a file that says version 1: named as such, not as unknown fields.
void refuse_newer_fields(const JsonValue& v, std::uint64_t version,
                         std::initializer_list<std::string_view> fields) {
  if (version >= 2 || !v.is_object()) return;
  for (std::string_view f : fields)
    if (v.has(f)) v.fail_field(f, "is a version 2 field (the file says version 1)");
}

}  // namespace

Graph graph_from_json(const json& j, std::string_view source) {
  const JsonValue top(j, std::string(source));
  top.expect_object();
  // The format first: a plan or a trace given as a graph is named as such, not by the first
  // of its fields a graph lacks.
  const std::string kind = which_spill_file(j);
  if (!top.has("format") && !kind.empty())
    top.fail_field("format", "missing: not a graph file" + kind);
  const std::string format = top.string_field("format");
  if (format != "spill-graph")
    top.fail_field("format", "expected \"spill-graph\", found \"" + format.substr(0, 64) +
                                 "\": not a graph file" + kind);
  const std::uint64_t version = top.uint_field("version", 0, UINT64_MAX);
  refuse_newer_fields(top, version, {"batch"});
  top.allow_only({"format", "version", "name", "batch", "tensors", "ops"});
  if (version < 1 || version > kGraphFormatVersion)
    top.fail_field("version", "unsupported version " + std::to_string(version) +
                                  " (this build reads versions 1 to " +
                                  std::to_string(kGraphFormatVersion) + ")");
  Graph g;
  g.name = top.string_field("name", std::string("graph"));
  g.batch = top.uint_field("batch", 1, std::numeric_limits<std::int32_t>::max(), 0);
  const JsonValue tensors = top.at("tensors");
  std::unordered_map<std::uint64_t, TensorIndex> index_of;
  for (std::size_t k = 0; k < tensors.size(); ++k) {
    const JsonValue f = tensors.at(k);
    refuse_newer_fields(f, version, {"batch_bytes", "held_to_step_end", "carried_over"});
    f.allow_only({"id", "name", "bytes", "dtype", "kind", "batch_bytes", "held_to_step_end",
                  "carried_over"});
    Tensor t;
    t.id = f.uint_field("id", 0, UINT64_MAX);
    t.name = f.string_field("name", "t" + std::to_string(t.id));
    t.bytes = f.uint_field("bytes", 0, kMaxBytes);
    const std::string dtype = f.string_field("dtype", std::string("f32"));
    auto d = parse_dtype(dtype);
    if (!d)
      f.fail_field("dtype", "unknown dtype " + quote_excerpt(dtype) +
                                " (known: f32, f16, bf16, tf32, f64, i64, i32, u8)");
    t.dtype = *d;
    const std::string kind_name = f.string_field("kind");
    auto kind = parse_tensor_kind(kind_name);
    if (!kind)
      f.fail_field("kind", "unknown kind " + quote_excerpt(kind_name) +
                               " (known: weight, activation, gradient, optimizer_state, "
                               "workspace, input, buffer)");
    if (*kind == TensorKind::Buffer && version < 2)
      f.fail_field("kind", "'buffer' is a version 2 kind (the file says version 1)");
    t.kind = *kind;
    t.batch_bytes = f.uint_field("batch_bytes", 0, kMaxBytes, 0);
    t.held_to_step_end = f.bool_field("held_to_step_end", false);
    if (t.held_to_step_end && exists_at_start(t.kind))
      f.fail_field("held_to_step_end", "is for tensors made in the step (activation, gradient, "
                                       "workspace); a '" + kind_name + "' exists at its start");
    t.carried_over = f.bool_field("carried_over", false);
    if (t.carried_over && !t.held_to_step_end)
      f.fail_field("carried_over", "is for a tensor held to the step's end (\"held_to_step_end\": "
                                   "true), which this one is not");
    if (!index_of.emplace(t.id, TensorIndex(k)).second)
      f.fail_field("id", "repeats tensor id " + std::to_string(t.id));
    g.add_tensor(std::move(t));
  }
  const JsonValue ops = top.at("ops");
  for (std::size_t i = 0; i < ops.size(); ++i) {
    const JsonValue f = ops.at(i);
    refuse_newer_fields(f, version, {"batch_flops", "batch_bytes"});
    if (version < 3 && f.has("recomputable"))
      f.fail_field("recomputable", "is a version 3 field (the file says version " +
                                       std::to_string(version) + ")");
    f.allow_only({"name", "type", "phase", "layer", "reads", "writes", "flops", "bytes", "time_s",
                  "workspace_bytes", "batch_flops", "batch_bytes", "recomputable"});
    Op op;
    op.name = f.string_field("name", "op" + std::to_string(i));
    op.type = f.string_field("type", std::string(""));
    const std::string phase_name = f.string_field("phase", std::string("other"));
    auto phase = parse_phase(phase_name);
    if (!phase)
      f.fail_field("phase", "unknown phase " + quote_excerpt(phase_name) +
                                " (known: forward, backward, optimizer, other)");
    op.phase = *phase;
    op.layer = int(f.int_field("layer", -1, std::numeric_limits<int>::max(), -1));
    for (const char* list : {"reads", "writes"}) {
      auto arr = f.find(list);
      if (!arr) continue;
      if (!arr->raw().is_array()) arr->fail("must be an array of tensor ids");
      for (std::size_t k = 0; k < arr->size(); ++k) {
        const JsonValue id = arr->at(k);
        auto it = index_of.find(id.as_uint());
        if (it == index_of.end())
          id.fail("no tensor with id " + std::to_string(id.as_uint()) + " (op " +
                  quote_excerpt(op.name) + ")");
        (list[0] == 'r' ? op.reads : op.writes).push_back(it->second);
      }
    }
    op.flops = f.number_field("flops", 0, kMaxGraphFlops, 0.0);
    op.bytes = f.number_field("bytes", 0, double(kMaxBytes), 0.0);
    if (f.has("time_s")) op.time_s = f.number_field("time_s", 0, kMaxOpSeconds);
    op.workspace_bytes = f.uint_field("workspace_bytes", 0, kMaxBytes, 0);
    op.batch_flops = f.number_field("batch_flops", 0, kMaxGraphFlops, 0.0);
    op.batch_bytes = f.number_field("batch_bytes", 0, double(kMaxBytes), 0.0);
    op.recomputable = f.bool_field("recomputable", false);
    g.add_op(std::move(op));
  }
  try {
    g.validate();
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(top.origin() + ": " + e.what());
  }
  return g;
}

Graph parse_graph(std::string_view text, std::string_view source) {
  return graph_from_json(parse_json(text, source), source);
}

Graph load_graph_file(const std::string& path) {
  const std::string origin = "graph file '" + path + "'";
  return parse_graph(read_file_text(path, origin), origin);
}

void save_graph_file(const Graph& g, const std::string& path) {
  // The text first, then the file: replaced whole or not at all (a failed write keeps the
  // previous graph).
  write_file(path, graph_to_json(g).dump(1) + "\n", "graph file");
}

json plan_to_json(const Graph& g, const Plan& p) {
  json start = json::array(), steps = json::array();
  for (TensorIndex t : p.start_on_host) start.push_back(g.tensors[t].id);
  for (std::size_t i = 0; i < p.steps.size(); ++i) {
    const PlanStep& s = p.steps[i];
    if (s.evict_after.empty() && s.prefetch_at.empty() && s.drop_after.empty() &&
        s.recompute_before.empty())
      continue;
    json ev = json::array(), pf = json::array();
    for (TensorIndex t : s.evict_after) ev.push_back(g.tensors[t].id);
    for (TensorIndex t : s.prefetch_at) pf.push_back(g.tensors[t].id);
    json step{{"op", i}, {"evict_after", ev}, {"prefetch", pf}};
    if (!p.recomputes.empty()) {  // version 2
      json dr = json::array(), rc = json::array();
      for (TensorIndex t : s.drop_after) dr.push_back(g.tensors[t].id);
      for (TensorIndex t : s.recompute_before) rc.push_back(g.tensors[t].id);
      step["drop_after"] = dr;
      step["recompute"] = rc;
    }
    steps.push_back(std::move(step));
  }
  return {{"format", "spill-plan"}, {"version", p.recomputes.empty() ? 1 : 2},
          {"policy", p.policy},
          {"budget_bytes", p.budget_bytes}, {"feasible", p.feasible}, {"reason", p.reason},
          {"start_on_host", start}, {"steps", steps}};
}

json timeline_to_json(const Graph& g, const SimResult& r) {
  json events = json::array();
  auto track = [](TimelineEvent::Kind k) {
    switch (k) {
      case TimelineEvent::Kind::Compute:
      case TimelineEvent::Kind::Recompute: return 1;
      case TimelineEvent::Kind::Stall: return 2;
      case TimelineEvent::Kind::SwapIn:
      case TimelineEvent::Kind::Upload: return 3;  // both copy host to device
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

// The JSON graph format: round trip, and every kind of malformed input rejected with the
// position (JSON path or line/column) and the field.
#include <gtest/gtest.h>

#include "core/errors.hpp"
#include "graph/graph_json.hpp"
#include "graph/zoo.hpp"

namespace spill::graph {
namespace {

void expect_same(const Graph& a, const Graph& b) {
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  ASSERT_EQ(a.ops.size(), b.ops.size());
  EXPECT_EQ(a.name, b.name);
  for (std::size_t t = 0; t < a.tensors.size(); ++t) {
    EXPECT_EQ(a.tensors[t].id, b.tensors[t].id);
    EXPECT_EQ(a.tensors[t].name, b.tensors[t].name);
    EXPECT_EQ(a.tensors[t].bytes, b.tensors[t].bytes);
    EXPECT_EQ(a.tensors[t].dtype, b.tensors[t].dtype);
    EXPECT_EQ(a.tensors[t].kind, b.tensors[t].kind);
  }
  for (std::size_t i = 0; i < a.ops.size(); ++i) {
    const Op &x = a.ops[i], &y = b.ops[i];
    EXPECT_EQ(x.name, y.name);
    EXPECT_EQ(x.type, y.type);
    EXPECT_EQ(x.phase, y.phase);
    EXPECT_EQ(x.layer, y.layer);
    EXPECT_EQ(x.reads, y.reads);
    EXPECT_EQ(x.writes, y.writes);
    EXPECT_EQ(x.flops, y.flops);
    EXPECT_EQ(x.bytes, y.bytes);
    EXPECT_EQ(x.time_s, y.time_s);
    EXPECT_EQ(x.workspace_bytes, y.workspace_bytes);
  }
}

TEST(GraphJson, RoundTripsAZooModel) {
  ZooOptions o;
  o.batch = 2;
  Graph g = build_model("resnet50", o);
  g.ops[3].time_s = 1.25e-3;
  g.ops[4].workspace_bytes = 4096;
  Graph back = parse_graph(graph_to_json(g).dump(), "mem");
  expect_same(g, back);
  // And through text twice gives identical text.
  EXPECT_EQ(graph_to_json(back).dump(), graph_to_json(g).dump());
}

const char* kGood = R"({
  "format": "spill-graph", "version": 1, "name": "tiny",
  "tensors": [
    {"id": 10, "name": "w", "bytes": 64, "dtype": "f32", "kind": "weight"},
    {"id": 11, "name": "y", "bytes": 32, "kind": "activation"}
  ],
  "ops": [
    {"name": "fwd", "phase": "forward", "reads": [10], "writes": [11], "flops": 100},
    {"name": "use", "reads": [11], "time_s": 0.001}
  ]
})";

TEST(GraphJson, ReadsAMinimalHandWrittenGraph) {
  Graph g = parse_graph(kGood, "tiny.json");
  ASSERT_EQ(g.ops.size(), 2u);
  EXPECT_EQ(g.tensors[1].dtype, DType::F32) << "dtype defaults to f32";
  EXPECT_EQ(g.ops[1].phase, Phase::Other);
  EXPECT_EQ(g.ops[0].reads, std::vector<TensorIndex>{0});
  EXPECT_EQ(*g.ops[1].time_s, 0.001);
}

struct Bad {
  const char* what;
  std::string from, to;  // replace in kGood
  std::vector<std::string> expect;  // substrings of the error
};

TEST(GraphJson, RejectsMalformedInputWithPositionAndField) {
  const Bad cases[] = {
      {"not json", "\"tensors\": [", "\"tensors\": [,", {"tiny.json", "not valid JSON", "line 3"}},
      {"wrong format", "\"spill-graph\"", "\"other\"", {"tiny.json: format"}},
      {"future version", "\"version\": 1", "\"version\": 4", {"tiny.json: version", "version 4"}},
      {"missing tensors", "\"tensors\"", "\"tensorz\"", {"tensorz", "unknown field"}},
      {"negative size", "\"bytes\": 64", "\"bytes\": -64", {"tensors[0].bytes", "-64"}},
      {"fractional size", "\"bytes\": 64", "\"bytes\": 6.5", {"tensors[0].bytes"}},
      {"unknown kind", "\"kind\": \"weight\"", "\"kind\": \"weights\"", {"tensors[0].kind"}},
      {"unknown dtype", "\"dtype\": \"f32\"", "\"dtype\": \"f33\"", {"tensors[0].dtype"}},
      {"duplicate id", "\"id\": 11", "\"id\": 10", {"tensors[1].id", "repeats"}},
      {"missing id", "\"id\": 11, ", "", {"tensors[1].id", "missing"}},
      {"missing tensor", "\"reads\": [11]", "\"reads\": [99]", {"ops[1].reads[0]", "99"}},
      {"read before write", "\"writes\": [11], ", "", {"op 1", "reads[0]", "no op ever writes"}},
      {"cycle",
       "\"reads\": [10], \"writes\": [11], \"flops\": 100},\n    {\"name\": \"use\", "
       "\"reads\": [11], \"time_s\": 0.001}",
       "\"reads\": [11], \"writes\": [10]},\n    {\"name\": \"use\", \"reads\": [10], "
       "\"writes\": [11]}",
       {"op 0", "reads[0]", "written later by op 1", "cycle"}},
      {"negative flops", "\"flops\": 100", "\"flops\": -1", {"ops[0].flops"}},
      {"reads not a list", "\"reads\": [11]", "\"reads\": 11", {"ops[1].reads"}},
      {"unknown op field", "\"flops\": 100", "\"flop\": 100", {"ops[0].flop", "unknown field"}},
      {"bad phase", "\"forward\"", "\"fwd\"", {"ops[0].phase"}},
      {"tensor not an object", "{\"id\": 11, \"name\": \"y\", \"bytes\": 32, \"kind\": "
                               "\"activation\"}", "7", {"tensors[1]", "object"}},
  };
  for (const Bad& b : cases) {
    SCOPED_TRACE(b.what);
    std::string text = kGood;
    auto at = text.find(b.from);
    ASSERT_NE(at, std::string::npos) << b.from;
    text.replace(at, b.from.size(), b.to);
    try {
      parse_graph(text, "tiny.json");
      ADD_FAILURE() << "accepted";
    } catch (const InvalidArgument& e) {
      for (const std::string& s : b.expect)
        EXPECT_NE(std::string(e.what()).find(s), std::string::npos)
            << "'" << s << "' not in: " << e.what();
    }
  }
}

TEST(GraphJson, PlanAndTimelineExports) {
  Graph g = parse_graph(kGood, "tiny.json");
  Plan p = Plan::from_swaps("spill", 1000, g.ops.size(), {});
  nlohmann::json j = plan_to_json(g, p);
  EXPECT_EQ(j["format"], "spill-plan");
  EXPECT_EQ(j["steps"].size(), 0u);
  LinkModel link = link_preset("pcie4");
  SimResult r = simulate(g, {1e-3, 1e-3}, link, nullptr, {1000, true});
  nlohmann::json t = timeline_to_json(g, r);
  std::size_t slices = 0;
  for (const auto& e : t["traceEvents"]) slices += e["ph"] == "X";
  EXPECT_EQ(slices, 2u);
  EXPECT_TRUE(t["otherData"]["simulated"].get<bool>());
}

}  // namespace
}  // namespace spill::graph

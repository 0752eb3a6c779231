// Graph format version 2 (captured steps): batch scaling and the buffer kind round-trip; a file
// that says version 1 cannot use them, and the error names the version needed; version 1 files
// still read, and graphs without version 2 features are still written as version 1.
#include <gtest/gtest.h>

#include "core/errors.hpp"
#include "graph/batch.hpp"
#include "graph/graph_json.hpp"
#include "graph/plan.hpp"
#include "graph/zoo.hpp"

namespace spill::graph {
namespace {

const char* kCaptured = R"({
  "format": "spill-graph", "version": 2, "name": "captured", "batch": 4,
  "tensors": [
    {"id": 0, "name": "fc.weight", "bytes": 64, "kind": "weight"},
    {"id": 1, "name": "bn.running_mean", "bytes": 16, "kind": "buffer"},
    {"id": 2, "name": "input0", "bytes": 32, "kind": "input", "batch_bytes": 32},
    {"id": 3, "name": "activation3", "bytes": 40, "kind": "activation", "batch_bytes": 32}
  ],
  "ops": [
    {"name": "fc:addmm", "type": "addmm", "phase": "forward", "layer": 0, "reads": [2, 0, 1],
     "writes": [3, 1], "flops": 100, "bytes": 136, "batch_flops": 64, "batch_bytes": 64},
    {"name": "loss:sum", "phase": "forward", "layer": 1, "reads": [3], "writes": []}
  ]
})";

std::string replaced(std::string text, const std::string& from, const std::string& to) {
  auto at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

void expect_error(const std::string& text, std::initializer_list<const char*> parts) {
  try {
    parse_graph(text, "cap.json");
    ADD_FAILURE() << "accepted";
  } catch (const InvalidArgument& e) {
    for (const char* s : parts)
      EXPECT_NE(std::string(e.what()).find(s), std::string::npos)
          << "'" << s << "' not in: " << e.what();
  }
}

TEST(GraphJsonV2, ReadsAndRoundTripsBatchScalingAndBuffers) {
  Graph g = parse_graph(kCaptured, "cap.json");
  EXPECT_EQ(g.batch, 4u);
  EXPECT_EQ(g.tensors[1].kind, TensorKind::Buffer);
  EXPECT_EQ(g.tensors[3].batch_bytes, 32u);
  EXPECT_EQ(g.ops[0].batch_flops, 64);
  EXPECT_EQ(g.ops[0].batch_bytes, 64);
  EXPECT_EQ(g.parameter_count(), 16u);  // the weight only, not the buffer
  nlohmann::json j = graph_to_json(g);
  EXPECT_EQ(j["version"], 2);
  EXPECT_EQ(graph_to_json(parse_graph(j.dump(), "again")).dump(), j.dump());
  Graph b = at_batch(g, 8);
  EXPECT_EQ(b.tensors[3].bytes, 8u + 64u);
  EXPECT_EQ(graph_to_json(b)["batch"], 8);
}

TEST(GraphJsonV2, VersionOneFilesStillReadAndAreWrittenAsVersionOne) {
  ZooOptions o;
  o.batch = 2;
  Graph zoo = build_model("mlp", o);
  EXPECT_EQ(graph_to_json(zoo)["version"], 3) << "the zoo marks its pure layers recomputable";
  for (Op& op : zoo.ops) op.recomputable = false;
  nlohmann::json j = graph_to_json(zoo);
  EXPECT_EQ(j["version"], 1) << "nothing of version 2 or 3 left in a zoo graph";
  EXPECT_FALSE(j.contains("batch"));
  Graph back = parse_graph(j.dump(), "mlp.json");
  EXPECT_EQ(back.ops.size(), zoo.ops.size());
  EXPECT_EQ(back.batch, 0u);
}

TEST(GraphJsonV2, VersionTwoFieldsInAVersionOneFileNameTheVersion) {
  const std::string v1 = replaced(kCaptured, "\"version\": 2", "\"version\": 1");
  expect_error(v1, {"cap.json: batch", "version 2"});
  std::string no_batch = replaced(v1, "\"batch\": 4,", "");
  expect_error(no_batch, {"tensors[1].kind", "'buffer'", "version 2"});
  std::string no_buffer = replaced(no_batch, "\"kind\": \"buffer\"", "\"kind\": \"weight\"");
  expect_error(no_buffer, {"tensors[2].batch_bytes", "version 2"});
}

// `text` has boolean tensor field `field` (`member`) true on tensor 3 only: it reads so, is
// written only where true and round-trips; a value that is not a boolean is refused.
Graph expect_flag_round_trips(const std::string& text, const std::string& field,
                              bool Tensor::*member) {
  Graph g = parse_graph(text, "cap.json");
  EXPECT_TRUE(g.tensors[3].*member);
  EXPECT_FALSE(g.tensors[2].*member);
  nlohmann::json j = graph_to_json(g);
  EXPECT_EQ(j["tensors"][3][field], true);
  EXPECT_FALSE(j["tensors"][2].contains(field));
  EXPECT_EQ(graph_to_json(parse_graph(j.dump(), "again")).dump(), j.dump());
  const std::string where = "tensors[3]." + field;
  expect_error(replaced(text, "\"" + field + "\": true", "\"" + field + "\": 1"),
               {where.c_str()});
  return g;
}

// held_to_step_end (a captured parameter gradient): a version 2 field, written only when
// true, refused on a kind that exists at the step's start.
TEST(GraphJsonV2, HeldToStepEndRoundTripsAndIsForTensorsMadeInTheStep) {
  const std::string held = replaced(kCaptured, "\"kind\": \"activation\",",
                                    "\"kind\": \"activation\", \"held_to_step_end\": true,");
  Graph g = expect_flag_round_trips(held, "held_to_step_end", &Tensor::held_to_step_end);
  expect_error(replaced(held, "\"version\": 2", "\"version\": 1"),
               {"cap.json: batch", "version 2"});
  expect_error(replaced(kCaptured, "\"kind\": \"weight\"",
                        "\"kind\": \"weight\", \"held_to_step_end\": true"),
               {"cap.json", "tensors[0].held_to_step_end", "made in the step", "'weight'"});
  // Without batch fields, held_to_step_end alone makes the file version 2.
  for (Tensor& t : g.tensors) t.batch_bytes = 0;
  for (Op& op : g.ops) op.batch_flops = op.batch_bytes = 0;
  g.batch = 0;
  for (Tensor& t : g.tensors)
    if (t.kind == TensorKind::Buffer) t.kind = TensorKind::Weight;
  EXPECT_EQ(graph_to_json(g)["version"], 2);
}

// carried_over (held, and used by the next step: optimizer state replaced out of place): a
// version 2 field beside held_to_step_end, written only when true, refused without it.
TEST(GraphJsonV2, CarriedOverRoundTripsAndNeedsHeldToStepEnd) {
  const std::string carried =
      replaced(kCaptured, "\"kind\": \"activation\",",
               "\"kind\": \"activation\", \"held_to_step_end\": true, \"carried_over\": true,");
  Graph g = expect_flag_round_trips(carried, "carried_over", &Tensor::carried_over);
  expect_error(replaced(carried, "\"held_to_step_end\": true, ", ""),
               {"cap.json", "tensors[3].carried_over", "held to the step's end"});
  g.tensors[3].held_to_step_end = false;
  EXPECT_THROW(g.validate(), InvalidArgument);
}

TEST(GraphJsonV2, RejectsInconsistentBatchFields) {
  expect_error(replaced(kCaptured, "\"batch_bytes\": 32}", "\"batch_bytes\": 30}"),
               {"cap.json", "input0", "bytes per sample"});
  expect_error(replaced(kCaptured, "\"batch_bytes\": 32}", "\"batch_bytes\": 48}"),
               {"cap.json", "input0", "exceeds"});
  expect_error(replaced(kCaptured, "\"batch_flops\": 64", "\"batch_flops\": 101"),
               {"cap.json", "fc:addmm", "batch_flops"});
  expect_error(replaced(kCaptured, "\"batch\": 4,", ""), {"cap.json", "needs the graph's batch"});
  expect_error(replaced(kCaptured, "\"batch\": 4", "\"batch\": -4"), {"cap.json: batch"});
  expect_error(replaced(kCaptured, "\"batch_flops\": 64", "\"batch_flops\": -1"),
               {"ops[0].batch_flops"});
}

// Version 3: an op's `recomputable` flag (graph/ir.hpp Op::recomputable).
const char* kPure = R"({
  "format": "spill-graph", "version": 3, "name": "pure",
  "tensors": [
    {"id": 0, "name": "x", "bytes": 64, "kind": "input"},
    {"id": 1, "name": "w", "bytes": 64, "kind": "weight"},
    {"id": 2, "name": "y", "bytes": 64, "kind": "activation"},
    {"id": 3, "name": "z", "bytes": 64, "kind": "activation"}
  ],
  "ops": [
    {"name": "make_y", "phase": "forward", "reads": [0, 1], "writes": [2], "recomputable": true},
    {"name": "make_z", "phase": "forward", "reads": [2], "writes": [3]},
    {"name": "use", "phase": "backward", "reads": [2, 3], "writes": []}
  ]
})";

TEST(GraphJsonV3, RecomputableRoundTripsAndIsWrittenAsVersionThree) {
  Graph g = parse_graph(kPure, "pure.json");
  EXPECT_TRUE(g.ops[0].recomputable);
  EXPECT_FALSE(g.ops[1].recomputable);
  nlohmann::json j = graph_to_json(g);
  EXPECT_EQ(j["version"], 3);
  EXPECT_TRUE(j["ops"][0]["recomputable"].get<bool>());
  EXPECT_FALSE(j["ops"][1].contains("recomputable"));
  EXPECT_EQ(graph_to_json(parse_graph(j.dump(), "again")).dump(), j.dump());
  g.ops[0].recomputable = false;  // nothing of version 3 left: written as version 1
  EXPECT_EQ(graph_to_json(g)["version"], 1);
}

TEST(GraphJsonV3, RecomputableNeedsVersionThreeAndAPureOp) {
  expect_error(replaced(kPure, "\"version\": 3", "\"version\": 2"),
               {"ops[0].recomputable", "version 3 field", "says version 2"});
  expect_error(replaced(kPure, "\"recomputable\": true", "\"recomputable\": 1"),
               {"ops[0].recomputable"});
  // In place: it reads what it writes.
  expect_error(replaced(replaced(kPure, ", \"recomputable\": true}", "}"),
                        "\"reads\": [2], \"writes\": [3]}",
                        "\"reads\": [2], \"writes\": [2, 3], \"recomputable\": true}"),
               {"op 1 ('make_z') is recomputable", "reads tensor 'y', which it writes"});
  // Writes a weight.
  expect_error(replaced(kPure, "\"reads\": [0, 1], \"writes\": [2]", "\"reads\": [0], \"writes\": [2, 1]"),
               {"op 0 ('make_y') is recomputable", "'w' (weight)", "only activations"});
  // Another op writes its output too.
  expect_error(replaced(kPure, "\"reads\": [2], \"writes\": [3]", "\"reads\": [2], \"writes\": [3, 2]"),
               {"op 0 ('make_y') is recomputable", "does not make tensor 'y'"});
  expect_error(replaced(replaced(kPure, "\"reads\": [2], \"writes\": [3]}",
                                 "\"reads\": [2], \"writes\": [], \"recomputable\": true}"),
                        "\"reads\": [2, 3]", "\"reads\": [2]"),
               {"op 1 ('make_z') is recomputable but writes nothing"});
}

TEST(GraphJsonV3, APlanThatRecomputesIsWrittenAsPlanVersionTwo) {
  Graph g = parse_graph(kPure, "pure.json");
  // y (id 2) is dropped after op 1 and remade before op 2: no op between, so add one.
  Op idle;
  idle.name = "idle";
  g.ops.insert(g.ops.begin() + 2, idle);
  g.ops[3].reads.push_back(0);  // x lives to the remake (the input it is made from)
  Plan p = Plan::from_swaps("spill", 1000, g.ops.size(), {}, {{2, 1, 3}});
  ASSERT_NO_THROW(check_plan(g, p));
  nlohmann::json j = plan_to_json(g, p);
  EXPECT_EQ(j["version"], 2);
  ASSERT_EQ(j["steps"].size(), 2u);
  EXPECT_EQ(j["steps"][0]["op"], 1);
  EXPECT_EQ(j["steps"][0]["drop_after"], nlohmann::json::array({2}));
  EXPECT_EQ(j["steps"][1]["op"], 3);
  EXPECT_EQ(j["steps"][1]["recompute"], nlohmann::json::array({2}));
  EXPECT_EQ(plan_to_json(g, Plan::from_swaps("spill", 1000, g.ops.size(), {}))["version"], 1);
}

TEST(GraphJsonV3, ZooForwardLayersAreRecomputableExceptBeforeAnInPlaceLayer) {
  // ResNet's convolutions and batch norms are followed by an in-place ReLU: only what nothing
  // overwrites is recomputable (the ReLU itself is in place, so never).
  Graph r = build_model("resnet50", {});
  int pure = 0;
  for (const Op& op : r.ops) {
    if (op.type == "relu") EXPECT_FALSE(op.recomputable) << op.name;
    pure += op.recomputable;
  }
  EXPECT_GT(pure, 0);
  Graph gpt = build_model("gpt2-small", {});
  for (const Op& op : gpt.ops) {
    if (op.phase != Phase::Forward || op.type == "loss") EXPECT_FALSE(op.recomputable) << op.name;
    else EXPECT_TRUE(op.recomputable) << op.name;
  }
}

}  // namespace
}  // namespace spill::graph

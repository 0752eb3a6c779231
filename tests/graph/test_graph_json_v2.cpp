// Graph format version 2 (captured steps): batch scaling and the buffer kind round-trip; a file
// that says version 1 cannot use them, and the error names the version needed; version 1 files
// still read, and graphs without version 2 features are still written as version 1.
#include <gtest/gtest.h>

#include "core/errors.hpp"
#include "graph/batch.hpp"
#include "graph/graph_json.hpp"
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
  nlohmann::json j = graph_to_json(zoo);
  EXPECT_EQ(j["version"], 1) << "nothing of version 2 in a zoo graph";
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

}  // namespace
}  // namespace spill::graph

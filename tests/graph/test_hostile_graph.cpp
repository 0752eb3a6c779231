// Graph files and model options from a hostile or careless source: every one ends in a correct
// answer or a clear error naming the file, the JSON path and the rule; none crashes, hangs or
// wraps a size into a wrong figure (issue 11). The fuzz test feeds mutated graph files through
// the reader and, when they are valid, through liveness, every planner and the simulator.
#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <string>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "graph/batch.hpp"
#include "graph/device_model.hpp"
#include "graph/evaluate.hpp"
#include "graph/graph_json.hpp"
#include "graph/liveness.hpp"
#include "graph/zoo.hpp"
#include "tests/hostile_helpers.hpp"

namespace spill::graph {
namespace {

using spill::test::error_of;
using spill::test::expect_mentions;

const char* kTiny = R"({
  "format": "spill-graph", "version": 1, "name": "tiny",
  "tensors": [
    {"id": 10, "name": "w", "bytes": 64, "dtype": "f32", "kind": "weight"},
    {"id": 11, "name": "x", "bytes": 4096, "kind": "input"},
    {"id": 12, "name": "y", "bytes": 2048, "dtype": "f16", "kind": "activation"},
    {"id": 13, "name": "gy", "bytes": 2048, "kind": "gradient"},
    {"id": 14, "name": "gw", "bytes": 64, "kind": "gradient"}
  ],
  "ops": [
    {"name": "fwd", "phase": "forward", "layer": 0, "reads": [10, 11], "writes": [12],
     "flops": 100, "workspace_bytes": 512},
    {"name": "loss", "phase": "forward", "layer": 1, "reads": [12], "writes": [13],
     "time_s": 0.001},
    {"name": "bwd", "phase": "backward", "layer": 0, "reads": [13, 11], "writes": [14],
     "bytes": 1e6},
    {"name": "step", "phase": "optimizer", "reads": [14, 10], "writes": [10]}
  ]
})";

// kTiny in version 2: its batch of 4 scales the input, the activations and the forward op.
std::string tiny_v2() {
  std::string t = spill::test::replaced(kTiny, "\"version\": 1, \"name\": \"tiny\"",
                                        "\"version\": 2, \"name\": \"tiny\", \"batch\": 4");
  t = spill::test::replaced(t, "\"bytes\": 4096, \"kind\"",
                            "\"bytes\": 4096, \"batch_bytes\": 4096, \"kind\"");
  t = spill::test::replaced(t, "\"bytes\": 2048, \"dtype\"",
                            "\"bytes\": 2048, \"batch_bytes\": 2048, \"dtype\"");
  return spill::test::replaced(t, "\"flops\": 100,", "\"flops\": 100, \"batch_flops\": 96,");
}

TEST(HostileGraph, NumbersOutOfRangeNameTheFileFieldAndRule) {
  struct Case {
    const char* from;
    const char* to;
    std::initializer_list<const char*> expect;
  };
  const Case cases[] = {
      {"\"layer\": 0", "\"layer\": 4294967296", {"g.json", "ops[0].layer", "4294967296"}},
      {"\"layer\": 0", "\"layer\": 2147483648", {"ops[0].layer", "2147483647"}},
      {"\"bytes\": 4096",
       "\"bytes\": 18446744073709551615",
       {"tensors[1].bytes", "[0, 9223372036854775807]", "18446744073709551615"}},
      {"\"bytes\": 4096", "\"bytes\": -1", {"tensors[1].bytes", "got -1"}},
      {"\"flops\": 100", "\"flops\": 1e400", {"g.json", "out of range", "line 12"}},
      {"\"flops\": 100", "\"flops\": 1e31", {"ops[0].flops", "1e+30"}},
      {"\"time_s\": 0.001", "\"time_s\": 1e300", {"ops[1].time_s"}},
      {"\"bytes\": 1e6", "\"bytes\": 1e19", {"ops[2].bytes"}},
      {"\"name\": \"w\"", "\"name\": 5", {"tensors[0].name", "must be a string, got 5"}},
      {"\"version\": 1", "\"version\": 4294967297", {"version", "4294967297"}},
      {"\"workspace_bytes\": 512",
       "\"workspace_bytes\": 9223372036854775808",
       {"ops[0].workspace_bytes"}},
      {"\"reads\": [14, 10]", "\"reads\": [14, -10]", {"ops[3].reads[1]", "got -10"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.to);
    expect_mentions(
        error_of([&] { parse_graph(spill::test::replaced(kTiny, c.from, c.to), "g.json"); }),
        c.expect);
  }
}

TEST(HostileGraph, AStepWhoseBytesPass2To63IsRefusedNamingTheTensor) {
  // Each tensor is in range; together they are not (the old reader said "peak 63 B, fits").
  std::string text =
      spill::test::replaced(kTiny, "\"bytes\": 4096", "\"bytes\": 4611686018427387904");
  text = spill::test::replaced(text, "\"bytes\": 2048, \"dtype\"",
                               "\"bytes\": 4611686018427387904, \"dtype\"");
  expect_mentions(error_of([&] { parse_graph(text, "g.json"); }),
                  {"g.json", "tensor 2 ('y')", "4611686018427387904 bytes",
                   "the step's total passes 2^63 - 1 bytes"});
  // The workspace counts too.
  text = spill::test::replaced(kTiny, "\"bytes\": 4096", "\"bytes\": 9223372036854771483");
  expect_mentions(error_of([&] { parse_graph(text, "g.json"); }),
                  {"op 0 ('fwd') workspace_bytes 512", "passes 2^63 - 1"});
}

TEST(HostileGraph, DeepNestingAndHugeValuesGiveShortErrors) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  std::string msg =
      error_of([&] { parse_graph(spill::test::replaced(kTiny, "\"w\"", deep), "g.json"); });
  expect_mentions(msg, {"g.json", "nested deeper than 64"});
  // Within the depth limit, a wrong-typed nested value is described, not printed.
  const std::string nested = std::string(60, '[') + std::string(60, ']');
  msg = error_of([&] { parse_graph(spill::test::replaced(kTiny, "\"w\"", nested), "g.json"); });
  expect_mentions(msg, {"tensors[0].name", "an array of 1 items"});
  const std::string key(100000, 'k');
  msg = error_of([&] {
    parse_graph(spill::test::replaced(kTiny, "\"name\": \"tiny\"", "\"" + key + "\": 1"), "g.json");
  });
  expect_mentions(msg, {"unknown field"});
  EXPECT_LT(msg.size(), 400u);
  const std::string name(100000, 'n');
  msg = error_of(
      [&] { parse_graph(spill::test::replaced(kTiny, "\"w\"", "\"" + name + "\""), "g.json"); });
  expect_mentions(msg, {"tensors[0].name", "at most 1024 bytes (UTF-8)", "(100000 bytes)"});
  EXPECT_LT(msg.size(), 400u);
}

TEST(HostileGraph, HugeButValidSizesPlanCorrectly) {
  // Two 2^61-byte activations and a weight: in range, so every figure must be exact.
  std::string text =
      spill::test::replaced(kTiny, "\"bytes\": 4096", "\"bytes\": 2305843009213693952");
  text = spill::test::replaced(text, "\"bytes\": 2048, \"dtype\"",
                               "\"bytes\": 2305843009213693952, \"dtype\"");
  Graph g = parse_graph(text, "g.json");
  Liveness l = analyze_liveness(g);
  EXPECT_EQ(l.peak, (1ull << 62) + 64 + 2048);  // w, x, y and gy while "loss" runs
  const GpuModel& gpu = gpu_preset("h200");
  LinkModel link = link_preset("pcie5");
  for (std::uint64_t budget : {kMaxBytes, std::numeric_limits<std::uint64_t>::max()}) {
    PlannerOptions o;
    o.budget = budget;
    for (Policy p : all_policies()) {
      SCOPED_TRACE(std::string(to_string(p)) + " budget " + std::to_string(budget));
      PolicyResult r = evaluate_policy(p, g, gpu, link, o);
      EXPECT_TRUE(r.feasible) << r.plan.reason;
      EXPECT_GE(r.sim.peak_bytes, l.peak);
      EXPECT_LE(r.sim.peak_bytes, l.peak + 8192);
    }
  }
  PlannerOptions tight;
  tight.budget = 1ull << 62;
  PolicyResult none = evaluate_policy(Policy::None, g, gpu, link, tight);
  EXPECT_FALSE(none.feasible);
  EXPECT_NE(none.plan.reason.find("over the budget"), std::string::npos) << none.plan.reason;
}

TEST(HostileGraph, ZooModelsAtTheLargestBatchAnswerOrRefuseClearly) {
  for (const std::string& name : zoo_models()) {
    SCOPED_TRACE(name);
    ZooOptions o;
    o.batch = std::numeric_limits<int>::max();
    try {
      Graph g = build_model(name, o);
      EXPECT_LE(analyze_liveness(g).peak, kMaxBytes);
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("2^63 - 1"), std::string::npos) << e.what();
    }
  }
  ZooOptions o;
  for (int volume : {1 << 20, std::numeric_limits<int>::max() - 7}) {
    o.volume = volume;
    std::string msg = error_of([&] { build_model("unet3d", o); });
    EXPECT_NE(msg.find("2^63 - 1"), std::string::npos) << msg;
  }
}

TEST(HostileGraph, FuzzedGraphFilesReadCleanlyAndPlanWithoutWrapping) {
  ZooOptions zo;
  zo.batch = 2;
  ASSERT_TRUE(has_batch_scaling(parse_graph(tiny_v2(), "v2.json")));
  const std::vector<std::string> seeds{kTiny, tiny_v2(),
                                       graph_to_json(build_model("mlp", zo)).dump()};
  const GpuModel& gpu = gpu_preset("a100-40gb");
  const LinkModel link = link_preset("pcie4");
  test::FuzzCounts n = test::fuzz_reader(seeds, 2024, 4000, 6.0, [&](const std::string& text) {
    Graph g = parse_graph(text, "fuzz.json");
    if (has_batch_scaling(g)) {
      // A version 2 graph rescaled to another batch (spill plan --batch): a graph whose sizes
      // stay in range, or an error; the largest batch must not wrap a size.
      const std::uint64_t batch = std::uint64_t(std::numeric_limits<std::int32_t>::max());
      try {
        EXPECT_LE(analyze_liveness(at_batch(g, batch)).peak, kMaxBytes);
      } catch (const InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find("2^63"), std::string::npos) << e.what();
      }
      g = at_batch(g, g.batch * 3);
    }
    Liveness l = analyze_liveness(g);
    EXPECT_LE(l.peak, kMaxBytes);
    if (g.ops.size() > 64) return;  // the zoo seed: reading it is the point, planning is slow
    PlannerOptions o;
    o.budget = l.peak / 2;
    for (Policy p : all_policies()) {
      PolicyResult r = evaluate_policy(p, g, gpu, link, o);
      if (r.feasible) {
        EXPECT_LE(r.sim.peak_bytes, o.budget);
      }
    }
  });
  EXPECT_GT(n.accepted, 0);
  EXPECT_GT(n.rejected, 0);
}

}  // namespace
}  // namespace spill::graph

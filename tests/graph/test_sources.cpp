// Other graph sources and models: recorded traces, device presets and the roofline, link models
// read from `spill bench link --json`.
#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "core/errors.hpp"
#include "graph/device_model.hpp"
#include "graph/graph_json.hpp"
#include "graph/trace.hpp"
#include "tests/hostile_helpers.hpp"

namespace spill::graph {
namespace {

Trace small_trace() {
  Trace t;
  // op 0 reads block 7 (existed before: a weight) and writes block 8; op 2 reads both.
  t.accesses = {{0, 7, 4096, Access::Read, 0, 0.000},
                {0, 8, 1024, Access::Write, 0, 0.000},
                {2, 7, 4096, Access::Read, 1, 0.003},
                {2, 8, 1024, Access::ReadWrite, 0, 0.003}};
  t.op_names = {"embed", "unused", "head"};
  t.step_end_s = 0.004;
  return t;
}

TEST(Trace, BecomesAGraphWithKindsAndTimes) {
  Graph g = graph_from_trace(small_trace(), "step");
  ASSERT_EQ(g.ops.size(), 2u);
  ASSERT_EQ(g.tensors.size(), 2u);
  EXPECT_EQ(g.tensors[0].id, 7u);
  EXPECT_EQ(g.tensors[0].kind, TensorKind::Weight);
  EXPECT_EQ(g.tensors[1].kind, TensorKind::Activation);
  EXPECT_EQ(g.ops[0].name, "embed");
  EXPECT_EQ(g.ops[1].name, "head");
  EXPECT_DOUBLE_EQ(*g.ops[0].time_s, 0.003);
  EXPECT_DOUBLE_EQ(*g.ops[1].time_s, 0.001);
  EXPECT_EQ(g.ops[1].writes, std::vector<TensorIndex>{1});
}

// An op without a name is op<i> also when a later op of the step has one (op_names then holds
// "" for it: it was written as "").
TEST(Trace, AnUnnamedOpIsNamedByItsIndexWhateverTheOthersAre) {
  Trace t = small_trace();
  t.op_names = {"", "unused", "head"};
  Graph g = graph_from_trace(t, "step");
  EXPECT_EQ(g.ops[0].name, "op0");
  EXPECT_EQ(g.ops[1].name, "head");
  t.op_names = {"embed"};
  EXPECT_EQ(graph_from_trace(t, "step").ops[1].name, "op2");
}

TEST(Trace, ARecordedStepIsKnownAfterAJsonRoundTrip) {
  Graph g = graph_from_trace(small_trace(), "step");
  EXPECT_TRUE(is_recorded_step(g));
  EXPECT_TRUE(is_recorded_step(graph_from_json(graph_to_json(g), "step.json")));
  g.ops[1].type = "matmul";
  EXPECT_FALSE(is_recorded_step(g)) << "one op that was not recorded: a hand-made graph";
  EXPECT_FALSE(is_recorded_step(Graph{}));
}

TEST(Trace, RejectsMalformedTraces) {
  Trace t = small_trace();
  t.accesses[2].op = 0;
  t.accesses[1].op = 1;  // op goes 0, 1, 0
  EXPECT_THROW(graph_from_trace(t), InvalidArgument);
  t = small_trace();
  t.accesses[3].bytes = 2048;
  try {
    graph_from_trace(t);
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("access 3"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("'bytes'"), std::string::npos) << e.what();
  }
  t = small_trace();
  t.accesses[0].bytes = 0;
  EXPECT_THROW(graph_from_trace(t), InvalidArgument);
}

TEST(DeviceModel, PresetsExistWithPublishedFigures) {
  for (const char* name : {"titanx-12gb", "v100-16gb", "a100-40gb", "a100-80gb", "h100-pcie",
                           "h100-sxm", "h200", "gh200"})
    EXPECT_EQ(gpu_preset(name).name, name);
  EXPECT_EQ(gpu_preset("v100-16gb").memory_bytes, 16ull << 30);
  EXPECT_DOUBLE_EQ(gpu_preset("a100-40gb").peak_flops(DType::BF16), 312e12);
  EXPECT_DOUBLE_EQ(gpu_preset("v100-16gb").peak_flops(DType::BF16), 15.7e12) << "no BF16: FP32";
  try {
    gpu_preset("a100");
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("a100-40gb"), std::string::npos);
  }
}

TEST(DeviceModel, RooflinePicksTheBindingLimit) {
  GpuModel gpu = gpu_preset("a100-40gb");
  gpu.op_overhead_us = 0;
  Graph g;
  g.add_tensor({0, "x", 1'000'000'000, DType::F32, TensorKind::Activation});
  Op compute;
  compute.writes = {0};
  compute.flops = 19.5e12 * 0.6;  // one second at the assumed efficiency
  compute.bytes = 1;
  EXPECT_NEAR(op_time_s(g, compute, gpu), 1.0, 1e-9);
  Op memory;
  memory.writes = {0};
  memory.flops = 1;  // 1 GB of traffic: 1e9 / (1555e9 * 0.8)
  EXPECT_NEAR(op_time_s(g, memory, gpu), 1e9 / (1555e9 * 0.8), 1e-12);
  memory.time_s = 0.5;
  EXPECT_EQ(op_time_s(g, memory, gpu), 0.5) << "measured times win";
}

TEST(DeviceModel, LinkFromBenchJson) {
  const char* json = R"({"format": "spill-link-bench", "device": "sim", "simulated": true,
    "results": [
    {"direction": "h2d", "host_memory": "pinned", "bytes": 4096, "gbps": 0.4096},
    {"direction": "h2d", "host_memory": "pinned", "bytes": 1073741824, "gbps": 20.0},
    {"direction": "d2h", "host_memory": "pinned", "bytes": 4096, "gbps": 0.4096},
    {"direction": "d2h", "host_memory": "pinned", "bytes": 1073741824, "gbps": 22.0},
    {"direction": "bidir", "host_memory": "pinned", "bytes": 1073741824, "gbps": 33.6},
    {"direction": "h2d", "host_memory": "pageable", "bytes": 1073741824, "gbps": 10.0}]})";
  LinkModel m = link_from_bench_json(json, "bench.json");
  // Bandwidth and latency are fitted through the smallest and largest copies.
  EXPECT_NEAR(m.h2d_gbps, 20.0, 0.01);
  EXPECT_NEAR(m.d2h_gbps, 22.0, 0.01);
  EXPECT_NEAR(m.duplex_efficiency, 33.6 / 42.0, 1e-12) << "bidir is the total of both directions";
  EXPECT_NEAR(m.pageable_factor, 0.5, 1e-12);
  // 4096 B at 0.4096 GB/s = 10 us, of which ~0.2 us is bandwidth: latency ~9.8 us.
  EXPECT_NEAR(m.latency_us, 9.8, 0.05);
  EXPECT_NE(m.description.find("simulated"), std::string::npos);
  EXPECT_THROW(link_from_bench_json("{\"results\": [{\"direction\": \"h2d\"}]}", "x"),
               InvalidArgument);
  // Another file's format, and a size whose copies did not verify, are refused by name (both
  // were taken as bandwidths before).
  const std::string text(json);
  for (const auto& [bad, says] : std::vector<std::pair<std::string, std::string>>{
           {spill::test::replaced(text, "spill-link-bench", "spill-graph"), "spill-graph"},
           {spill::test::replaced(text, "\"gbps\": 22.0}", "\"gbps\": 22.0, \"verified\": false}"),
            "did not verify"}}) {
    try {
      link_from_bench_json(bad, "bench.json");
      ADD_FAILURE() << "accepted: " << bad;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(link_from_bench_json("[1,", "x"), InvalidArgument);
  EXPECT_EQ(resolve_link("nvlink2-p9").h2d_gbps, link_preset("nvlink2-p9").h2d_gbps);
  EXPECT_THROW(resolve_link("pcie9"), InvalidArgument);
  // A missing file is a missing file, not an unknown preset.
  try {
    resolve_link("runs/link.json");
    ADD_FAILURE() << "accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("link file 'runs/link.json': cannot open it"),
              std::string::npos)
        << e.what();
  }
}

TEST(DeviceModel, CopyTimeUsesLatencyBandwidthAndDuplex) {
  LinkModel l = link_preset("pcie4");
  double one = copy_time_s(l, 25'000'000, true, false);
  EXPECT_NEAR(one, l.latency_us * 1e-6 + 1e-3, 1e-12);
  EXPECT_GT(copy_time_s(l, 25'000'000, true, true), one);
}

}  // namespace
}  // namespace spill::graph

// Rescaling a graph that records its batch (captured graphs): exact bytes per sample, FLOPs,
// traffic and measured times by their batch-proportional parts, and clear errors otherwise.
#include <gtest/gtest.h>

#include "core/errors.hpp"
#include "graph/batch.hpp"
#include "graph/liveness.hpp"
#include "graph_helpers.hpp"

namespace spill::graph {
namespace {

using testing::op;
using testing::tensor;

// Batch 4: w (fixed), x (input, 40 bytes = 10 per sample), y (8 fixed + 20 per sample).
Graph captured() {
  Graph g;
  g.name = "captured";
  g.batch = 4;
  TensorIndex w = tensor(g, "w", 100, TensorKind::Weight);
  TensorIndex x = tensor(g, "x", 40, TensorKind::Input);
  TensorIndex y = tensor(g, "y", 88);
  g.tensors[x].batch_bytes = 40;
  g.tensors[y].batch_bytes = 80;
  op(g, "fwd", {w, x}, {y}, 2e-3);
  g.ops[0].flops = 1000;
  g.ops[0].batch_flops = 800;
  g.ops[0].bytes = 300;
  g.ops[0].batch_bytes = 120;
  op(g, "use", {y}, {}, 1e-3);
  g.validate();
  return g;
}

TEST(Batch, RescalesSizesWorkAndTimes) {
  Graph g = captured();
  ASSERT_TRUE(has_batch_scaling(g));
  Graph b = at_batch(g, 10);
  EXPECT_EQ(b.batch, 10u);
  EXPECT_EQ(b.tensors[0].bytes, 100u);  // the weight does not grow
  EXPECT_EQ(b.tensors[1].bytes, 100u);  // 10 per sample
  EXPECT_EQ(b.tensors[2].bytes, 8u + 200u);
  EXPECT_EQ(b.tensors[2].batch_bytes, 200u);
  EXPECT_DOUBLE_EQ(b.ops[0].flops, 200 + 800 * 2.5);
  EXPECT_DOUBLE_EQ(b.ops[0].batch_flops, 2000);
  EXPECT_DOUBLE_EQ(b.ops[0].bytes, 180 + 120 * 2.5);
  EXPECT_DOUBLE_EQ(*b.ops[0].time_s, 2e-3 * (2200.0 / 1000.0));  // like its FLOPs
  // No FLOPs and no bytes: like the tensors it touches (y, 88 bytes, 208 at batch 10).
  EXPECT_DOUBLE_EQ(*b.ops[1].time_s, 1e-3 * (208.0 / 88.0));
  // Back to the capture's batch gives the capture back.
  Graph back = at_batch(b, 4);
  for (std::size_t t = 0; t < g.tensors.size(); ++t)
    EXPECT_EQ(back.tensors[t].bytes, g.tensors[t].bytes);
  EXPECT_EQ(analyze_liveness(back).peak, analyze_liveness(g).peak);
  EXPECT_EQ(analyze_liveness(at_batch(g, 1)).peak, 100u + 10u + 28u);
}

// A measured time on an op with no FLOPs and bytes 0 (the sum of its tensors, by the format)
// scales with those tensors; it stayed the same at every batch (audit 41b #2). An op that
// touches only fixed-size tensors, or none, keeps its time.
TEST(Batch, MeasuredTimeWithoutFlopsOrBytesScalesWithTheTensorsItTouches) {
  Graph g;
  g.name = "measured";
  g.batch = 4;
  TensorIndex x = tensor(g, "x", 4000, TensorKind::Input);
  TensorIndex y = tensor(g, "y", 4000);
  TensorIndex w = tensor(g, "w", 64, TensorKind::Weight);
  g.tensors[x].batch_bytes = 4000;
  g.tensors[y].batch_bytes = 4000;
  op(g, "copy", {x}, {y}, 0.1);
  op(g, "use", {y}, {}, 0.1);
  op(g, "fixed", {w}, {}, 0.1);
  op(g, "nothing", {}, {}, 0.1);
  g.validate();
  for (std::uint64_t batch : {1u, 8u, 40u}) {
    Graph b = at_batch(g, batch);
    const double ratio = double(batch) / 4.0;
    EXPECT_DOUBLE_EQ(*b.ops[0].time_s, 0.1 * ratio) << "batch " << batch;
    EXPECT_DOUBLE_EQ(*b.ops[1].time_s, 0.1 * ratio) << "batch " << batch;
    EXPECT_DOUBLE_EQ(*b.ops[2].time_s, 0.1) << "batch " << batch;
    EXPECT_DOUBLE_EQ(*b.ops[3].time_s, 0.1) << "batch " << batch;
    EXPECT_EQ(b.ops[0].bytes, 0.0);  // still "the sum of its tensors"
  }
}

TEST(Batch, RefusesGraphsWithoutBatchAndBadBatches) {
  Graph g = captured();
  try {
    at_batch(g, 0);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("at least 1"), std::string::npos);
  }
  g.batch = 0;
  for (Tensor& t : g.tensors) t.batch_bytes = 0;
  for (Op& o : g.ops) o.batch_flops = o.batch_bytes = 0;
  EXPECT_FALSE(has_batch_scaling(g));
  try {
    at_batch(g, 8);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("'captured'"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("spill.torch.capture"), std::string::npos);
  }
}

TEST(Batch, ValidateChecksTheBatchFields) {
  Graph g = captured();
  g.tensors[2].batch_bytes = 90;  // more than its bytes
  EXPECT_THROW(g.validate(), InvalidArgument);
  g = captured();
  g.tensors[2].batch_bytes = 82;  // 20.5 bytes per sample
  try {
    g.validate();
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("bytes per sample"), std::string::npos);
  }
  g = captured();
  g.ops[0].batch_flops = 2000;  // more than its flops
  EXPECT_THROW(g.validate(), InvalidArgument);
  g = captured();
  g.batch = 0;  // batch fields without a batch
  EXPECT_THROW(g.validate(), InvalidArgument);
  // Passing 2^63 bytes at a large batch is an error, not a wrap-around.
  g = captured();
  EXPECT_THROW(at_batch(g, std::uint64_t(1) << 62), InvalidArgument);
}

TEST(Batch, BuffersExistAtStartAndOutliveTheStep) {
  Graph g;
  TensorIndex b = tensor(g, "running_mean", 64, TensorKind::Buffer);
  TensorIndex y = tensor(g, "y", 8);
  op(g, "bn", {b}, {b, y});
  op(g, "use", {y}, {});
  g.validate();  // read before any write: it exists at step start
  EXPECT_TRUE(exists_at_start(TensorKind::Buffer));
  EXPECT_TRUE(persistent(TensorKind::Buffer));
  EXPECT_EQ(g.parameter_count(), 0u);  // not a parameter
  Liveness l = analyze_liveness(g);
  EXPECT_EQ(l.live[b].first, 0);
  EXPECT_EQ(l.live[b].last, 1);
}

}  // namespace
}  // namespace spill::graph

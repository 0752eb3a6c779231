// The zoo's parameter counts and FLOPs against the published figures, and the structure every
// training step must have (forward, backward, optimizer; valid graph).
#include <gtest/gtest.h>

#include <cmath>

#include "core/errors.hpp"
#include "graph/liveness.hpp"
#include "graph/zoo.hpp"

namespace spill::graph {
namespace {

struct Published {
  const char* model;
  double params;     // published parameter count
  double tolerance;  // relative
};

// Exact counts of the reference implementations (torchvision, Hugging Face checkpoints) and the
// 3D U-Net paper; tolerance covers documented differences only (U-Net batch-norm parameters).
TEST(Zoo, ParameterCountsMatchPublishedFigures) {
  const Published cases[] = {
      {"vgg16", 138357544, 1e-9},      {"resnet50", 25557032, 1e-9},
      {"resnet152", 60192808, 1e-9},   {"gpt2-small", 124439808, 1e-9},
      {"gpt2-medium", 354823168, 1e-9}, {"gpt2-large", 774030080, 1e-9},
      {"gpt2-xl", 1557611200, 1e-9},   {"bert-large", 335141888 + 2050, 1e-9},
      {"unet3d", 19069955, 5e-4},
  };
  ZooOptions o;
  o.seq = 128;
  o.volume = 32;
  for (const Published& p : cases) {
    SCOPED_TRACE(p.model);
    Graph g = build_model(p.model, o);
    double n = double(g.parameter_count());
    EXPECT_NEAR(n / p.params, 1.0, p.tolerance) << "got " << n;
  }
}

TEST(Zoo, RoundedHeadlineFiguresHold) {
  ZooOptions o;
  o.seq = 64;
  EXPECT_NEAR(double(build_model("resnet50", o).parameter_count()) / 1e6, 25.6, 0.05);
  EXPECT_NEAR(double(build_model("gpt2-xl", o).parameter_count()) / 1e9, 1.56, 0.005);
}

TEST(Zoo, ForwardFlopsMatchPublishedMultiplyAdds) {
  ZooOptions o;  // batch 1, 224x224
  // ResNet-50: 4.1 GMACs (torchvision reports 4.09 GFLOPS counting multiply-adds);
  // VGG-16: 15.5 GMACs. Our FLOPs count 2 per multiply-add plus elementwise work.
  double r50 = build_model("resnet50", o).total_flops(Phase::Forward) / 2e9;
  double vgg = build_model("vgg16", o).total_flops(Phase::Forward) / 2e9;
  EXPECT_NEAR(r50, 4.1, 0.15);
  EXPECT_NEAR(vgg, 15.5, 0.3);
  // GPT-2: forward FLOPs ~ 2 * non-embedding params * tokens + attention (2 * 2 * s^2 * d per
  // layer) + the LM head (2 * tokens * d * vocab).
  o.seq = 1024;
  Graph g = build_model("gpt2-small", o);
  double s = 1024, d = 768, L = 12, V = 50257;
  double expected = 2 * s * 12 * d * d * L + 4 * s * s * d * L + 2 * s * d * V;
  EXPECT_NEAR(g.total_flops(Phase::Forward) / expected, 1.0, 0.03);
}

TEST(Zoo, BackwardIsAboutTwiceForward) {
  ZooOptions o;
  o.seq = 256;
  for (const char* m : {"resnet50", "gpt2-small"}) {
    Graph g = build_model(m, o);
    double ratio = g.total_flops(Phase::Backward) / g.total_flops(Phase::Forward);
    EXPECT_GT(ratio, 1.6) << m;
    EXPECT_LT(ratio, 2.1) << m;
  }
}

TEST(Zoo, EveryModelBuildsAValidStepWithAllPhases) {
  ZooOptions o;
  o.seq = 64;
  o.volume = 16;
  for (const std::string& m : zoo_models()) {
    SCOPED_TRACE(m);
    Graph g = build_model(m, o);
    EXPECT_NO_THROW(g.validate());
    bool fwd = false, bwd = false, opt = false;
    for (const Op& op : g.ops) {
      fwd |= op.phase == Phase::Forward;
      bwd |= op.phase == Phase::Backward;
      opt |= op.phase == Phase::Optimizer;
    }
    EXPECT_TRUE(fwd && bwd && opt);
    // Forward ops come first, optimizer ops last.
    EXPECT_EQ(g.ops.front().phase, Phase::Forward);
    EXPECT_EQ(g.ops.back().phase, Phase::Optimizer);
  }
}

TEST(Zoo, OptimizerStateFollowsTheOptionsAndDtype) {
  ZooOptions o;
  auto state_bytes = [](const Graph& g) {
    std::uint64_t s = 0;
    for (const Tensor& t : g.tensors)
      if (t.kind == TensorKind::OptimizerState) s += t.bytes;
    return s;
  };
  const std::uint64_t p = build_model("mlp", o).parameter_count();
  EXPECT_EQ(state_bytes(build_model("mlp", o)), 8 * p);  // Adam: m and v, fp32
  o.optimizer = Optimizer::Sgd;
  EXPECT_EQ(state_bytes(build_model("mlp", o)), 0u);
  o.optimizer = Optimizer::Momentum;
  EXPECT_EQ(state_bytes(build_model("mlp", o)), 4 * p);
  o.optimizer = Optimizer::Adam;
  o.dtype = DType::F16;  // + fp32 master weights; the weights themselves are 2 bytes
  Graph half = build_model("mlp", o);
  EXPECT_EQ(state_bytes(half), 12 * p);
  std::uint64_t weight_bytes = 0;
  for (const Tensor& t : half.tensors)
    if (t.kind == TensorKind::Weight) weight_bytes += t.bytes;
  EXPECT_EQ(weight_bytes, 2 * p);
}

TEST(Zoo, ActivationMemoryScalesWithBatch) {
  ZooOptions o;
  o.batch = 2;
  std::uint64_t p2 = analyze_liveness(build_model("resnet50", o)).peak;
  o.batch = 4;
  std::uint64_t p4 = analyze_liveness(build_model("resnet50", o)).peak;
  EXPECT_GT(p4, p2);
  // Doubling the batch adds at most the batch-2 activations again (weights stay).
  EXPECT_LT(p4, 2 * p2);
}

TEST(Zoo, RejectsBadNamesAndOptions) {
  ZooOptions o;
  EXPECT_THROW(build_model("resnet51", o), InvalidArgument);
  EXPECT_THROW(build_model("gpt2-huge", o), InvalidArgument);
  o.seq = 2048;
  EXPECT_THROW(build_model("gpt2-small", o), InvalidArgument);
  o.seq = 0;
  o.volume = 30;
  EXPECT_THROW(build_model("unet3d", o), InvalidArgument);
  o.volume = 0;
  o.batch = 0;
  EXPECT_THROW(build_model("mlp", o), InvalidArgument);
  try {
    build_model("resnet51", ZooOptions{});
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("resnet51"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("gpt2-xl"), std::string::npos);
  }
}

}  // namespace
}  // namespace spill::graph

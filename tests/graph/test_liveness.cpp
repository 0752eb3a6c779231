// Liveness, memory curve, peak, working sets and idle gaps on hand-built graphs whose answers
// are worked out in the comments.
#include <gtest/gtest.h>

#include "core/errors.hpp"
#include "graph/liveness.hpp"
#include "graph_helpers.hpp"

namespace spill::graph {
namespace {

using namespace testing;

// w (weight, 100) and x (input, 10) exist at start; a, b, c are activations.
//   op0: x, w -> a(20)        live: w x a          = 130
//   op1: a -> b(30), ws 5     live: w a b + ws     = 155   (x died at op0)
//   op2: b -> c(40)           live: w a b c        = 190
//   op3: a, c -> d(1)         live: w a c d        = 161   (b died at op2)
//   op4: w, d -> w            live: w d            = 101
Graph five_ops() {
  Graph g;
  g.name = "five";
  auto w = tensor(g, "w", 100, TensorKind::Weight);
  auto x = tensor(g, "x", 10, TensorKind::Input);
  auto a = tensor(g, "a", 20), b = tensor(g, "b", 30), c = tensor(g, "c", 40),
       d = tensor(g, "d", 1);
  op(g, "op0", {x, w}, {a});
  op(g, "op1", {a}, {b}, 1e-3, 5);
  op(g, "op2", {b}, {c});
  op(g, "op3", {a, c}, {d});
  op(g, "op4", {w, d}, {w});
  g.validate();
  return g;
}

TEST(Liveness, IntervalsFollowFirstWriteAndLastUse) {
  Graph g = five_ops();
  Liveness l = analyze_liveness(g);
  EXPECT_EQ(l.live[0].first, 0);  // weight: whole step
  EXPECT_EQ(l.live[0].last, 4);
  EXPECT_EQ(l.live[1].first, 0);  // input: from the start to its last use
  EXPECT_EQ(l.live[1].last, 0);
  EXPECT_EQ(l.live[2].first, 0);  // a
  EXPECT_EQ(l.live[2].last, 3);
  EXPECT_EQ(l.live[4].first, 2);  // c
  EXPECT_EQ(l.live[4].last, 3);
  EXPECT_EQ(l.uses[2], (std::vector<OpIndex>{0, 1, 3}));
}

TEST(Liveness, MemoryCurveAndPeak) {
  Liveness l = analyze_liveness(five_ops());
  EXPECT_EQ(l.memory, (std::vector<std::uint64_t>{130, 155, 190, 161, 101}));
  EXPECT_EQ(l.peak, 190u);
  EXPECT_EQ(l.peak_op, 2u);
}

// b held to the step's end (a PyTorch parameter's gradient, kept to the next zero_grad): it
// lives from its first write (op1) to the last op, and adds its 30 bytes to ops 3 and 4; from
// its last use (op2) to the step's end it is idle in a dead gap (to = the op count, written).
TEST(Liveness, ATensorHeldToTheStepsEndLivesPastItsLastUse) {
  Graph g = five_ops();
  g.tensors[3].held_to_step_end = true;
  g.validate();
  Liveness l = analyze_liveness(g);
  EXPECT_EQ(l.live[3].first, 1);
  EXPECT_EQ(l.live[3].last, 4);
  EXPECT_EQ(l.uses[3], (std::vector<OpIndex>{1, 2}));
  EXPECT_EQ(l.memory, (std::vector<std::uint64_t>{130, 155, 190, 191, 131}));
  EXPECT_EQ(l.peak_op, 3u);
  std::vector<Gap> dead;
  for (const Gap& gp : idle_gaps(g, l, 0))
    if (gp.tensor == 3u) dead.push_back(gp);
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].from, 2);
  EXPECT_EQ(dead[0].to, 5);
  EXPECT_TRUE(dead[0].dead);
  EXPECT_TRUE(dead[0].dirty);
  EXPECT_FALSE(dead[0].wraps);
  EXPECT_EQ(dead[0].idle_ops(), 2);
  // Carried over to the next step, or used by the last op, it has no dead gap.
  g.tensors[3].carried_over = true;
  for (const Gap& gp : idle_gaps(g, l, 0)) EXPECT_FALSE(gp.dead);
  g.tensors[3].carried_over = false;
  g.ops[4].reads.push_back(3);
  for (const Gap& gp : idle_gaps(g, analyze_liveness(g), 0)) EXPECT_FALSE(gp.dead);
  // A kind that exists at the step's start is not held: it has no step of its own to end.
  g.tensors[1].held_to_step_end = true;
  EXPECT_THROW(g.validate(), InvalidArgument);
}

TEST(Liveness, WorkingSetsCountEachTensorOnceAndWorkspace) {
  Graph g = five_ops();
  EXPECT_EQ(working_sets(g), (std::vector<std::uint64_t>{130, 55, 70, 61, 101}));
}

TEST(Liveness, IdleGapsIncludeTheWrapOfPersistentState) {
  Graph g = five_ops();
  Liveness l = analyze_liveness(g);
  std::vector<Gap> gaps = idle_gaps(g, l);
  // a: idle at op2 between uses 1 and 3. w: used at 0 and 4, idle 1..3, and no wrap gap
  // because it is used by the last op and the first.
  ASSERT_EQ(gaps.size(), 2u);
  EXPECT_EQ(gaps[0].tensor, 0u);
  EXPECT_EQ(gaps[0].from, 0);
  EXPECT_EQ(gaps[0].to, 4);
  EXPECT_FALSE(gaps[0].dirty) << "w is written only at op4";
  EXPECT_EQ(gaps[1].tensor, 2u);
  EXPECT_EQ(gaps[1].from, 1);
  EXPECT_EQ(gaps[1].to, 3);
  EXPECT_TRUE(gaps[1].dirty);
  EXPECT_EQ(gaps[1].idle_ops(), 1);
  // Size filter.
  EXPECT_EQ(idle_gaps(g, l, 50).size(), 1u);
}

TEST(Liveness, WrapGapOfOptimizerState) {
  Graph g;
  auto s = tensor(g, "state", 8, TensorKind::OptimizerState);
  auto a = tensor(g, "a", 4);
  op(g, "f", {}, {a});
  op(g, "g", {a}, {});
  op(g, "step", {s}, {s});
  Liveness l = analyze_liveness(g);
  std::vector<Gap> gaps = idle_gaps(g, l);
  ASSERT_EQ(gaps.size(), 1u);
  EXPECT_TRUE(gaps[0].wraps);
  EXPECT_EQ(gaps[0].from, 2);
  EXPECT_EQ(gaps[0].to, 5);  // op 2 of the next step
  EXPECT_TRUE(gaps[0].dirty);
  EXPECT_EQ(l.memory, (std::vector<std::uint64_t>{12, 12, 8}));
}

}  // namespace
}  // namespace spill::graph

// Steps whose ops differ from their plan's (stochastic depth drops layers, a layer runs that
// the plan's step did not have, a step runs more micro-batches) follow the plan where they
// match it: the plan's prefetches after a skipped run of ops, or after ops the plan does not
// have, are still issued, so such a step needs few demand fetches. Before, a step stopped
// following its plan at its first differing access and ran the rest as LRU does.
#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "core/pattern.hpp"
#include "core/units.hpp"
#include "swapper/runtime.hpp"

namespace spill::test {
namespace {

constexpr std::size_t kBlock = 2 * MiB;
constexpr int kLayers = 8;

// What one step runs: the layers skipped (forward, backward and optimizer, as Adam skips a
// parameter without gradient), a layer run twice in the forward (an extra op the plan's step
// did not have), and the number of micro-batches (forward and backward each) before the
// optimizer.
struct Shape {
  std::set<int> skip;
  int twice = -1;
  int micro_batches = 1;
  // With activations of a size per layer (Model's `sizes`): each activation of the
  // micro-batches after the first is made while a block of its size, made just before it and
  // freed just after, holds the cached block the cache would give it (the first
  // micro-batch's activation of its layer, freed in its backward).
  bool other_places = false;
};

// Host pins and opt-in swappability, as the CPU bridge drives the swapper; optimizer state is
// created in the first step, as in test_planned_steps.cpp.
class Model {
 public:
  // update_in_one_op: the optimizer reads and writes its state in one op (one pin); the first
  // step makes and zeroes it first, so that step 2 has step 1's accesses less the zeroing.
  // with_input: each step's batch is made before the step (the last one freed) and read by
  // the first layer the step runs, as a model's input.
  // sizes: each layer's activation a size of its own (2 MiB and the layer's number of 64 KiB
  // granules), so that the cache gives an activation the block of its layer's last one.
  explicit Model(const std::string& policy, bool update_in_one_op = false,
                 bool with_input = false, bool sizes = false)
      : rt_(conf(policy, sizes), RuntimeOptions{.opt_in_swappable = true}),
        sw_(*rt_.swapper()),
        one_op_(update_in_one_op),
        with_input_(with_input),
        sizes_(sizes) {
    for (int l = 0; l < kLayers; ++l) {
      weights_.push_back(alloc());
      use(weights_.back(), 100 + l, true);
      sw_.set_swappable(weights_.back(), true);
    }
  }
  static Config conf(const std::string& policy, bool sizes) {
    Config c = Config::parse("device:sim,sim_capacity:512MiB,trace:off,policy:" + policy +
                             (sizes ? ",sim_granularity:64KiB" : ""));
    c.budget = (3 * kLayers + 1) * kBlock / 3;  // a third of weights, state and activations
    return c;
  }

  // Runs step n; returns its demand fetches.
  std::uint64_t step(int n, const Shape& shape) {
    const std::uint64_t before = sw_.stats().demand_fetches;
    if (with_input_) {
      // The plan's prefetch of the batch at the last step's end may still be landing when it
      // is freed: the next batch, allocated at once in its memory and written by the host,
      // must not get that copy's bytes (Swapper::release makes the host wait for it; before,
      // the batch lost its bytes in about half the runs).
      if (input_ != nullptr) free(input_);
      input_ = alloc();
      use(input_, 9000 + n, true);
      sw_.set_swappable(input_, true);
    }
    sw_.begin_step(7);
    for (int mb = 0; mb < shape.micro_batches; ++mb) {
      const std::uint64_t seed = 1000 * n + 100 * mb;
      std::vector<std::pair<void*, int>> acts;  // (activation, layer)
      for (int l = 0; l < kLayers; ++l) {
        if (shape.skip.count(l)) continue;
        for (int r = 0; r < (l == shape.twice ? 2 : 1); ++r) {
          void* tmp = alloc();  // never pinned: the plan leaves room for it
          use(weights_[l], 100 + l, false);
          if (with_input_ && acts.empty()) use(input_, 9000 + n, false);
          void* holder = mb > 0 && shape.other_places ? alloc(act_bytes(l)) : nullptr;
          acts.push_back({alloc(act_bytes(l)), l});
          if (holder != nullptr) free(holder);
          use(acts.back().first, seed + acts.size(), true, act_bytes(l));
          sw_.set_swappable(acts.back().first, true);
          free(tmp);
        }
      }
      for (std::size_t i = acts.size(); i-- > 0;) {
        use(acts[i].first, seed + i + 1, false, act_bytes(acts[i].second));
        use(weights_[acts[i].second], 100 + acts[i].second, false);
        free(acts[i].first);
      }
    }
    for (int l = 0; l < kLayers; ++l) {
      if (shape.skip.count(l)) continue;
      use(weights_[l], 100 + l, false);
      if (state_.size() <= static_cast<std::size_t>(l)) {
        state_.resize(l + 1, nullptr);
        state_seed_.resize(l + 1, 0);
      }
      const std::uint64_t old_seed = state_seed_[l];
      state_seed_[l] = 5000 + n;
      if (state_[l] == nullptr && !one_op_) {
        state_[l] = alloc();
        sw_.set_swappable(state_[l], true);
        use(state_[l], state_seed_[l], true);
      } else if (one_op_) {
        if (state_[l] == nullptr) {  // made and zeroed (an op of the first step only)
          state_[l] = alloc();
          sw_.set_swappable(state_[l], true);
          use(state_[l], old_seed, true);
        }
        PinToken t = sw_.pin_for_host(state_[l]);
        ok_ = ok_ && find_pattern_mismatch(state_[l], kBlock, old_seed) == kBlock;
        fill_pattern(state_[l], kBlock, state_seed_[l]);
        sw_.unpin(t, nullptr, true);
      } else {
        use(state_[l], old_seed, false);
        use(state_[l], state_seed_[l], true);
      }
    }
    sw_.end_step(7);
    return sw_.stats().demand_fetches - before;
  }

  SwapStats stats() const { return sw_.stats(); }
  bool ok() const { return ok_; }

 private:
  std::size_t act_bytes(int layer) const {
    return kBlock + (sizes_ ? (layer + 1) * 64 * KiB : 0);
  }
  void* alloc(std::size_t bytes = kBlock) { return rt_.allocator().allocate(bytes, nullptr); }
  void free(void* p) { rt_.allocator().deallocate(p, nullptr); }
  void use(void* p, std::uint64_t seed, bool write, std::size_t bytes = kBlock) {
    PinToken t = sw_.pin_for_host(p);
    if (write) fill_pattern(p, bytes, seed);
    else ok_ = ok_ && find_pattern_mismatch(p, bytes, seed) == bytes;
    sw_.unpin(t, nullptr, write);
  }

  Runtime rt_;
  Swapper& sw_;
  std::vector<void*> weights_, state_;
  std::vector<std::uint64_t> state_seed_;
  bool one_op_ = false;
  bool with_input_ = false;
  bool sizes_ = false;
  void* input_ = nullptr;
  bool ok_ = true;
};

struct Training {
  std::vector<std::uint64_t> demand;  // per step
  SwapStats stats;
  bool ok = false;
};

// Three steps of the full model (step 1 creates the state, step 2 becomes the plan, step 3
// follows it), then `shapes`.
Training train(const std::string& policy, const std::vector<Shape>& shapes,
               bool update_in_one_op = false, bool sizes = false) {
  Model m(policy, update_in_one_op, false, sizes);
  Training r;
  for (int n = 1; n <= 3; ++n) r.demand.push_back(m.step(n, {}));
  for (std::size_t i = 0; i < shapes.size(); ++i)
    r.demand.push_back(m.step(static_cast<int>(i) + 4, shapes[i]));
  r.stats = m.stats();
  r.ok = m.ok();
  return r;
}

std::uint64_t sum_from(const std::vector<std::uint64_t>& v, std::size_t first) {
  std::uint64_t s = 0;
  for (std::size_t i = first; i < v.size(); ++i) s += v[i];
  return s;
}

std::string list(const std::vector<std::uint64_t>& v) {
  std::string s;
  for (std::uint64_t x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

// Both runs had every block's bytes; from the fourth step on, each step's demand fetches times
// `per_step`, and their sum times `together` (0: not checked), are at most LRU's. Both lists
// of demand fetches per step are recorded as the test's properties.
void expect_below_lru(const Training& plan, const Training& lru, std::uint64_t per_step,
                      std::uint64_t together) {
  ::testing::Test::RecordProperty("demand_plan", list(plan.demand));
  ::testing::Test::RecordProperty("demand_lru", list(lru.demand));
  ASSERT_TRUE(plan.ok && lru.ok) << "a block lost its bytes";
  for (std::size_t i = 3; i < plan.demand.size(); ++i)
    EXPECT_LE(plan.demand[i] * per_step, lru.demand[i])
        << "step " << i + 1 << "; plan " << list(plan.demand) << ", LRU " << list(lru.demand);
  if (together > 0) {
    EXPECT_LE(sum_from(plan.demand, 3) * together, sum_from(lru.demand, 3))
        << "plan " << list(plan.demand) << ", LRU " << list(lru.demand);
  }
}

// Stochastic depth: each step from the fourth drops a run of layers in the middle (another one
// each step). The plan's prefetches after the dropped layers are still issued.
TEST(ResyncedSteps, AStepThatSkipsARunOfOpsStillPrefetchesAfterIt) {
  const std::vector<Shape> shapes = {{{3, 4}}, {{2}}, {{4, 5, 6}}, {{1, 2}}, {{5}}};
  const Training plan = train("plan", shapes);
  const Training lru = train("lru", shapes);
  // Step 2 (no state created) leaves step 1's plan and becomes the plan; each varying step
  // leaves it once, follows it to the end and keeps it (the plan has every layer).
  EXPECT_EQ(plan.stats.deviations, 1u + shapes.size());
  EXPECT_EQ(plan.stats.steps_resynced, 1u + shapes.size());
  EXPECT_EQ(plan.stats.steps_recorded, 2u);
  // Each varying step at most half of LRU's demand fetches (the first access after a skip
  // may find its block on the host: the plan's look-ahead was before the skip).
  expect_below_lru(plan, lru, 2, 4);
}

// A step with an op its plan does not have (a layer run twice) serves that op reactively and
// resumes its plan after it; the next step, without the extra op, skips the plan's.
TEST(ResyncedSteps, AStepWithAnExtraOpResumesItsPlanAfterIt) {
  const std::vector<Shape> shapes = {{{}, 3}, {}, {}, {{}, 5}, {}};
  const Training plan = train("plan", shapes);
  const Training lru = train("lru", shapes);
  // Steps 2, 4 and 7 have ops their plan lacks: each becomes the plan. Steps 5 and 8 skip the
  // plan's extra op (two accesses), too little to keep the plan: they become it; step 6
  // follows step 5's.
  EXPECT_EQ(plan.stats.deviations, 5u);
  EXPECT_EQ(plan.stats.steps_resynced, 5u);
  EXPECT_EQ(plan.stats.steps_planned, 2u) << "steps 3 and 6";
  EXPECT_EQ(plan.stats.steps_recorded, 6u) << "steps 1, 2, 4, 5, 7 and 8";
  // Each varying step at most half of LRU's demand fetches (the first access after a skip
  // may find its block on the host: the plan's look-ahead was before the skip).
  expect_below_lru(plan, lru, 2, 4);
}

// A step with more micro-batches than its plan's runs the plan's forward and backward again
// (back in the plan, where the step's previous access precedes the block); one with fewer
// skips to the plan's optimizer.
TEST(ResyncedSteps, StepsWithAnotherNumberOfMicroBatchesFollowTheirPlan) {
  const std::vector<Shape> shapes = {{{}, -1, 2}, {{}, -1, 3}, {{}, -1, 1}, {{}, -1, 2}};
  const Training plan = train("plan", shapes);
  const Training lru = train("lru", shapes);
  // Steps 4, 5 and 7 run more micro-batches than their plan (one, two, one): they run its
  // forward and backward again, skip none of its accesses and become the plan; step 6 runs
  // one of step 5's three, less than half of its plan, and becomes the plan too.
  EXPECT_EQ(plan.stats.steps_resynced, 5u) << "steps 2 and 4 to 7";
  EXPECT_EQ(plan.stats.steps_planned, 1u) << "step 3";
  EXPECT_EQ(plan.stats.steps_recorded, 6u) << "steps 1, 2 and 4 to 7";
  // Each varying step at most half of LRU's demand fetches (the first access after a skip
  // may find its block on the host: the plan's look-ahead was before the skip).
  expect_below_lru(plan, lru, 2, 4);
}

// Steps of two micro-batches: the second's activations take the first's ids (freed in its
// backward). Every other step a block of each activation's size holds the cached block the
// cache would give it, and the activation gets another: a larger cached block (another
// layer's, up to a quarter larger) or new memory. The id goes to the activation by its
// request, whatever the size of the block the cache gave it, and steps 5 to 11 follow step
// 4's plan. Before, an id passed only to a block of the freed one's size: in the steps where
// the cache gave a larger block, the activation took a new id, and the steps became plans in
// turn (3 to 6 recorded of 11, by the timing of the swap-outs).
TEST(ResyncedSteps, AnIdPassesToTheNextBlockOfItsRequestWhateverSizeTheCacheGaveIt) {
  std::vector<Shape> shapes(8, Shape{{}, -1, 2});
  for (std::size_t i = 1; i < shapes.size(); i += 2) shapes[i].other_places = true;
  const Training plan = train("plan", shapes, false, true);
  const Training lru = train("lru", shapes, false, true);
  EXPECT_EQ(plan.stats.steps_recorded, 3u) << "steps 1, 2 and 4";
  EXPECT_EQ(plan.stats.steps_planned, 8u) << "steps 3 and 5 to 11";
  expect_below_lru(plan, lru, 2, 4);
}

// Step 2 runs step 1's accesses less the state's zeroing, as if it only skipped ops of its
// plan, but the state step 1 made exists before it: step 2 becomes the plan, as a step with
// ops its plan lacks does. Kept (a step that only skips ops keeps its plan), step 1's plan,
// which has no prefetch for blocks made in its step, fetched the state on demand every step.
TEST(ResyncedSteps, AStepThatFindsTheStateItsPlanMadeBecomesThePlan) {
  const std::vector<Shape> shapes(4);
  const Training plan = train("plan", shapes, true);
  ASSERT_TRUE(plan.ok) << "a block lost its bytes";
  RecordProperty("demand_plan", list(plan.demand));
  EXPECT_EQ(plan.stats.steps_recorded, 2u);
  EXPECT_EQ(plan.stats.deviations, 1u);
  EXPECT_EQ(plan.stats.steps_resynced, 1u) << "step 2";
  EXPECT_EQ(plan.stats.steps_planned, 5u) << "steps 3-7";
  for (std::size_t i = 3; i < plan.demand.size(); ++i)
    EXPECT_LE(plan.demand[i], 2u) << "step " << i + 1 << ": " << list(plan.demand);
}

// Step 1 of the full model, then `shapes` (with_input: see Model).
Training drop_layers(const std::string& policy, const std::vector<Shape>& shapes,
                     bool with_input = false) {
  Model m(policy, false, with_input);
  Training r;
  r.demand.push_back(m.step(1, {}));
  for (std::size_t i = 0; i < shapes.size(); ++i)
    r.demand.push_back(m.step(static_cast<int>(i) + 2, shapes[i]));
  r.stats = m.stats();
  r.ok = m.ok();
  return r;
}

// Stochastic depth from the second step on: each step skips a layer that the step before it
// ran and runs one that it skipped, so that no step's recording has every layer. Step 3 runs
// layer 5, which its plan (step 2's recording) lacks: the step is spliced into the plan, which
// then has every layer, and each later step runs a subset of it and keeps it. Before, each
// step became the next plan (it had ops its plan lacked) and served the layer its plan's step
// had skipped as LRU does: 8 recordings, and the later steps fetched that layer's weight and
// state on demand.
TEST(ResyncedSteps, ALayerThePlansStepSkippedIsSplicedIntoThePlan) {
  const std::vector<Shape> shapes = {{{5}}, {{2}}, {{6}}, {{1}}, {{5}}, {{3, 4}}, {{2}}};
  const Training plan = drop_layers("plan", shapes);
  const Training lru = drop_layers("lru", shapes);
  // Step 2 finds the state step 1 made; step 3 is spliced into step 2's plan; steps 4 to 8
  // keep that plan.
  EXPECT_EQ(plan.stats.steps_recorded, 3u) << "steps 1, 2 and 3";
  EXPECT_EQ(plan.stats.steps_resynced, 7u) << "each step from the second skips a layer";
  // Steps 4 to 8 each at most a third of LRU's demand fetches, and an eighth of them
  // together (before: 20 of LRU's 115).
  expect_below_lru(plan, lru, 3, 8);
}

// A step that drops the first layer pins the next layer's weight and then its batch, made
// before the step: the batch is found at the place of the activation the plan's step made
// there. That is no state the plan's step made (which a first step creates and later steps
// find by their own ids): the step keeps its spliced plan. Before, it became the plan (as a
// step that finds the optimizer state a first step created), which lacked the first layer:
// 5 recordings, not 3.
TEST(ResyncedSteps, ANewBatchAtTheActivationsPlaceIsNoStateThePlansStepMade) {
  const std::vector<Shape> shapes = {{{5}}, {{2}}, {{0}}, {{0, 6}}, {{}}};
  const Training plan = drop_layers("plan", shapes, true);
  const Training lru = drop_layers("lru", shapes, true);
  EXPECT_EQ(plan.stats.steps_recorded, 3u) << "steps 1, 2 and 3 (spliced)";
  expect_below_lru(plan, lru, 3, 0);
}

}  // namespace
}  // namespace spill::test

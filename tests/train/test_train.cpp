// The reference trainer on the simulated device, with small shapes of each model (a 256 KiB
// swap threshold so that tensors of a few MiB swap): 5 steps at a third of the footprint under
// every policy give losses, weights and optimizer state bit-identical to the run with no
// budget; policy graph moves exactly the bytes its plan says, with no reactive eviction and no
// demand fetch; the predicted peak of mapped bytes is the observed one within one granule per
// live block; the loss falls; a budget below an op's working set is an error naming the op.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <ostream>
#include <string>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "graph/liveness.hpp"
#include "graph/plan.hpp"
#include "profiling/events.hpp"
#include "train/executor.hpp"
#include "train/models.hpp"
#include "train/predict.hpp"
#include "train/session.hpp"

namespace spill::test {
namespace {

using train::Policy;

const char* kConf = "device:sim,sim_capacity:1GiB,swap_threshold:256KiB,trace:off";

struct Case {
  const char* model;
  train::ModelOptions options;
};

// gtest prints parameters in test listings; without this, as raw bytes (a pointer among them).
void PrintTo(const Case& c, std::ostream* os) { *os << c.model; }

std::string name_of(const ::testing::TestParamInfo<Case>& info) {
  std::string n = info.param.model;
  for (char& c : n)
    if (c == '-') c = '_';
  return n;
}

const Case kCases[] = {
    {"mlp", {.batch = 16384, .layers = 12, .width = 32}},
    {"cnn", {.batch = 32, .layers = 1, .width = 16}},
    {"gpt-mini", {.batch = 32, .layers = 2, .width = 64, .seq = 64}},
};

class TrainAtAThird : public ::testing::TestWithParam<Case> {};

TEST_P(TrainAtAThird, EveryPolicyIsBitIdenticalAndGraphMovesWhatItsPlanSays) {
  const Config conf = Config::parse(kConf);
  const train::Program program = train::build_model(GetParam().model, GetParam().options);
  const std::uint64_t footprint = train::footprint(conf, program);
  train::RunOptions ro;
  ro.steps = 5;
  ro.keep_state = true;
  ro.policy = Policy::None;
  const train::RunResult unlimited = train::run_training(conf, program, ro);
  EXPECT_EQ(unlimited.footprint, footprint);
  EXPECT_LT(unlimited.steps.back().loss, unlimited.steps.front().loss) << "the loss must fall";
  for (const train::StepStats& s : unlimited.steps) {
    EXPECT_TRUE(std::isfinite(s.loss));
    // Nothing swaps: the step takes its inputs' upload and its kernels' time, as predicted.
    EXPECT_GT(s.step_s, s.compute_s);
    EXPECT_NEAR(s.step_s, s.predicted_step_s, 1e-9 + 1e-6 * s.predicted_step_s);
  }

  const std::uint64_t granule = 2 * MiB;
  // Policy graph twice: its plan may recompute (the default), then swapping only.
  for (int run = 0; run < 4; ++run) {
    const Policy policy = run < 2 ? Policy::Graph : run == 2 ? Policy::Plan : Policy::Lru;
    SCOPED_TRACE(std::string("policy ") + train::to_string(policy) + (run == 1 ? " (swaps only)" : ""));
    train::RunOptions o = ro;
    o.policy = policy;
    o.exec.recompute = run == 0;
    o.budget = footprint / 3;
    o.exec.poison = policy == Policy::Lru;  // new tensors start as NaN: every read byte is written
    std::uint64_t live_at_peak = 0;
    auto on_start = [&](const train::Executor& ex, Runtime&) {
      graph::check_plan(ex.graph(), ex.plan());
      const auto& at = ex.prediction().mapped_at_op;
      const auto peak_op = std::max_element(at.begin(), at.end()) - at.begin();
      graph::Liveness live = graph::analyze_liveness(ex.graph());
      for (const auto& iv : live.live) live_at_peak += iv.live_at(peak_op);
    };
    const train::RunResult r = train::run_training(conf, program, o, on_start);
    const train::Comparison c = train::compare_runs(r, unlimited);
    EXPECT_TRUE(c.identical) << c.detail;
    ASSERT_EQ(r.steps.size(), 5u);
    // (At these small shapes the plans happen to swap only: remakes are exercised on the
    // gpt-mini preset below.)
    if (run == 1 || policy != Policy::Graph) {
      EXPECT_TRUE(r.plan.recomputes.empty());
    }
    std::uint64_t swapped = 0;
    for (const train::StepStats& s : r.steps) {
      SCOPED_TRACE("step " + std::to_string(s.step + 1));
      EXPECT_LE(s.peak_mapped, r.budget);
      swapped += s.swaps.bytes_out;
      if (policy != Policy::Graph) continue;
      // Every planned remake ran, each step.
      EXPECT_EQ(s.recomputes, r.plan.recomputes.size());
      EXPECT_EQ(s.recomputes, r.prediction.recomputes);
      EXPECT_EQ(s.recomputed_bytes, r.prediction.recomputed_bytes);
      EXPECT_EQ(s.swaps.bytes_out, r.prediction.swapped_out_bytes);
      // Prefetches that find their block still being copied out keep it, as predicted.
      EXPECT_EQ(s.swaps.bytes_in, r.prediction.swapped_in_bytes);
      EXPECT_EQ(s.cancelled_bytes, r.prediction.cancelled_bytes);
      EXPECT_EQ(s.swaps.evictions_reactive, 0u);
      EXPECT_EQ(s.swaps.demand_fetches, 0u);
      // After the first step (from setup's state), the steady state predicted (simulated time).
      if (s.step > 0) {
        EXPECT_NEAR(s.step_s, s.predicted_step_s, 0.05 * s.predicted_step_s)
            << "observed " << s.step_s * 1e3 << " ms, predicted " << s.predicted_step_s * 1e3
            << " ms";
      }
      const double diff = std::abs(double(s.peak_mapped) - double(r.predicted_peak));
      EXPECT_LE(diff, double(granule * live_at_peak))
          << "observed " << format_bytes(s.peak_mapped) << ", predicted "
          << format_bytes(r.predicted_peak) << ", " << live_at_peak << " live blocks";
    }
    EXPECT_GT(swapped, 0u) << "a third of the footprint must swap";
  }
}

INSTANTIATE_TEST_SUITE_P(Models, TrainAtAThird, ::testing::ValuesIn(kCases), name_of);

// The mlp preset the CLI trains (4 MiB weights: a link busy most of the step): the plan times
// its prefetches after swap-outs that free their room, so a planned prefetch that finds the
// room still being copied out waits for it rather than giving up (it used to give up, and the
// block came back on demand, late: 13 demand fetches a step).
// `steps` steps of a CLI preset (default shapes) at a third of its footprint under `policy`.
train::RunResult preset_at_a_third(const char* model, int steps,
                                   const char* conf_text = "device:sim,trace:off",
                                   Policy policy = Policy::Graph) {
  const Config conf = Config::parse(conf_text);
  const train::Program program = train::build_model(model, {});
  train::RunOptions ro;
  ro.steps = steps;
  ro.policy = policy;
  ro.budget = train::footprint(conf, program) / 3;
  return train::run_training(conf, program, ro);
}

TEST(Train, GraphPolicyPrefetchesWaitForTheRoomThePlanTimed) {
  const train::RunResult r = preset_at_a_third("mlp", 2);
  for (const train::StepStats& s : r.steps) {
    EXPECT_EQ(s.swaps.demand_fetches, 0u) << "step " << s.step;
    EXPECT_EQ(s.swaps.prefetches_skipped, 0u) << "step " << s.step;
    EXPECT_EQ(s.swaps.evictions_reactive, 0u) << "step " << s.step;
  }
}

// The swapper's record-then-plan path on a stream (pins ordered on the compute stream, the host
// running ahead of the device), on the CLI presets of a link-bound mlp and the cnn: once the
// plan is made (step 1 records, step 2 follows the plan made from it), each planned step brings
// its blocks back by the plan's prefetches, not on demand. The recording used to count the
// allocator's cache and each op's own outputs as memory held (a plan that swapped more than
// needed), and prefetches that found the room still being copied out gave up until their pin
// fetched the block: 7-9 demand fetches a step for the mlp, 1-9 for the cnn (2026-12-02).
// The first planned step (step 2) too, with no reactive eviction: the recording step left a
// block it had fetched on demand in its last ops mapped where the plan starts it on the host
// (it was still marked as swapping in), and the mlp's step 2 evicted 10 blocks reactively and
// fetched 8 on demand.
TEST(Train, PlannedStepsOnAStreamBringTheirBlocksBackByPrefetch) {
  for (const char* model : {"mlp", "cnn"}) {
    SCOPED_TRACE(model);
    const train::RunResult r = preset_at_a_third(model, 5, "device:sim,trace:off", Policy::Plan);
    ASSERT_EQ(r.steps.size(), 5u);
    std::uint64_t planned_in = 0;
    for (const train::StepStats& s : r.steps) {
      if (s.step < 1) continue;
      EXPECT_EQ(s.swaps.demand_fetches, 0u) << "step " << s.step + 1;
      EXPECT_EQ(s.swaps.evictions_reactive, 0u) << "step " << s.step + 1;
      planned_in += s.swaps.bytes_in;
    }
    EXPECT_GT(planned_in, 0u) << "a third of the footprint must swap";
  }
}

// The presets the CLI trains, at a third of their footprint under policy graph: after the first
// step (which starts from setup's state) each step takes the time the prediction gives for the
// steady state (a step that starts with the previous step's copies in flight and uploads its
// inputs first), within 5%. Simulated time (queries answered in it), so the same in every run;
// the mlp's step was 12% longer than predicted before the step model and the simulated queries.
TEST(Train, PresetStepsUnderPolicyGraphTakeThePredictedTime) {
  for (const char* model : {"mlp", "cnn", "gpt-mini"}) {
    SCOPED_TRACE(model);
    const train::RunResult r = preset_at_a_third(model, 3);
    // The floor under any swap plan lies between the ops' compute and the plan's steps.
    ASSERT_TRUE(r.floor.has_value());
    EXPECT_GT(r.floor->step_s, r.prediction.compute_time_s)
        << "at a third of the footprint something must move";
    for (const train::StepStats& s : r.steps) {
      // The floor bounds plans that only swap.
      if (r.plan.recomputes.empty()) {
        EXPECT_LE(r.floor->step_s, s.step_s) << "step " << s.step;
      }
      EXPECT_EQ(s.swaps.demand_fetches, 0u) << "step " << s.step;
      if (s.step == 0) continue;
      EXPECT_NEAR(s.step_s, s.predicted_step_s, 0.05 * s.predicted_step_s)
          << "step " << s.step << ": observed " << s.step_s * 1e3 << " ms, predicted "
          << s.predicted_step_s * 1e3 << " ms";
      // The swapper's rules are predicted: what is copied back, and what a prefetch keeps.
      EXPECT_EQ(s.swaps.bytes_in, r.prediction.swapped_in_bytes) << "step " << s.step;
      EXPECT_EQ(s.cancelled_bytes, r.prediction.cancelled_bytes) << "step " << s.step;
      // The cache returned before prefetches frees no small-pool segment (each one freed is
      // one to map again later). The cnn's allocation ladder frees one per step: a large
      // allocation the plan counted the wholly free segment's bytes for. (Since audit 40a #1
      // the planner keeps only the segments' slack the granules' rounding does not cover: the
      // cnn's plan at a third, 6 swaps and 9 remakes, needs no cache returned first.)
      if (std::string(model) != "cnn") {
        EXPECT_GT(s.swaps.cache_returns, 0u) << "step " << s.step;
        EXPECT_EQ(s.plain_frees, 0u) << "step " << s.step;
      }
    }
  }
}

// The cnn and gpt-mini presets at a third of their footprint: their plans remake activations
// (convolution and batch-norm outputs; attention probabilities) rather than swap them, each
// step runs every planned remake, the losses, weights and optimizer state are bit-identical to
// the run with no budget, the peak is the predicted one (within a granule per live block) and
// steps after the first take the predicted time. Simulated, 2026-12-02: cnn 4.50 ms a step
// swapping only, 3.20 ms with the remakes; gpt-mini 12.04 and 8.72 ms; with chained remakes
// (2026-12-03) 2.87 and 8.54 ms.
class PresetRemakes : public ::testing::TestWithParam<const char*> {};

TEST_P(PresetRemakes, BitIdenticallyAsPlannedAndPredicted) {
  const Config conf = Config::parse("device:sim,trace:off");
  const train::Program program = train::build_model(GetParam(), {});
  train::RunOptions ro;
  ro.steps = 3;
  ro.keep_state = true;
  ro.policy = Policy::None;
  const train::RunResult unlimited = train::run_training(conf, program, ro);
  ro.policy = Policy::Graph;
  ro.budget = unlimited.footprint / 3;
  std::uint64_t live_at_peak = 0;
  auto on_start = [&](const train::Executor& ex, Runtime&) {
    graph::check_plan(ex.graph(), ex.plan());
    const auto& at = ex.prediction().mapped_at_op;
    const auto peak_op = std::max_element(at.begin(), at.end()) - at.begin();
    for (const auto& iv : graph::analyze_liveness(ex.graph()).live) live_at_peak += iv.live_at(peak_op);
  };
  const train::RunResult r = train::run_training(conf, program, ro, on_start);
  const train::Comparison c = train::compare_runs(r, unlimited);
  EXPECT_TRUE(c.identical) << c.detail;
  ASSERT_FALSE(r.plan.recomputes.empty());
  bool probs = false;
  for (const graph::Recompute& rc : r.plan.recomputes)
    probs = probs || program.tensors[rc.tensor].name.ends_with(".attn.probs");
  if (std::string(GetParam()) == "gpt-mini") {
    EXPECT_TRUE(probs) << "the attention probabilities are the largest, cheapest to remake";
  }
  // Both presets' plans chain remakes (a dropped input remade first, before the same op): the
  // executor runs each link where the plan says, and the run stays bit-identical.
  EXPECT_GT(r.plan.chain_links(), 0u);
  for (const train::StepStats& s : r.steps) {
    SCOPED_TRACE("step " + std::to_string(s.step + 1));
    EXPECT_EQ(s.recomputes, r.plan.recomputes.size());
    EXPECT_EQ(s.recomputed_bytes, r.prediction.recomputed_bytes);
    EXPECT_EQ(s.swaps.bytes_out, r.prediction.swapped_out_bytes);
    EXPECT_EQ(s.swaps.demand_fetches, 0u);
    EXPECT_EQ(s.swaps.evictions_reactive, 0u);
    EXPECT_LE(std::abs(double(s.peak_mapped) - double(r.predicted_peak)),
              double(2 * MiB * live_at_peak))
        << "observed " << format_bytes(s.peak_mapped) << ", predicted "
        << format_bytes(r.predicted_peak);
    if (s.step > 0) {
      EXPECT_NEAR(s.step_s, s.predicted_step_s, 0.05 * s.predicted_step_s);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, PresetRemakes, ::testing::Values("cnn", "gpt-mini"),
                         [](const ::testing::TestParamInfo<const char*>& info) {
                           std::string n = info.param;
                           for (char& c : n)
                             if (c == '-') c = '_';
                           return n;
                         });

// On a GPU the executor always times the second step's ops (the first pays the GPU's first
// uses) and plans again from those times (ExecOptions::measure_ops; the simulated device never
// does by default): the first two steps run the roofline plan's remakes, the second with
// timing events around each op, the plan made after it is checked and its remakes run from the
// third step on, and the run stays bit-identical to the one with no budget. Here the measured
// times are the simulated kernels', so the replanned steps take the predicted time.
TEST(Train, MeasuredOpTimesReplanAfterTheSecondStepAndRemakeBitIdentically) {
  const Config conf = Config::parse("device:sim,trace:off");
  const train::Program program = train::build_model("cnn", {});
  train::RunOptions measured{.policy = Policy::Graph,
                             .budget = train::footprint(conf, program) / 3,
                             .steps = 4,
                             .exec = {.measure_ops = true},
                             .keep_state = true};
  std::size_t first_plan_remakes = 0;
  const train::RunResult r = train::run_training(
      conf, program, measured,
      [&](const train::Executor& ex, Runtime&) { first_plan_remakes = ex.plan().recomputes.size(); });
  const train::RunResult unlimited =
      train::run_training(conf, program, {.policy = Policy::None, .steps = 4, .keep_state = true});
  const train::Comparison c = train::compare_runs(r, unlimited);
  EXPECT_TRUE(c.identical) << c.detail;
  EXPECT_GT(first_plan_remakes, 0u) << "the roofline plan of the first step remakes";
  ASSERT_FALSE(r.plan.recomputes.empty()) << "the measured plan remakes";
  for (const train::StepStats& s : unlimited.steps) EXPECT_FALSE(s.ops_s) << "ops not timed";
  for (const train::StepStats& s : r.steps) {
    SCOPED_TRACE("step " + std::to_string(s.step + 1));
    EXPECT_EQ(s.swaps.evictions_reactive, 0u);
    // Every step's ops are timed: their sum is the step's kernels less its remakes (which run
    // between the ops' events), so under the step and the compute both.
    ASSERT_TRUE(s.ops_s.has_value());
    EXPECT_GT(*s.ops_s, 0.5 * s.compute_s);
    EXPECT_LE(*s.ops_s, s.compute_s * (1 + 1e-9));
    EXPECT_LE(*s.ops_s, s.step_s * (1 + 1e-9));
    // Each op's start and end from the step's start: in stream order, summing to ops_s.
    ASSERT_EQ(s.op_start_s.size(), program.ops.size());
    ASSERT_EQ(s.op_end_s.size(), program.ops.size());
    double sum = 0;
    for (std::size_t i = 0; i < s.op_start_s.size(); ++i) {
      EXPECT_LE(s.op_start_s[i], s.op_end_s[i]);
      if (i > 0) {
        EXPECT_LE(s.op_end_s[i - 1], s.op_start_s[i] + 1e-9);
      }
      sum += s.op_end_s[i] - s.op_start_s[i];
    }
    EXPECT_NEAR(sum, *s.ops_s, 1e-6 * *s.ops_s);
    EXPECT_LE(s.op_end_s.back(), s.step_s * (1 + 1e-9));
    if (s.step <= train::kMeasuredStep) continue;
    EXPECT_EQ(s.recomputes, r.plan.recomputes.size());
    EXPECT_EQ(s.swaps.demand_fetches, 0u);
    EXPECT_NEAR(s.step_s, s.predicted_step_s, 0.05 * s.predicted_step_s);
  }
}

// Without waiting at every op (ExecOptions::wait_every_op, the default on a GPU) the host
// issues the ops with no planned action at once and waits for op i - lag only before an op with
// planned prefetches or remakes, so those still happen when the plan times them: the run is
// bit-identical to the one with no budget, every planned prefetch lands before its op (no
// demand fetch, no reactive eviction), and on the simulated device, where the host costs
// nothing, the steps take what they take when the host waits at every op. With no budget
// (policy none: no actions) the host never waits.
// With the host several ops ahead of the device (a GPU's lag), a planned prefetch that finds
// the budget full takes the memory of blocks freed by ops still queued (their frees have not
// run yet): the copy waits for them, the host does not, and the bits are those of the run
// with no budget.
TEST(Train, PrefetchesAheadOfTheDeviceTakeCachedMemoryAndKeepTheBits) {
  const Config conf = Config::parse(kConf);
  for (const Case& k : {kCases[1], kCases[2]}) {
    SCOPED_TRACE(k.model);
    const train::Program program = train::build_model(k.model, k.options);
    const train::RunResult r = train::run_training(
        conf, program,
        {.policy = Policy::Graph, .budget = train::footprint(conf, program) / 3, .steps = 3,
         .exec = {.lag = 4, .wait_every_op = false}, .keep_state = true});
    const train::RunResult unlimited = train::run_training(
        conf, program, {.policy = Policy::None, .steps = 3, .keep_state = true});
    const train::Comparison c = train::compare_runs(r, unlimited);
    EXPECT_TRUE(c.identical) << c.detail;
    std::uint64_t takeovers = 0;
    for (const train::StepStats& s : r.steps) {
      EXPECT_EQ(s.swaps.demand_fetches, 0u) << "step " << s.step + 1;
      takeovers += s.cache_takeovers;
    }
    EXPECT_GT(takeovers, 0u);
    // cache_takeover:off: the cache is returned first, as before, with the same bits.
    const train::RunResult off = train::run_training(
        Config::parse(std::string(kConf) + ",cache_takeover:off"), program,
        {.policy = Policy::Graph, .budget = train::footprint(conf, program) / 3, .steps = 3,
         .exec = {.lag = 4, .wait_every_op = false}, .keep_state = true});
    const train::Comparison c_off = train::compare_runs(off, unlimited);
    EXPECT_TRUE(c_off.identical) << c_off.detail;
    for (const train::StepStats& s : off.steps) EXPECT_EQ(s.cache_takeovers, 0u);
  }
}

// Each step counts the virtual-memory calls made while it ran (what they cost the host is the
// question on a GPU): every swap-in creates and maps its block's memory again; the host
// thread's CPU time in them is a part of its CPU time in spill's calls.
TEST(Train, StepsCountTheirVirtualMemoryCalls) {
  const Config conf = Config::parse(kConf);
  const train::Program program = train::build_model(kCases[1].model, kCases[1].options);
  const train::RunResult r = train::run_training(
      conf, program,
      {.policy = Policy::Graph, .budget = train::footprint(conf, program) / 3, .steps = 3});
  for (const train::StepStats& s : r.steps) {
    SCOPED_TRACE("step " + std::to_string(s.step + 1));
    ASSERT_GT(s.swaps.swap_ins, 0u);
    EXPECT_GE(s.vmm.create.calls, s.swaps.swap_ins);
    EXPECT_GE(s.vmm.map.calls, s.swaps.swap_ins);
    EXPECT_GT(s.vmm.seconds(), 0.0);
    // The host thread's part, inside spill's calls: the prefetches it issues map memory.
    EXPECT_GT(s.spill_vmm_cpu_s, 0.0);
    EXPECT_LE(s.spill_vmm_cpu_s, s.spill_cpu_s);
  }
}

TEST(Train, WaitingOnlyBeforeOpsWithActionsKeepsThePlanAndTheBits) {
  const Config conf = Config::parse(kConf);
  for (const Case& k : {kCases[1], kCases[2]}) {
    SCOPED_TRACE(k.model);
    const train::Program program = train::build_model(k.model, k.options);
    const std::uint64_t budget = train::footprint(conf, program) / 3;
    train::RunOptions ahead{.policy = Policy::Graph, .budget = budget, .steps = 3,
                            .exec = {.wait_every_op = false}, .keep_state = true};
    train::RunOptions every = ahead;
    every.exec.wait_every_op = true;
    const train::RunResult r = train::run_training(conf, program, ahead);
    const train::RunResult w = train::run_training(conf, program, every);
    const train::RunResult unlimited = train::run_training(
        conf, program,
        {.policy = Policy::None, .steps = 3, .exec = {.wait_every_op = false}, .keep_state = true});
    const train::Comparison c = train::compare_runs(r, unlimited);
    EXPECT_TRUE(c.identical) << c.detail;
    ASSERT_EQ(r.steps.size(), w.steps.size());
    const std::size_t ops = program.ops.size();
    std::size_t acting = 0;  // ops with planned prefetches or remakes
    for (const graph::PlanStep& ps : r.plan.steps) acting += ps.acts_before();
    ASSERT_GT(acting, 0u);
    ASSERT_LT(acting, ops);
    for (std::size_t i = 0; i < r.steps.size(); ++i) {
      const train::StepStats& s = r.steps[i];
      SCOPED_TRACE("step " + std::to_string(s.step + 1));
      EXPECT_EQ(s.op_waits, acting);   // lag 1: every acting op waits for the one before
      EXPECT_EQ(w.steps[i].op_waits, ops);
      EXPECT_EQ(unlimited.steps[i].op_waits, 0u);
      EXPECT_EQ(s.swaps.demand_fetches, 0u);
      EXPECT_EQ(s.swaps.evictions_reactive, 0u);
      EXPECT_EQ(s.swaps.bytes_out, w.steps[i].swaps.bytes_out);
      EXPECT_NEAR(s.step_s, w.steps[i].step_s, 0.02 * w.steps[i].step_s);
    }
  }
}

// Audit 31b #8: a trace of a run counted more bytes out than the run's steps (292 vs 352 MiB):
// it also holds the copies before step 1 (the weights and optimizer state written, those the
// plan starts on the host evicted; under lru and plan, evicted to make room) and those of
// reading the state back after the last step. The trace's swap_out and swap_in events sum to
// the steps' figures plus the set-up's and the read-back's, which the run now gives.
TEST(Train, ATracesBytesAreTheStepsPlusTheSetUpAndTheReadBack) {
  const Config conf = Config::parse(kConf);
  // Weights of 1 MiB a layer (over the swap threshold), unlike kCases' mlp.
  const train::Program program =
      train::build_model("mlp", {.batch = 1024, .layers = 4, .width = 512});
  const std::uint64_t budget = train::footprint(conf, program) / 3;
  auto& recorder = profiling::TraceRecorder::global();
  const bool was_enabled = recorder.enabled();
  recorder.set_enabled(true);
  for (int run = 0; run < 4; ++run) {
    const Policy policy = run < 2 ? Policy::Graph : run == 2 ? Policy::Plan : Policy::Lru;
    const bool measure = run == 1;  // the second step's re-plan evicts after the step's ops
    SCOPED_TRACE(std::string("policy ") + train::to_string(policy) + (measure ? ", measured" : ""));
    train::RunOptions o{.policy = policy, .budget = budget, .steps = 3,
                        .exec = {.measure_ops = measure}, .keep_state = true};
    recorder.collect();  // what earlier tests left
    const std::uint64_t dropped = recorder.dropped();
    std::vector<profiling::TraceEvent> events;
    const train::RunResult r = train::run_training(conf, program, o, {}, {}, [&](Runtime& rt) {
      rt.device().synchronize();  // (spill train's trace is written so)
      events = recorder.collect();
    });
    ASSERT_EQ(recorder.dropped(), dropped) << "the trace must hold every event";
    std::uint64_t traced_out = 0, traced_in = 0, outs = 0, ins = 0;
    for (const profiling::TraceEvent& e : events) {
      if (e.kind == profiling::EventKind::SwapOut) traced_out += e.bytes, ++outs;
      if (e.kind == profiling::EventKind::SwapIn) traced_in += e.bytes, ++ins;
    }
    std::uint64_t steps_out = 0, steps_in = 0;
    for (const train::StepStats& s : r.steps)
      steps_out += s.swaps.bytes_out, steps_in += s.swaps.bytes_in;
    EXPECT_GT(steps_out, 0u);
    // The test covers the difference: the set-up copies weights out, the read-back brings
    // those on the host in.
    EXPECT_GT(r.setup_swaps.bytes_out, 0u);
    EXPECT_GT(r.readback_swaps.bytes_in, 0u);
    EXPECT_EQ(traced_out, steps_out + r.setup_swaps.bytes_out + r.readback_swaps.bytes_out)
        << "steps " << format_bytes(steps_out) << ", set-up "
        << format_bytes(r.setup_swaps.bytes_out) << ", read-back "
        << format_bytes(r.readback_swaps.bytes_out);
    EXPECT_EQ(traced_in, steps_in + r.setup_swaps.bytes_in + r.readback_swaps.bytes_in)
        << "steps " << format_bytes(steps_in) << ", set-up "
        << format_bytes(r.setup_swaps.bytes_in) << ", read-back "
        << format_bytes(r.readback_swaps.bytes_in);
    const SwapStats total = train::run_swaps(r);
    EXPECT_EQ(total.bytes_out, traced_out);
    EXPECT_EQ(total.bytes_in, traced_in);
    EXPECT_EQ(total.swap_outs, outs);
    EXPECT_EQ(total.swap_ins, ins);
  }
  recorder.collect();
  recorder.set_enabled(was_enabled);
}

// The plan and the prediction use the link the simulated device's copies follow: with
// link_gbps the prediction said 5.8 ms for steps of 32 ms (it used the preset's speed).
TEST(Train, PredictionFollowsTheSimulatedLinksSpeed) {
  const train::RunResult r = preset_at_a_third("mlp", 2, "device:sim,trace:off,link_gbps:4");
  const train::StepStats& s = r.steps.back();
  EXPECT_NEAR(s.step_s, s.predicted_step_s, 0.05 * s.predicted_step_s)
      << "observed " << s.step_s * 1e3 << " ms, predicted " << s.predicted_step_s * 1e3 << " ms";
  EXPECT_EQ(s.swaps.demand_fetches, 0u);
}

TEST(Train, PredictedPeakMatchesTheUnlimitedRun) {
  const Config conf = Config::parse(kConf);
  const train::Program program = train::build_model("gpt-mini", kCases[2].options);
  train::RunOptions ro;
  ro.steps = 1;
  ro.policy = Policy::None;
  const train::RunResult r = train::run_training(conf, program, ro);
  // With nothing swapped the only slack is the small pool's last segment.
  EXPECT_LE(std::abs(double(r.steps[0].peak_mapped) - double(r.predicted_peak)), double(2 * MiB))
      << "observed " << format_bytes(r.steps[0].peak_mapped) << ", predicted "
      << format_bytes(r.predicted_peak);
  EXPECT_GE(r.predicted_peak, r.footprint);
}

// `spill train --predict` plans without a device what the executor plans with one: on the
// simulated device's roofline (a100-40gb) and link (pcie4, its engines not contending), the same
// graph, plan and prediction; the swap-only plan is no faster than the floor.
TEST(Train, PredictionWithoutADeviceIsTheExecutorsPlan) {
  const Config conf = Config::parse(kConf);
  const train::Program program = train::build_model("gpt-mini", kCases[2].options);
  train::RunOptions ro;
  ro.steps = 1;
  ro.budget = train::footprint(conf, program) / 3;
  const train::RunResult run = train::run_training(conf, program, ro);
  train::PredictOptions po;
  po.device = "a100-40gb";
  po.link_model = link_preset("pcie4");
  po.link_model->duplex_efficiency = 1.0;
  po.budget = ro.budget;
  po.swap_threshold = conf.swap_threshold;
  po.timeline = true;
  const train::Prediction p = train::predict(program, po);
  EXPECT_EQ(p.footprint, run.footprint);
  ASSERT_EQ(p.plan.swaps.size(), run.plan.swaps.size());
  EXPECT_EQ(p.plan.recomputes.size(), run.plan.recomputes.size());
  EXPECT_EQ(p.predicted.step_time_s, run.prediction.step_time_s);
  EXPECT_EQ(p.predicted.peak_bytes, run.predicted_peak);
  EXPECT_EQ(p.predicted.swapped_out_bytes, run.prediction.swapped_out_bytes);
  EXPECT_GT(p.plan.recomputes.size(), 0u);
  EXPECT_LE(p.predicted.step_time_s, p.swap_only.step_time_s);
  EXPECT_GT(p.swap_only.step_time_s, p.unlimited.step_time_s);
  ASSERT_TRUE(p.floor.has_value());
  EXPECT_LE(p.floor->step_s, p.swap_only.step_time_s);
  EXPECT_TRUE(p.swap_plan.recomputes.empty());
  // Where the planned step goes: the phases tile the step, each op's time in one of them.
  const std::vector<train::PhaseTime> ph = train::phase_times(p.graph, p.predicted);
  ASSERT_EQ(ph.size(), 3u);
  double span = 0, compute = 0;
  for (const train::PhaseTime& t : ph) span += t.span_s, compute += t.compute_s;
  EXPECT_NEAR(span, p.predicted.step_time_s, 1e-9);
  EXPECT_NEAR(compute, p.predicted.compute_time_s, 1e-9);
}

// The GPU target in simulation: the gpt-medium preset at a third of its footprint on the
// h200 roofline over pcie5 (steady state). Its backward stalled 53 ms (a tenth of the step) while
// memory had room, because the planner issued its queued prefetches at the latest moment the
// copy queue allowed with no slack; with the sweep's slack the copies are hidden and what is
// left is the compute of the remakes.
TEST(Train, GptMediumPlanHidesItsCopiesOnH200OverPcie5) {
  const train::Program program = train::build_model("gpt-medium", {});
  const train::Prediction p = train::predict(program, {});
  EXPECT_EQ(p.gpu->name, "h200");
  EXPECT_EQ(p.link.name, "pcie5");
  EXPECT_EQ(p.budget, p.footprint / 3);
  EXPECT_TRUE(p.predicted.within_budget);
  EXPECT_LT(p.predicted.stall_time_s, 0.01 * p.predicted.step_time_s)
      << "stall " << p.predicted.stall_time_s * 1e3 << " ms of " << p.predicted.step_time_s * 1e3;
  EXPECT_LE(p.predicted.step_time_s, 1.10 * p.unlimited.step_time_s)
      << p.predicted.step_time_s * 1e3 << " ms against " << p.unlimited.step_time_s * 1e3;
  EXPECT_NEAR(p.predicted.step_time_s,
              p.predicted.compute_time_s + p.predicted.recompute_time_s + p.predicted.stall_time_s,
              1e-6);
}

TEST(Train, ABudgetBelowAnOpsWorkingSetNamesTheOp) {
  const Config conf = Config::parse(kConf);
  const train::Program program = train::build_model("gpt-mini", kCases[2].options);
  train::RunOptions ro;
  ro.policy = Policy::Graph;
  ro.budget = 4 * MiB;
  try {
    train::run_training(conf, program, ro);
    FAIL() << "a 4 MiB budget was accepted";
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cannot train in a budget of 4.00 MiB"), std::string::npos) << m;
    EXPECT_NE(m.find("op "), std::string::npos) << m;
    EXPECT_NE(m.find("working set"), std::string::npos) << m;
  }
  ro.policy = Policy::None;
  ro.budget = 16 * MiB;
  EXPECT_THROW(train::run_training(conf, program, ro), InvalidArgument)
      << "policy none cannot run above its budget";
}

// The allocator maps whole 2 MiB granules, so a budget's part granule can never be used: the
// planner plans for the whole granules. A budget 4 KiB under 8 MiB (mlp of kCases, whose plan
// fits 8 MiB) was accepted, planned as if its last 1.99 MiB could hold blocks, and every policy
// ran out of memory in the first step ('pin: cannot bring 2.00 MiB ... back'); now it is
// refused naming the op, and 8 MiB trains. Policy none likewise counts the small pool's whole
// segments: at exactly the footprint it ran out of memory, now it is refused.
TEST(Train, ABudgetCountsOnlyTheWholeGranulesItCanMap) {
  const Config conf = Config::parse(kConf);
  const train::Program program = train::build_model("mlp", kCases[0].options);
  train::RunOptions ro;
  ro.steps = 2;
  ro.policy = Policy::Graph;
  ro.budget = 8 * MiB - 4 * KiB;
  try {
    train::run_training(conf, program, ro);
    ADD_FAILURE() << "a budget of 8 MiB - 4 KiB was accepted";
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("6.00 MiB of it mappable in whole 2.00 MiB granules"), std::string::npos) << m;
    EXPECT_NE(m.find("op "), std::string::npos) << m;
  }
  for (Policy policy : {Policy::Graph, Policy::Lru}) {
    SCOPED_TRACE(train::to_string(policy));
    ro.policy = policy;
    ro.budget = 8 * MiB;
    const train::RunResult r = train::run_training(conf, program, ro);
    for (const train::StepStats& s : r.steps) EXPECT_LE(s.peak_mapped, 8 * MiB);
  }
  ro.policy = Policy::None;
  ro.budget = train::footprint(conf, program);
  EXPECT_THROW(train::run_training(conf, program, ro), InvalidArgument);
  ro.budget = (*ro.budget + 2 * MiB - 1) / (2 * MiB) * (2 * MiB) + 2 * MiB;
  EXPECT_NO_THROW(train::run_training(conf, program, ro));
}

// --check's detail (audit 40a #9): two losses one ulp apart printed alike with 6 decimals
// ("loss 3.073087 vs 3.073087"), and a state difference was a byte offset into the
// concatenated tensors ("differ at byte 4"): now exact losses, and the tensor and element.
TEST(Train, ACheckFailureSaysExactlyWhatDiffers) {
  train::RunResult a, b;
  a.steps.resize(2);
  b.steps.resize(2);
  a.steps[0].loss = b.steps[0].loss = 2.5f;
  a.steps[1].loss = 3.073087f;
  b.steps[1].loss = std::nextafter(a.steps[1].loss, 4.0f);
  train::Comparison c = train::compare_runs(a, b);
  EXPECT_FALSE(c.identical);
  EXPECT_EQ(c.detail, "step 2: loss 3.07308698 vs 3.07308722") << c.detail;

  b.steps[1].loss = a.steps[1].loss;
  const float wa[2] = {1.0f, 2.0f}, ma[3] = {0.5f, 0.25f, 0.125f};
  float mb[3] = {0.5f, 0.25f, 0.125f};
  mb[2] = std::nextafter(mb[2], 1.0f);
  auto state = [&](const float* m) {
    std::vector<std::byte> s(sizeof wa + sizeof ma);
    std::memcpy(s.data(), wa, sizeof wa);
    std::memcpy(s.data() + sizeof wa, m, sizeof ma);
    return s;
  };
  a.state = state(ma);
  b.state = state(mb);
  a.state_tensors = b.state_tensors = {{"fc0.weight", sizeof wa}, {"adamw.m.fc0", sizeof ma}};
  c = train::compare_runs(a, b);
  EXPECT_FALSE(c.identical);
  EXPECT_EQ(c.detail, "weights or optimizer state differ: tensor 'adamw.m.fc0' element 2: "
                      "0.125 vs 0.125000015")
      << c.detail;
  b.state = a.state;
  EXPECT_TRUE(train::compare_runs(a, b).identical);
}

TEST(Train, ModelsAndPoliciesAreCheckedByName) {
  EXPECT_THROW(train::build_model("resnet9000", {}), InvalidArgument);
  EXPECT_THROW(train::parse_policy("belady"), InvalidArgument);
  EXPECT_THROW(train::build_model("gpt-mini", {.width = 100}), InvalidArgument)
      << "width must split into heads";
  for (const std::string& m : train::model_names()) {
    if (m == "gpt-medium") continue;  // real shapes: a GPU's worth of memory
    const train::Program p = train::build_model(m, {});
    EXPECT_GT(p.parameters, 0u) << m;
    EXPECT_FALSE(p.ops.empty()) << m;
  }
}

TEST(Train, GptMediumHasGpt2MediumShapes) {
  const train::Program p = train::build_model("gpt-medium", {.batch = 1});
  // GPT-2 medium's transformer (24 x 12,596,224) + position table (1024 x 1024) + final norm,
  // with an untied head and a 50304-token table.
  const std::uint64_t layers = 24ull * (12ull * 1024 * 1024 + 13ull * 1024);
  const std::uint64_t embed = 50304ull * 1024 + 1024ull * 1024;
  EXPECT_EQ(p.parameters, layers + embed + 2 * 1024 + 1024ull * 50304);
}

// Hostile options (issue 11): each outside its range is refused naming it, and sizes that would
// wrap an int in the kernels are refused before any kernel sees them; the largest in range build.
TEST(Train, OptionsOutsideTheirRangesAreRefusedNamingThem) {
  struct Case {
    const char* model;
    train::ModelOptions options;
    const char* expect;
  };
  const Case cases[] = {
      {"mlp", {.width = 2147483647}, "model 'mlp': width must be in 0..65536"},
      {"mlp", {.batch = -1}, "batch must be in 0..65536 (0: the model's default), got -1"},
      {"cnn", {.layers = 4097}, "layers must be in 0..4096"},
      {"gpt-mini", {.seq = 32768}, "seq must be in 0..32767"},
      {"mlp", {.lr = NAN}, "lr must be a finite number"},
      {"gpt-mini", {.batch = 65536, .seq = 32767}, "passes 2^31 - 1 attention rows"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.expect);
    try {
      train::build_model(c.model, c.options);
      ADD_FAILURE() << "accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(c.expect), std::string::npos) << e.what();
    }
  }
  const train::Program p = train::build_model("gpt-mini", {.batch = 16384, .seq = 32767});
  EXPECT_GT(p.ops.size(), 0u);
}

}  // namespace
}  // namespace spill::test

// The allocator may give a large tensor a cached block up to a quarter larger than its size
// (CachingAllocator's reuse rule; on an H200 gpt-medium's `embed.grad`, 202 MiB, got a cached
// 224 MiB block at a third of its footprint, and the executor refused it as a graph mismatch).
TEST(Train, TheExecutorTakesACachedBlockUpToAQuarterLargerThanTheGraphsSize) {
  constexpr std::uint64_t MiB = 1 << 20, small_limit = 1 * MiB;
  EXPECT_TRUE(spill::train::block_fits_graph(202 * MiB, true, 202 * MiB, small_limit));
  EXPECT_TRUE(spill::train::block_fits_graph(224 * MiB, true, 202 * MiB, small_limit));
  EXPECT_TRUE(spill::train::block_fits_graph(252 * MiB, true, 202 * MiB, small_limit));
  EXPECT_FALSE(spill::train::block_fits_graph(254 * MiB, true, 202 * MiB, small_limit));
  EXPECT_FALSE(spill::train::block_fits_graph(200 * MiB, true, 202 * MiB, small_limit));
  EXPECT_FALSE(spill::train::block_fits_graph(2 * MiB, false, 2 * MiB, small_limit));  // pool differs
  EXPECT_TRUE(spill::train::block_fits_graph(4096, false, 4096, small_limit));
  EXPECT_FALSE(spill::train::block_fits_graph(4608, false, 4096, small_limit));  // small: exact
}

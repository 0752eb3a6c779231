// The step simulator against timelines worked out by hand. Link: 1 GB/s each way, no latency,
// so a 1 MB copy takes 1 ms; every op takes 1 ms.
#include <gtest/gtest.h>

#include "core/errors.hpp"
#include "graph/graph_json.hpp"
#include "graph/plan.hpp"
#include "graph/simulator.hpp"
#include "graph_helpers.hpp"

namespace spill::graph {
namespace {

using namespace testing;
constexpr std::uint64_t MB = 1000000;

// op0 writes A (1 MB); op1 and op2 do not touch it; op3 reads it.
Graph gap_graph() {
  Graph g;
  g.name = "gap";
  auto a = tensor(g, "A", MB);
  op(g, "op0", {}, {a});
  op(g, "op1", {}, {});
  op(g, "op2", {}, {});
  op(g, "op3", {a}, {});
  return g;
}

// The timeline has exactly one copy in, from `start` to `end` (seconds from the step's start).
void expect_one_swap_in(const SimResult& r, double start, double end) {
  int ins = 0;
  for (const TimelineEvent& e : r.timeline) {
    if (e.kind != TimelineEvent::Kind::SwapIn) continue;
    ++ins;
    EXPECT_NEAR(e.start_s, start, 1e-12);
    EXPECT_NEAR(e.end_s, end, 1e-12);
  }
  EXPECT_EQ(ins, 1);
}

Plan swap_a(const Graph& g, std::int64_t prefetch_at) {
  return Plan::from_swaps("test", 0, g.ops.size(), {{0, 0, prefetch_at, 3}});
}

// A held to the step's end (op0 writes it, op1 reads it last) is mapped to the end of op3 with
// B (op2's): the peak is both; each of three steps frees it at its end, so none grows.
TEST(Simulator, ATensorHeldToTheStepsEndIsFreedAtItsEnd) {
  Graph g;
  g.name = "held";
  auto a = tensor(g, "A", MB), b = tensor(g, "B", MB);
  g.tensors[a].held_to_step_end = true;
  op(g, "op0", {}, {a});
  op(g, "op1", {a}, {});
  op(g, "op2", {}, {b});
  op(g, "op3", {b}, {});
  g.validate();
  EXPECT_EQ(simulate(g, times_of(g), unit_link(), nullptr).peak_bytes, 2 * MB);
  SimOptions three;
  three.model.steps = 3;
  SimResult r = simulate(g, times_of(g), unit_link(), nullptr, three);
  EXPECT_EQ(r.peak_bytes, 2 * MB);
  EXPECT_NEAR(r.step_time_s, 4e-3, 1e-12);
  g.tensors[a].held_to_step_end = false;  // freed after op1: B takes its room
  EXPECT_EQ(simulate(g, times_of(g), unit_link(), nullptr).peak_bytes, MB);
}

TEST(Simulator, NoPlanRunsOpsBackToBack) {
  Graph g = gap_graph();
  SimResult r = simulate(g, times_of(g), unit_link(), nullptr);
  EXPECT_NEAR(r.step_time_s, 4e-3, 1e-12);
  EXPECT_NEAR(r.compute_time_s, 4e-3, 1e-12);
  EXPECT_EQ(r.stall_time_s, 0);
  EXPECT_EQ(r.peak_bytes, MB);
  EXPECT_EQ(r.swapped_in_bytes + r.swapped_out_bytes, 0u);
}

// Compute-bound: copy out 1-2 ms (during op1), copy in 2-3 ms (during op2, issued when op1
// ends), op3 starts on time at 3 ms. No stall; step 4 ms.
TEST(Simulator, PrefetchHiddenBehindCompute) {
  Graph g = gap_graph();
  Plan p = swap_a(g, 2);
  SimResult r = simulate(g, times_of(g), unit_link(), &p, {MB, true});
  EXPECT_NEAR(r.step_time_s, 4e-3, 1e-12);
  EXPECT_NEAR(r.stall_time_s, 0, 1e-12);
  EXPECT_EQ(r.swapped_out_bytes, MB);
  EXPECT_EQ(r.swapped_in_bytes, MB);
  EXPECT_TRUE(r.within_budget);
  ASSERT_EQ(r.timeline.size(), 6u);  // 4 computes + 2 copies
  bool saw_out = false, saw_in = false;
  for (const TimelineEvent& e : r.timeline) {
    if (e.kind == TimelineEvent::Kind::SwapOut) {
      saw_out = true;
      EXPECT_NEAR(e.start_s, 1e-3, 1e-12);
      EXPECT_NEAR(e.end_s, 2e-3, 1e-12);
    }
    if (e.kind == TimelineEvent::Kind::SwapIn) {
      saw_in = true;
      EXPECT_NEAR(e.start_s, 2e-3, 1e-12);
      EXPECT_NEAR(e.end_s, 3e-3, 1e-12);
    }
  }
  EXPECT_TRUE(saw_out && saw_in);
}

// Copy-bound: the prefetch is issued only when op2 ends (3 ms) and lands at 4 ms: op3 stalls
// 1 ms and the step takes 5 ms.
TEST(Simulator, LatePrefetchStallsForTheCopy) {
  Graph g = gap_graph();
  Plan p = swap_a(g, 3);
  SimResult r = simulate(g, times_of(g), unit_link(), &p);
  EXPECT_NEAR(r.stall_time_s, 1e-3, 1e-12);
  EXPECT_NEAR(r.step_time_s, 5e-3, 1e-12);
  EXPECT_EQ(r.demand_fetches, 0u);
}

// Without any prefetch the use fetches on demand, exactly like a prefetch issued at the use.
TEST(Simulator, MissingPrefetchIsADemandFetch) {
  Graph g = gap_graph();
  Plan p = swap_a(g, 3);
  p.steps[3].prefetch_at.clear();
  SimResult r = simulate(g, times_of(g), unit_link(), &p);
  EXPECT_EQ(r.demand_fetches, 1u);
  EXPECT_NEAR(r.stall_time_s, 1e-3, 1e-12);
}

// Copy-bound with slow copies: at 0.25 GB/s a copy takes 4 ms. Out: 1-5 ms; in (issued at
// 2 ms) waits for the data to be on the host: 5-9 ms; op3 starts at 9 ms instead of 3 ms.
TEST(Simulator, PrefetchWaitsForTheCopyOutToFinish) {
  Graph g = gap_graph();
  Plan p = swap_a(g, 2);
  LinkModel slow = unit_link();
  slow.h2d_gbps = slow.d2h_gbps = 0.25;
  SimResult r = simulate(g, times_of(g), slow, &p);
  EXPECT_NEAR(r.stall_time_s, 6e-3, 1e-12);
  EXPECT_NEAR(r.step_time_s, 10e-3, 1e-12);
}

// The same with the swapper's residency modelled (swapper_rules): the prefetch (issued at
// 2 ms) finds A's swap-out not reaped (nothing needed its room): A stays, the copy out goes on,
// nothing comes back. op3 runs at 3-4 ms; the step ends with the copy out at 5 ms.
TEST(Simulator, APrefetchBeforeTheSwapOutIsReapedKeepsTheTensor) {
  Graph g = gap_graph();
  Plan p = swap_a(g, 2);
  LinkModel slow = unit_link();
  slow.h2d_gbps = slow.d2h_gbps = 0.25;
  SimOptions o;
  o.swapper_rules = true;
  SimResult r = simulate(g, times_of(g), slow, &p, o);
  EXPECT_NEAR(r.stall_time_s, 0.0, 1e-12);
  EXPECT_NEAR(r.step_time_s, 5e-3, 1e-12);
  EXPECT_EQ(r.swapped_out_bytes, MB);
  EXPECT_EQ(r.swapped_in_bytes, 0u);
  EXPECT_EQ(r.cancelled_bytes, MB);
  EXPECT_EQ(r.peak_bytes, MB);
  EXPECT_EQ(r.demand_fetches, 0u);
}

// Two tensors: B leaves after op0 while A comes back during op1. With duplex efficiency 0.5
// the copy that starts while the other direction is busy takes twice as long.
TEST(Simulator, DuplexEfficiencySlowsOverlappingCopies) {
  Graph g;
  auto a = tensor(g, "A", MB, TensorKind::Weight);
  auto b = tensor(g, "B", MB);
  op(g, "op0", {}, {b});  // B written: copy out needed
  op(g, "op1", {}, {});
  op(g, "op2", {a, b}, {});
  // A starts on the host (its wrap gap: last use op2, next use op2 of the next step).
  std::vector<Swap> swaps{{a, 2, 1 + 3, 2 + 3}, {b, 0, 2, 2}};
  Plan p = Plan::from_swaps("test", 0, 3, swaps);
  ASSERT_EQ(p.start_on_host, (std::vector<TensorIndex>{a}));
  // Out of B: issued at 1 ms, nothing else running: 1-2 ms. In of A: issued at 1 ms too (op1
  // begins), the other direction is busy: 2 ms long, 1-3 ms. In of B (issued at 2 ms) waits for
  // the engine: 3-4 ms. op2 starts at 4 ms: stall 2 ms.
  SimResult full = simulate(g, times_of(g), unit_link(1.0), &p);
  SimResult half = simulate(g, times_of(g), unit_link(0.5), &p);
  EXPECT_GT(half.step_time_s, full.step_time_s);
  EXPECT_NEAR(half.stall_time_s, 2e-3, 1e-12);
  // With full duplex: A 1-2 ms, B back 2-3 ms; op2 starts at 3 ms (stall 1 ms).
  EXPECT_NEAR(full.stall_time_s, 1e-3, 1e-12);
}

// Clean copies: a weight that starts on the host and is only read never needs a copy out.
TEST(Simulator, CleanTensorsLeaveWithoutACopy) {
  Graph g;
  auto w = tensor(g, "W", MB, TensorKind::Weight);
  op(g, "op0", {w}, {});
  op(g, "op1", {}, {});
  op(g, "op2", {}, {});
  op(g, "op3", {w}, {});
  std::vector<Swap> swaps{{w, 0, 2, 3}, {w, 3, 4, 4}};
  Plan p = Plan::from_swaps("test", 0, 4, swaps);
  SimResult r = simulate(g, times_of(g), unit_link(), &p);
  EXPECT_EQ(r.swapped_out_bytes, 0u);
  EXPECT_EQ(r.swapped_in_bytes, 2 * MB);
  // Step start: W arrives at 1 ms, op0 stalls 1 ms; the second fetch (issued 3 ms, op2 start)
  // lands at 4 ms, right when op3 would start.
  EXPECT_NEAR(r.stall_time_s, 1e-3, 1e-12);
}

// The swapper keeps a block's host buffer from its first copy out until the block is freed:
// W (2 MB, weight) starts on the host and keeps its buffer for good; A (1 MB) has one from its
// eviction after op0 until it dies at op3, B (4 MB) from its eviction after op4 until op6. So
// 3 MB at once before op3 and 6 MB after op4: the host peak is 6 MB, whatever W's second
// eviction (clean: no new buffer) does.
TEST(Simulator, HostPeakCountsEachBuffersLifeFromFirstCopyOutToTheTensorsDeath) {
  Graph g;
  auto w = tensor(g, "W", 2 * MB, TensorKind::Weight);
  auto a = tensor(g, "A", MB);
  auto b = tensor(g, "B", 4 * MB);
  op(g, "op0", {w}, {a});
  op(g, "op1", {}, {});
  op(g, "op2", {}, {});
  op(g, "op3", {a, w}, {});
  op(g, "op4", {}, {b});
  op(g, "op5", {}, {});
  op(g, "op6", {b}, {});
  std::vector<Swap> swaps{{w, 3, 7, 7}, {a, 0, 2, 3}, {b, 4, 5, 6}};
  Plan p = Plan::from_swaps("test", 0, 7, swaps);
  SimResult r = simulate(g, times_of(g), unit_link(), &p);
  EXPECT_EQ(r.peak_host_bytes, 6 * MB);
  // Without B's swap the peak is W's and A's buffers together.
  Plan q = Plan::from_swaps("test", 0, 7, {{w, 3, 7, 7}, {a, 0, 2, 3}});
  EXPECT_EQ(simulate(g, times_of(g), unit_link(), &q).peak_host_bytes, 3 * MB);
  // Over two steps: A's and B's buffers went with them, W's stayed: the same peak.
  SimOptions two;
  two.model.steps = 2;
  EXPECT_EQ(simulate(g, times_of(g), unit_link(), &p, two).peak_host_bytes, 6 * MB);
  // Nothing swapped, nothing on the host.
  EXPECT_EQ(simulate(g, times_of(g), unit_link(), nullptr).peak_host_bytes, 0u);
}

// Budget: op1 needs 1 MB while A (1 MB) is still being copied out; with a 1 MB budget op1 waits
// for the copy (1-2 ms), so it starts at 2 ms instead of 1 ms.
TEST(Simulator, AllocationsWaitForEvictionsUnderTheBudget) {
  Graph g;
  auto a = tensor(g, "A", MB);
  auto b = tensor(g, "B", MB);
  op(g, "op0", {}, {a});
  op(g, "op1", {}, {b});
  op(g, "op2", {b}, {});
  op(g, "op3", {a}, {});
  Plan p = Plan::from_swaps("test", MB, 4, {{a, 0, 3, 3}});
  SimResult r = simulate(g, times_of(g), unit_link(), &p, {MB, false});
  EXPECT_TRUE(r.within_budget);
  EXPECT_EQ(r.peak_bytes, MB);
  // op1 starts at 2 ms; B dies after op2 (ends 4 ms); A's prefetch, issued when op2 ends at
  // 4 ms, waits for B's memory (released at 4 ms), lands at 5 ms: op3 5-6 ms.
  EXPECT_NEAR(r.step_time_s, 6e-3, 1e-12);
  EXPECT_NEAR(r.stall_time_s, 2e-3, 1e-12);
}

// W (a weight, written by op2) leaves after op2 and comes back at op0 of the next step. One
// step from a cold start: W arrives 0-1 ms, op0 1-2, op1 2-3, op2 3-4, copy out 4-5: step 5 ms,
// stall 1 ms. In the steady state (two steps, the second reported) the second step starts at
// 4 ms with W's copy out still in flight: W comes back 5-6, op0 6-7 ... op2 8-9: step 5 ms from
// its start at 4 ms, stall 2 ms.
TEST(Simulator, SteadyStateStartsWithThePreviousStepsCopiesInFlight) {
  Graph g;
  auto w = tensor(g, "W", MB, TensorKind::Weight);
  op(g, "op0", {w}, {});
  op(g, "op1", {}, {});
  op(g, "op2", {w}, {w});
  Plan p = Plan::from_swaps("test", 0, 3, {{w, 2, 3, 3}});
  SimResult cold = simulate(g, times_of(g), unit_link(), &p);
  EXPECT_NEAR(cold.step_time_s, 5e-3, 1e-12);
  EXPECT_NEAR(cold.stall_time_s, 1e-3, 1e-12);
  SimOptions steady;
  steady.model.steps = 2;
  steady.record_timeline = true;
  SimResult r = simulate(g, times_of(g), unit_link(), &p, steady);
  EXPECT_NEAR(r.step_time_s, 5e-3, 1e-12);
  EXPECT_NEAR(r.stall_time_s, 2e-3, 1e-12);
  EXPECT_NEAR(r.compute_time_s, 3e-3, 1e-12);
  EXPECT_EQ(r.swapped_in_bytes, MB);  // the reported step's copies only
  EXPECT_EQ(r.swapped_out_bytes, MB);
  // The timeline is the reported step's, from its start: W's copy in at 1-2 ms.
  expect_one_swap_in(r, 1e-3, 2e-3);
  // With swapper_rules the second step's prefetch of W (at its start, 4 ms) finds W's swap-out
  // not reaped and keeps it: three ops with no stall, nothing copied in.
  steady.swapper_rules = true;
  r = simulate(g, times_of(g), unit_link(), &p, steady);
  EXPECT_NEAR(r.step_time_s, 3e-3, 1e-12);
  EXPECT_NEAR(r.stall_time_s, 0.0, 1e-12);
  EXPECT_EQ(r.swapped_in_bytes, 0u);
  EXPECT_EQ(r.cancelled_bytes, MB);
  EXPECT_EQ(r.swapped_out_bytes, MB);
}

// Reaping (swapper_rules). W (a weight, 1 MB, written by op2) leaves after op2 and comes
// back for op2 of the next step; X (1 MB) lives from op0 to op1. Budget 1 MB: the second step
// starts at 4 ms with W's copy out in flight (4-5 ms); op0 needs its room, so W's swap-out is
// reaped when it ends: op0 5-6, op1 6-7, W in 7-8, op2 8-9 (step 5 ms, stall 2 ms). Budget 2 MB:
// nothing needs W's room, so op2's prefetch keeps it: op0 4-5, op1 5-6, op2 6-7 (3 ms).
TEST(Simulator, SwapOutsAreReapedWhenAMappingNeedsTheirRoom) {
  Graph g;
  auto w = tensor(g, "W", MB, TensorKind::Weight);
  auto x = tensor(g, "X", MB);
  op(g, "op0", {}, {x});
  op(g, "op1", {x}, {});
  op(g, "op2", {w}, {w});
  Plan p = Plan::from_swaps("test", MB, 3, {{w, 2, 5, 5}});
  SimOptions o;
  o.budget = MB;
  o.model.steps = 2;
  o.swapper_rules = true;
  o.record_timeline = true;
  SimResult r = simulate(g, times_of(g), unit_link(), &p, o);
  EXPECT_TRUE(r.within_budget);
  EXPECT_NEAR(r.step_time_s, 5e-3, 1e-12);
  EXPECT_NEAR(r.stall_time_s, 2e-3, 1e-12);
  EXPECT_EQ(r.swapped_in_bytes, MB);
  EXPECT_EQ(r.cancelled_bytes, 0u);
  expect_one_swap_in(r, 3e-3, 4e-3);
  o.budget = 2 * MB;
  r = simulate(g, times_of(g), unit_link(), &p, o);
  EXPECT_NEAR(r.step_time_s, 3e-3, 1e-12);
  EXPECT_NEAR(r.stall_time_s, 0.0, 1e-12);
  EXPECT_EQ(r.swapped_in_bytes, 0u);
  EXPECT_EQ(r.cancelled_bytes, MB);
  EXPECT_EQ(r.peak_bytes, 2 * MB);
}

// With swapper_rules a prefetch waits for its room on the host, before the op it is issued at.
// A (a weight, written by op0) leaves after op0: out 2-3 ms; W (on the host) is prefetched at
// op1 (3 ms long) and needs A's room (budget 1 MB): mapped at 3, in 3-4. Without the rule op1
// runs 2-5 and op2 5-6; with it op1 waits for the room: 3-6, op2 6-7.
TEST(Simulator, APrefetchWaitingForRoomHoldsTheOpItIsIssuedAt) {
  Graph g;
  auto a = tensor(g, "A", MB, TensorKind::Weight);
  auto w = tensor(g, "W", MB, TensorKind::Weight);
  op(g, "op0", {a}, {a});
  op(g, "op1", {}, {}, 3e-3);
  op(g, "op2", {w}, {});
  Plan p = Plan::from_swaps("test", MB, 3, {{a, 0, 3, 3}, {w, 2, 4, 5}});
  SimOptions o;
  o.budget = MB;
  SimResult plain = simulate(g, times_of(g), unit_link(), &p, o);
  EXPECT_NEAR(plain.step_time_s, 6e-3, 1e-12);
  o.swapper_rules = true;
  SimResult r = simulate(g, times_of(g), unit_link(), &p, o);
  EXPECT_NEAR(r.step_time_s, 7e-3, 1e-12);
  EXPECT_NEAR(r.stall_time_s, 2e-3, 1e-12);  // A's copy in (0-1 ms) and the wait for room
  EXPECT_TRUE(r.within_budget);
}

// With swapper_rules a clean eviction (no copy) is released when the D2H stream reaches the
// swapper's marker, behind the copies out issued before it. W (on the host, read by op0) and B
// (written by op0) leave after op0: B out 2-3 ms, W clean. X (1 MB, op1) needs room in 2 MB:
// without the rules W's room is free at 2 ms (op1 2-3, B in 3-4, op2 4-5: 5 ms); with them at
// 3 ms with B's, both reaped then: op1 3-4, B comes back 4-5, op2 5-6 (6 ms).
TEST(Simulator, ACleanEvictionIsReleasedBehindTheCopiesOutBeforeIt) {
  Graph g;
  auto b = tensor(g, "B", MB);
  auto w = tensor(g, "W", MB, TensorKind::Weight);
  auto x = tensor(g, "X", MB);
  op(g, "op0", {w}, {b});
  op(g, "op1", {}, {x});
  op(g, "op2", {b}, {});
  Plan p = Plan::from_swaps("test", 2 * MB, 3, {{b, 0, 2, 2}, {w, 0, 3, 3}});
  SimOptions o;
  o.budget = 2 * MB;
  SimResult plain = simulate(g, times_of(g), unit_link(), &p, o);
  EXPECT_NEAR(plain.step_time_s, 5e-3, 1e-12);
  o.swapper_rules = true;
  SimResult r = simulate(g, times_of(g), unit_link(), &p, o);
  EXPECT_NEAR(r.step_time_s, 6e-3, 1e-12);
  EXPECT_EQ(r.swapped_in_bytes, 2 * MB);  // W before op0, B before op2
  EXPECT_EQ(r.swapped_out_bytes, MB);
  EXPECT_EQ(r.cancelled_bytes, 0u);
  EXPECT_TRUE(r.within_budget);
}

// Small tensors share segments: with a pool of 2 MB segments for tensors up to 1 MB, three
// 1 MB tensors map two segments (4 MB), so op1, which adds a 2 MB tensor, needs 6 MB: over a
// budget of 5 MB, which counting the tensors' own sizes would meet.
TEST(Simulator, SmallTensorsCountAsTheSegmentsTheyFill) {
  Graph g;
  auto a = tensor(g, "A", MB), b = tensor(g, "B", MB), c = tensor(g, "C", MB);
  auto big = tensor(g, "Big", 2 * MB);
  op(g, "op0", {}, {a, b, c});
  op(g, "op1", {a, b, c}, {big});
  op(g, "op2", {big}, {});
  SimOptions o;
  o.small = {MB, 2 * MB};
  o.budget = 6 * MB;
  SimResult r = simulate(g, times_of(g), unit_link(), nullptr, o);
  ASSERT_EQ(r.mapped_at_op.size(), 3u);
  EXPECT_EQ(r.mapped_at_op[0], 4 * MB);
  EXPECT_EQ(r.mapped_at_op[1], 6 * MB);
  EXPECT_EQ(r.peak_bytes, 6 * MB);
  EXPECT_TRUE(r.within_budget);
  o.budget = 5 * MB;
  EXPECT_FALSE(simulate(g, times_of(g), unit_link(), nullptr, o).within_budget);
  o.small = {};
  SimResult plain = simulate(g, times_of(g), unit_link(), nullptr, o);
  EXPECT_EQ(plain.mapped_at_op[1], 5 * MB);
  EXPECT_TRUE(plain.within_budget);
}

// Uploads: the input X (1 MB, 0.5 MB of data) is copied in before op0, which starts when it
// lands (0.5 ms; counted as stall, not as swapping); op0's prefetch (W, on the host) is issued
// then and queues behind nothing: 0.5-1.5 ms, so op0 starts at 1.5 ms.
TEST(Simulator, UploadsRunBeforeOpZeroAndItsPrefetches) {
  Graph g;
  auto x = tensor(g, "X", MB, TensorKind::Input);
  auto w = tensor(g, "W", MB, TensorKind::Weight);
  op(g, "op0", {x, w}, {});
  op(g, "op1", {}, {});
  Plan p = Plan::from_swaps("test", 0, 2, {{w, 0, 2, 2}});
  SimOptions o;
  o.model.uploads = {{x, MB / 2}};
  o.record_timeline = true;
  SimResult r = simulate(g, times_of(g), unit_link(), &p, o);
  EXPECT_NEAR(r.stall_time_s, 1.5e-3, 1e-12);
  EXPECT_EQ(r.swapped_in_bytes, MB);
  bool saw_upload = false;
  for (const TimelineEvent& e : r.timeline) {
    if (e.kind == TimelineEvent::Kind::Upload) {
      saw_upload = true;
      EXPECT_NEAR(e.end_s, 0.5e-3, 1e-12);
    }
    if (e.kind == TimelineEvent::Kind::SwapIn) {
      EXPECT_NEAR(e.start_s, 0.5e-3, 1e-12);
    }
  }
  EXPECT_TRUE(saw_upload);
  // In the Chrome timeline the upload is on the host-to-device copy track, beside the swap-ins.
  int upload_tracks = 0;
  const auto timeline = timeline_to_json(g, r);
  for (const auto& e : timeline["traceEvents"])
    if (e.value("cat", "") == "upload") {
      EXPECT_EQ(e["tid"], 3) << e.dump();
      ++upload_tracks;
    }
  EXPECT_EQ(upload_tracks, 1);
  o.model.uploads = {{w, MB}};
  EXPECT_THROW(simulate(g, times_of(g), unit_link(), &p, o), InvalidArgument)
      << "uploads go to inputs";
}

TEST(Simulator, ReportsWhenTheBudgetCannotBeMet) {
  Graph g = gap_graph();
  SimResult r = simulate(g, times_of(g), unit_link(), nullptr, {MB / 2, false});
  EXPECT_FALSE(r.within_budget);
  EXPECT_EQ(r.peak_bytes, MB);
}

TEST(Simulator, RejectsMismatchedInputs) {
  Graph g = gap_graph();
  EXPECT_THROW(simulate(g, {1e-3}, unit_link(), nullptr), InvalidArgument);
}

// A recompute: op0 makes A (1 MB, 2 MB of workspace) from the input I (1 MB); op1 and op2 do
// not need it; op3 reads A and I. Dropped after op0 and remade before op3: the remake runs
// op0 again (1 ms) once op2 is done, so op3 runs 4-5 ms; nothing crosses the link. Mapped:
// I + A + workspace while op0 runs and again while it is remade (4 MB), I alone in between.
TEST(Simulator, RecomputeRunsTheProducerAgainBeforeTheUse) {
  Graph g;
  auto in = tensor(g, "I", MB, TensorKind::Input);
  auto a = tensor(g, "A", MB);
  op(g, "op0", {in}, {a}, 1e-3, 2 * MB);
  op(g, "op1", {}, {});
  op(g, "op2", {}, {});
  op(g, "op3", {a, in}, {});
  g.ops[0].recomputable = true;
  g.validate();
  Plan p = Plan::from_swaps("test", 0, 4, {}, {{a, 0, 3}});
  ASSERT_NO_THROW(check_plan(g, p));
  EXPECT_EQ(planned_memory(g, p), (std::vector<std::uint64_t>{4 * MB, MB, MB, 4 * MB}));
  SimResult r = simulate(g, times_of(g), unit_link(), &p, {4 * MB, true});
  EXPECT_NEAR(r.step_time_s, 5e-3, 1e-12);
  EXPECT_NEAR(r.compute_time_s, 4e-3, 1e-12);  // the ops alone: the unlimited step
  EXPECT_NEAR(r.recompute_time_s, 1e-3, 1e-12);
  EXPECT_NEAR(r.stall_time_s, 0, 1e-12);
  EXPECT_EQ(r.recomputes, 1u);
  EXPECT_EQ(r.recomputed_bytes, MB);
  EXPECT_EQ(r.swapped_in_bytes + r.swapped_out_bytes, 0u);
  EXPECT_EQ(r.peak_bytes, 4 * MB);
  EXPECT_TRUE(r.within_budget);
  int remakes = 0;
  for (const TimelineEvent& e : r.timeline) {
    if (e.kind != TimelineEvent::Kind::Recompute) continue;
    ++remakes;
    EXPECT_EQ(e.op, 3);
    EXPECT_EQ(e.tensor, std::int64_t(a));
    EXPECT_NEAR(e.start_s, 3e-3, 1e-12);
    EXPECT_NEAR(e.end_s, 4e-3, 1e-12);
  }
  EXPECT_EQ(remakes, 1);
  // Between the drop and the remake A is not mapped: a 3 MB tensor made at op1 fits beside I
  // in 4 MB only because A is gone.
  auto b = tensor(g, "B", 3 * MB);
  g.ops[1].writes = {b};
  g.ops[2].reads = {b};
  SimResult with_b = simulate(g, times_of(g), unit_link(), &p, {4 * MB});
  EXPECT_TRUE(with_b.within_budget);
  EXPECT_EQ(with_b.peak_bytes, 4 * MB);
  SimResult kept = simulate(g, times_of(g), unit_link(), nullptr, {4 * MB});
  EXPECT_FALSE(kept.within_budget);
}

// A hand-made chain: A (2 MB) from the input, Y (2 MB) from A, both dropped after Y is made and
// remade before op 4, A first (its remake point before its own use at op 5). Over ops 2-3 a
// 3 MB tensor fits beside the input only because both are gone; the remakes run in list order
// on the compute stream (1 ms each) and the peak is the op that needs both back.
TEST(Simulator, AChainedRemakeRunsItsLinksInOrderBeforeTheOp) {
  Graph g;
  auto in = tensor(g, "I", MB, TensorKind::Input);
  auto a = tensor(g, "A", 2 * MB), y = tensor(g, "Y", 2 * MB), b = tensor(g, "B", 3 * MB);
  op(g, "make_a", {in}, {a});
  op(g, "make_y", {a}, {y});
  op(g, "make_b", {}, {b});
  op(g, "use_b", {b}, {});
  op(g, "use_y", {y}, {});
  op(g, "use_a", {a, in}, {});
  g.ops[0].recomputable = g.ops[1].recomputable = true;
  g.validate();
  Plan p = Plan::from_swaps("test", 0, 6, {}, {{y, 1, 4}, {a, 1, 5, 4}});
  order_remakes(g, p);
  ASSERT_EQ(p.steps[4].recompute_before, (std::vector<TensorIndex>{a, y}));
  ASSERT_NO_THROW(check_plan(g, p));
  EXPECT_EQ(planned_memory(g, p),
            (std::vector<std::uint64_t>{3 * MB, 5 * MB, 4 * MB, 4 * MB, 5 * MB, 3 * MB}));
  SimResult r = simulate(g, times_of(g), unit_link(), &p, {5 * MB, true});
  EXPECT_TRUE(r.within_budget);
  EXPECT_EQ(r.peak_bytes, 5 * MB);
  EXPECT_NEAR(r.step_time_s, 8e-3, 1e-12);  // 6 ops and 2 remakes
  EXPECT_EQ(r.recomputes, 2u);
  EXPECT_EQ(r.recomputed_bytes, 4 * MB);
  EXPECT_EQ(r.swapped_in_bytes + r.swapped_out_bytes + r.demand_fetches, 0u);
  std::vector<std::int64_t> order;
  for (const TimelineEvent& e : r.timeline)
    if (e.kind == TimelineEvent::Kind::Recompute) {
      EXPECT_EQ(e.op, 4);
      EXPECT_NEAR(e.start_s, order.empty() ? 4e-3 : 5e-3, 1e-12);
      order.push_back(e.tensor);
    }
  EXPECT_EQ(order, (std::vector<std::int64_t>{std::int64_t(a), std::int64_t(y)}));
  // Keeping A instead (one level) passes the budget over ops 2-3.
  Plan one = Plan::from_swaps("test", 0, 6, {}, {{y, 1, 4}});
  EXPECT_FALSE(simulate(g, times_of(g), unit_link(), &one, {5 * MB}).within_budget);
}

}  // namespace
}  // namespace spill::graph

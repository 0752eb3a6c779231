// The assembled stack (Runtime: device, caching allocator, host pool, swapper) on the
// synthetic step: budget held, data intact, and the trace's counters agree with the
// allocator's own stats after every step.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

#include "core/link_model.hpp"
#include "core/units.hpp"
#include "device/sim_device.hpp"
#include "profiling/counters.hpp"
#include "profiling/events.hpp"
#include "swapper/runtime.hpp"

namespace spill::test {
namespace {

TEST(Runtime, SyntheticStepOverTheCachingAllocator) {
  Config conf = Config::parse("device:sim,sim_capacity:1GiB,budget:96MiB,chaos:5");
  auto& rec = profiling::TraceRecorder::global();
  rec.set_enabled(true);
  rec.collect();
  profiling::CounterReplay replay;
  std::vector<std::uint64_t> step_marks;
  Runtime rt(conf);
  ASSERT_NE(rt.swapper(), nullptr);
  SyntheticStepConfig c;
  c.layers = 10;
  c.activation_bytes = 12 * MiB;
  c.weight_bytes = 6 * MiB;
  c.steps = 1;
  EXPECT_GE(c.footprint(), 2 * rt.allocator().budget());
  for (int step = 0; step < 3; ++step) {
    std::vector<StepResult> r = run_synthetic_steps(rt.device(), rt.step_memory(), *rt.swapper(), c);
    ASSERT_EQ(r.size(), 1u);
    EXPECT_TRUE(r[0].data_ok) << r[0].first_error;
    EXPECT_LE(r[0].peak_mapped, rt.allocator().budget());
    rt.device().synchronize();
    for (const auto& e : rec.collect()) {
      replay.apply(e);
      if (e.kind == profiling::EventKind::Mark && rec.tag_name(e.tag) == "step begins")
        step_marks.push_back(e.bytes);
    }
    rt.swapper()->quiesce();
    AllocatorStats s = rt.allocator().stats();
    EXPECT_EQ(replay.current().allocated, s.allocated.current) << "step " << step;
    EXPECT_EQ(replay.current().mapped, s.reserved.current) << "step " << step;
    // Clean evictions too (before, they recorded no event and the trace's bytes on host
    // fell behind).
    EXPECT_EQ(replay.current().on_host, rt.swapper()->stats().on_host_bytes) << "step " << step;
  }
  // Each step's beginning is marked, numbered from 1.
  EXPECT_EQ(step_marks, (std::vector<std::uint64_t>{1, 2, 3}));
  SwapStats st = rt.swapper()->stats();
  EXPECT_GT(st.swap_outs + st.clean_evictions, 0u);
  EXPECT_EQ(rt.allocator().stats().allocated.current, 0) << "every block was freed";
}

// after_step runs once after each step, in order, when that step's events are recorded and the
// next step's are not (spill demo takes its trace there, so a long run loses none).
TEST(Runtime, SyntheticStepsCallAfterStepBetweenSteps) {
  auto& rec = profiling::TraceRecorder::global();
  rec.set_enabled(true);
  rec.collect();
  Runtime rt(Config::parse("device:sim,sim_capacity:1GiB,budget:96MiB"));
  SyntheticStepConfig c;
  c.layers = 6;
  c.activation_bytes = 12 * MiB;
  c.weight_bytes = 6 * MiB;
  c.steps = 3;
  std::vector<int> called;
  std::vector<std::uint64_t> marks;  // step marks collected by each call
  c.after_step = [&](int step) {
    called.push_back(step);
    for (const auto& e : rec.collect())
      if (e.kind == profiling::EventKind::Mark && rec.tag_name(e.tag) == "step begins")
        marks.push_back(e.bytes);
  };
  std::vector<StepResult> r = run_synthetic_steps(rt.device(), rt.step_memory(), *rt.swapper(), c);
  ASSERT_EQ(r.size(), 3u);
  for (const StepResult& x : r) EXPECT_TRUE(x.data_ok) << x.first_error;
  EXPECT_EQ(called, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(marks, (std::vector<std::uint64_t>{1, 2, 3}));
  rec.set_enabled(false);
}

// A block freed while its swap-out copies leaves its host buffer to be freed once the copy is
// done; empty_cache frees it (before, only an eviction, a residence query or an allocation
// needing room did, so the host pool's own count stayed above 0 with everything freed). Read
// from the pool, not Swapper::stats(), which reaps too. The slow link (0.1 GB/s, in wall time)
// keeps the 8 MiB copy in flight for about 80 ms.
TEST(Runtime, EmptyCacheFreesTheHostBuffersOfBlocksFreedMidCopy) {
  Runtime rt(Config::parse("device:sim,sim_capacity:256MiB,budget:64MiB,policy:lru,"
                           "link_gbps:0.1,time_scale:1"));
  Swapper& sw = *rt.swapper();
  void* p = rt.allocator().allocate(8 * MiB);
  PinToken t = sw.pin_for_host(p);
  std::memset(p, 7, 8 * MiB);
  sw.unpin(t, nullptr, true);
  sw.evict(p);
  ASSERT_EQ(sw.residence(p), Residence::SwappingOut);
  rt.allocator().deallocate(p);  // mid-copy
  EXPECT_EQ(rt.host().in_use(), 8 * MiB);
  rt.device().synchronize();
  rt.empty_cache();
  EXPECT_EQ(rt.host().in_use(), 0u);
  EXPECT_EQ(rt.host().reserved(), 0u) << "the pool's chunk goes back once it holds nothing";
  // Freed mid-copy without a synchronise: empty_cache waits for the copy itself.
  p = rt.allocator().allocate(8 * MiB);
  t = sw.pin_for_host(p);
  std::memset(p, 8, 8 * MiB);
  sw.unpin(t, nullptr, true);
  sw.evict(p);
  ASSERT_EQ(sw.residence(p), Residence::SwappingOut);
  rt.allocator().deallocate(p);
  rt.empty_cache();
  EXPECT_EQ(rt.host().in_use(), 0u);
  EXPECT_EQ(rt.host().reserved(), 0u);
}

// A clean eviction (the host copy is still current) copies nothing, but the block is on the
// host all the same: the trace's bytes on host count it (before, it recorded no event and the
// trace said 0 B on host, audit 31b).
TEST(Runtime, TheTracesBytesOnHostCountCleanEvictions) {
  auto& rec = profiling::TraceRecorder::global();
  rec.set_enabled(true);
  rec.collect();
  Runtime rt(Config::parse("device:sim,sim_capacity:256MiB,budget:64MiB,policy:lru"));
  Swapper& sw = *rt.swapper();
  void* p = rt.allocator().allocate(8 * MiB);
  PinToken t = sw.pin_for_host(p);
  std::memset(p, 7, 8 * MiB);
  sw.unpin(t, nullptr, true);
  sw.evict(p);  // with a copy
  sw.quiesce();
  t = sw.pin_for_host(p);  // back, read only
  sw.unpin(t, nullptr, false);
  sw.evict(p);  // clean: no copy
  sw.quiesce();
  ASSERT_EQ(sw.stats().clean_evictions, 1u);
  ASSERT_EQ(sw.residence(p), Residence::OnHost);
  profiling::CounterReplay replay;
  for (const auto& e : rec.collect()) replay.apply(e);
  EXPECT_EQ(replay.current().on_host, 8 * MiB);
  EXPECT_EQ(replay.current().on_host, sw.stats().on_host_bytes);
  rt.allocator().deallocate(p);
}

TEST(Runtime, TraceTimesAreSimulatedTimeOnTheSimulatedDevice) {
  auto& rec = profiling::TraceRecorder::global();
  rec.set_enabled(true);
  rec.collect();
  std::vector<profiling::TraceEvent> events;
  double sim_end_s = 0, steps_s = 0;
  LinkModel link = link_preset("pcie4");
  {
    Runtime rt(Config::parse("device:sim,sim_capacity:1GiB,budget:64MiB,link:pcie4"));
    EXPECT_EQ(profiling::TraceRecorder::clock_name(),
              "simulated (SimDevice, link model pcie4)");
    SyntheticStepConfig c;
    c.layers = 8;
    c.activation_bytes = 8 * MiB;
    c.weight_bytes = 4 * MiB;
    c.steps = 2;
    for (const StepResult& r :
         run_synthetic_steps(rt.device(), rt.step_memory(), *rt.swapper(), c)) {
      EXPECT_TRUE(r.data_ok) << r.first_error;
      steps_s += r.step_time_s;
    }
    rt.device().synchronize();
    sim_end_s = dynamic_cast<SimDevice&>(rt.device()).sim_time_s();
    events = rec.collect();
  }
  EXPECT_EQ(profiling::TraceRecorder::clock_name(), "host steady clock")
      << "the runtime gives the clock back";
  ASSERT_FALSE(events.empty());
  std::uint64_t last = 0;
  std::vector<double> in_rates;
  for (const auto& e : events) {
    last = std::max(last, e.time_ns + e.duration_ns);
    if (e.kind == profiling::EventKind::SwapIn && e.duration_ns > 0)
      in_rates.push_back(double(e.bytes) / double(e.duration_ns));  // GB/s
  }
  // The trace spans the simulated run (the steps and the setup before them), not wall time.
  EXPECT_LE(double(last), sim_end_s * 1e9 + 1e3);
  EXPECT_GE(double(last), steps_s * 1e9 * 0.99);
  // Swap-ins land at the modelled rate of the link, never above it.
  ASSERT_FALSE(in_rates.empty());
  std::sort(in_rates.begin(), in_rates.end());
  EXPECT_LE(in_rates.back(), link.h2d_gbps * 1.001);
  EXPECT_GE(in_rates[in_rates.size() / 2], link.h2d_gbps * 0.8);
}

}  // namespace
}  // namespace spill::test

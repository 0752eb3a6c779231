// The assembled stack (Runtime: device, caching allocator, host pool, swapper) on the
// synthetic step: budget held, data intact, and the trace's counters agree with the
// allocator's own stats after every step.
#include <gtest/gtest.h>

#include "core/units.hpp"
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
    for (const auto& e : rec.collect()) replay.apply(e);
    AllocatorStats s = rt.allocator().stats();
    EXPECT_EQ(replay.current().allocated, s.allocated.current) << "step " << step;
    EXPECT_EQ(replay.current().mapped, s.reserved.current) << "step " << step;
  }
  SwapStats st = rt.swapper()->stats();
  EXPECT_GT(st.swap_outs + st.clean_evictions, 0u);
  EXPECT_EQ(rt.allocator().stats().allocated.current, 0) << "every block was freed";
}

}  // namespace
}  // namespace spill::test

// The reference trainer's steps on the simulated device (gpt-mini, the main job's model).
//   BM_train_step/<policy>/<budget>  one training step per iteration: a third of the footprint
//       under policy graph and plan, and the unlimited run (policy none). Counters:
//       spill_cpu_share   CPU time the host thread spends inside spill's own calls (allocator,
//                         swapper, pins; time blocked waiting for copies or the device is not
//                         CPU time) over the step's wall time (target <= 2%);
//       spill_wall_share  wall time inside those calls, waits included, over the step's wall
//                         time (on the simulated device the copies are this machine's memcpy);
//       spill_cpu_ms      that CPU time per step;
//       spill_vmm_share   the part of spill_cpu_share spent in the device's virtual-memory calls
//                         (reserve, create, map, unmap, release): on the simulated device this
//                         machine's mmap, munmap and page-table filling, on a GPU the driver's
//                         cuMem* calls; the rest is spill's own logic;
//       sim_step_ms, pred_step_ms  the step's simulated time and the planner's prediction;
//       bytes_out_MiB, demand      swap traffic and demand fetches per step.
// Wall time here is the CPU kernels' (OpenBLAS, one thread), on whatever machine runs it.
#include <benchmark/benchmark.h>

#include <memory>

#include "core/units.hpp"
#include "profiling/events.hpp"
#include "train/models.hpp"
#include "train/session.hpp"

namespace spill {
namespace {

void BM_train_step(benchmark::State& state, train::Policy policy, bool third) {
  profiling::TraceRecorder::global().set_enabled(false);
  const Config base = Config::parse("device:sim,trace:off");
  const train::Program program = train::build_model("gpt-mini", {});
  Config c = base;
  if (third) c.budget = train::footprint(base, program) / 3;
  c.policy = train::runtime_policy(policy);
  Runtime rt(c);
  train::Executor ex(rt, program, {.policy = policy});
  double wall = 0, spill = 0, cpu = 0, vmm_cpu = 0, sim = 0, pred = 0, out = 0, demand = 0;
  for (auto _ : state) {
    const train::StepStats s = ex.step();
    wall += s.wall_s;
    spill += s.spill_s;
    cpu += s.spill_cpu_s;
    vmm_cpu += s.spill_vmm_cpu_s;
    sim += s.step_s;
    pred += s.predicted_step_s;
    out += double(s.swaps.bytes_out);
    demand += double(s.swaps.demand_fetches);
    state.SetIterationTime(s.wall_s);
  }
  const double n = double(state.iterations());
  state.counters["spill_cpu_share"] = cpu / wall;
  state.counters["spill_vmm_share"] = vmm_cpu / wall;
  state.counters["spill_wall_share"] = spill / wall;
  state.counters["spill_cpu_ms"] = cpu / n * 1e3;
  state.counters["sim_step_ms"] = sim / n * 1e3;
  state.counters["pred_step_ms"] = pred / n * 1e3;
  state.counters["bytes_out_MiB"] = out / n / double(MiB);
  state.counters["demand"] = demand / n;
}

BENCHMARK_CAPTURE(BM_train_step, graph/third, train::Policy::Graph, true)
    ->Iterations(3)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_train_step, plan/third, train::Policy::Plan, true)
    ->Iterations(3)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_train_step, none/unlimited, train::Policy::None, false)
    ->Iterations(3)->UseManualTime()->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace spill

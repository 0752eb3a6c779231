// Swapper benchmarks.
//   BM_pin_resident   pin + unpin of a resident block (the hot path; target <= 200 ns)
//   BM_pin_recording  pin + unpin of a resident block in a recorded step, with `blocks` other
//                     blocks tracked: the recording's bookkeeping at each pin and op (it was
//                     linear in the blocks tracked until 2026-12-05)
//   BM_swap           swap-out, swap-in and both at once of blocks from 2 MiB (1 MiB and
//                     smaller blocks live in the small pool and never move) to 1 GiB, in
//                     GB/s of the device's clock (simulated link model on SimDevice; measured
//                     on a GPU, to compare with `spill bench link`: target >= 95% of it from
//                     8 MiB up)
#include <benchmark/benchmark.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "core/units.hpp"
#include "device/cuda_device.hpp"
#include "device/sim_device.hpp"
#include "profiling/events.hpp"
#include "swapper/runtime.hpp"

namespace spill {
namespace {

std::unique_ptr<Runtime> make(bool cuda, std::size_t budget, benchmark::State& state) {
  std::string why;
  if (cuda && !cuda_available(0, &why)) {
    state.SkipWithError(("no GPU: " + why).c_str());
    return nullptr;
  }
  Config c = Config::parse(std::string(cuda ? "device:cuda" : "device:sim,sim_capacity:16GiB") +
                           ",policy:lru,trace:off");
  c.budget = budget;
  return std::make_unique<Runtime>(c);
}

// Device time: the simulated clock on SimDevice, the wall clock (after synchronising) on a GPU.
double now_s(Device& d) {
  if (auto* sim = dynamic_cast<SimDevice*>(&d)) return sim->sim_time_s();
  d.synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void BM_pin_resident(benchmark::State& state) {
  profiling::TraceRecorder::global().set_enabled(false);
  auto rt = make(state.range(0) != 0, 1 * GiB, state);
  if (!rt) return;
  void* p = rt->allocator().allocate(8 * MiB);
  Stream s = rt->device().create_stream();
  Swapper& sw = *rt->swapper();
  for (auto _ : state) {
    sw.pin(p, s);
    sw.unpin(p, s, false);
    // unpin records an event per use; keep the device's queue from growing without bound
    if ((state.iterations() & 0x3fff) == 0) rt->device().synchronize(s);
  }
  rt->device().synchronize(s);
  rt->allocator().deallocate(p);
  rt->allocator().forget_stream(s);
  rt->device().destroy_stream(s);
  profiling::TraceRecorder::global().set_enabled(true);
}
BENCHMARK(BM_pin_resident)->ArgName("cuda")->Arg(0)->Arg(1);

void BM_pin_recording(benchmark::State& state) {
  profiling::TraceRecorder::global().set_enabled(false);
  Config c = Config::parse(
      "device:sim,sim_capacity:16GiB,policy:plan,trace:off,swap_threshold:64KiB,"
      "sim_granularity:64KiB");
  c.budget = 4 * GiB;
  auto rt = std::make_unique<Runtime>(c);
  Stream s = rt->device().create_stream();
  Swapper& sw = *rt->swapper();
  std::vector<void*> blocks(static_cast<std::size_t>(state.range(0)));
  sw.begin_step();
  for (void*& p : blocks) {  // tracked from their first pin
    p = rt->allocator().allocate(128 * KiB, s);
    sw.pin(p, s);
    sw.unpin(p, s, true);
  }
  std::int64_t pins = 0;
  for (auto _ : state) {
    sw.pin(blocks[0], s);
    sw.unpin(blocks[0], s, false);
    if ((++pins & 0xfff) == 0) {  // a step of 4096 ops, as the recordings' traces stay short
      state.PauseTiming();
      sw.end_step();
      rt->device().synchronize(s);
      sw.begin_step();
      state.ResumeTiming();
    }
  }
  sw.end_step();
  rt->device().synchronize(s);
  for (void* p : blocks) rt->allocator().deallocate(p, s);
  rt->device().synchronize(s);
  rt->allocator().forget_stream(s);
  rt->device().destroy_stream(s);
  profiling::TraceRecorder::global().set_enabled(true);
}
BENCHMARK(BM_pin_recording)->ArgName("blocks")->Arg(16)->Arg(256)->Arg(2048);

// direction 0: out, 1: in, 2: both at once (one block leaves while another returns).
void BM_swap(benchmark::State& state) {
  profiling::TraceRecorder::global().set_enabled(false);
  const std::size_t bytes = static_cast<std::size_t>(state.range(2)) * MiB;
  const int dir = static_cast<int>(state.range(1));
  auto rt = make(state.range(0) != 0, 2 * bytes + 64 * MiB, state);
  if (!rt) return;
  Device& d = rt->device();
  Swapper& sw = *rt->swapper();
  Stream s = d.create_stream();
  void* a = rt->allocator().allocate(bytes, s);
  void* b = rt->allocator().allocate(bytes, s);
  for (void* p : {a, b}) {  // real contents, so every swap copies
    sw.pin(p, s);
    d.fill_async(p, 1, bytes, s);
    sw.unpin(p, s, true);
  }
  d.synchronize(s);
  sw.evict(b);
  sw.quiesce();
  double seconds = 0, moved = 0;
  for (auto _ : state) {
    double t0 = now_s(d);
    if (dir == 0 || dir == 2) sw.evict(a);
    if (dir == 1 || dir == 2) sw.prefetch(b);
    sw.quiesce();
    double t1 = now_s(d);
    seconds += t1 - t0;
    moved += static_cast<double>(bytes) * (dir == 2 ? 2 : 1);
    state.SetIterationTime(t1 - t0);
    // Reset: `a` resident and dirty, `b` on the host.
    state.PauseTiming();
    if (dir == 0 || dir == 2) sw.prefetch(a);
    sw.pin(a, s);
    d.fill_async(a, 2, bytes, s);
    sw.unpin(a, s, true);
    if (dir == 1 || dir == 2) sw.evict(b);
    sw.quiesce();
    d.synchronize(s);
    state.ResumeTiming();
  }
  state.counters["GBps"] = seconds > 0 ? moved / seconds / 1e9 : 0;
  state.counters["simulated"] = d.info().simulated ? 1 : 0;
  rt->allocator().deallocate(a, s);
  rt->allocator().deallocate(b, s);
  d.synchronize(s);
  rt->allocator().forget_stream(s);
  d.destroy_stream(s);
  profiling::TraceRecorder::global().set_enabled(true);
}
BENCHMARK(BM_swap)
    ->ArgNames({"cuda", "dir", "MiB"})
    ->ArgsProduct({{0, 1}, {0, 1, 2}, {2, 8, 64, 256, 1024}})
    ->UseManualTime()
    ->Iterations(3);

}  // namespace
}  // namespace spill

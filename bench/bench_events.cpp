// Trace recording cost per event (issue target: at most 30 ns enabled) and when switched off.
#include <benchmark/benchmark.h>

#include "profiling/events.hpp"

namespace spill::profiling {
namespace {

void BM_record_event(benchmark::State& state) {
  TraceRecorder rec(1 << 16);
  rec.set_enabled(state.range(0) != 0);
  std::uint64_t i = 0;
  for (auto _ : state) {
    rec.record(EventKind::Alloc, ++i, 4096, 1, 0, 0);
    if ((i & 0xffff) == 0) {
      state.PauseTiming();
      rec.collect();
      state.ResumeTiming();
    }
  }
}
BENCHMARK(BM_record_event)->Arg(1)->Arg(0)->ArgName("enabled");

void BM_collect_million(benchmark::State& state) {
  for (auto _ : state) {
    state.PauseTiming();
    TraceRecorder rec(1 << 20);
    for (std::uint64_t i = 0; i < (1u << 20); ++i) rec.record(EventKind::Free, i, 1);
    state.ResumeTiming();
    benchmark::DoNotOptimize(rec.collect());
  }
  state.SetItemsProcessed(state.iterations() * (1 << 20));
}
BENCHMARK(BM_collect_million)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace spill::profiling

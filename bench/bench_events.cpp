// Trace recording cost per event (issue target: at most 30 ns enabled) and when switched off.
#include <benchmark/benchmark.h>

#include "profiling/chrome_trace.hpp"
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

// Exporter throughput: a million-event trace (alloc/free/map/unmap/swap mix) to Chrome JSON text.
void BM_export_chrome_million(benchmark::State& state) {
  std::vector<TraceEvent> events(1u << 20);
  for (std::size_t i = 0; i < events.size(); ++i) {
    TraceEvent& e = events[i];
    e.time_ns = i * 100;
    e.kind = static_cast<EventKind>(i % 8 < 4 ? i % 4 : 4 + i % 6);
    e.address = 0x7f0000000000ull + (i % 4096) * 4096;
    e.bytes = 4096;
    e.stream = 0x100 + i % 3;
    e.duration_ns = e.kind == EventKind::SwapOut || e.kind == EventKind::SwapIn ? 50 : 0;
  }
  std::size_t bytes = 0;
  for (auto _ : state) {
    std::string text = chrome_trace_text(events);
    bytes = text.size();
    benchmark::DoNotOptimize(text.data());
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(events.size()));
  state.counters["json_MiB"] = static_cast<double>(bytes) / (1 << 20);
}
BENCHMARK(BM_export_chrome_million)->Unit(benchmark::kMillisecond)->Iterations(3);

}  // namespace
}  // namespace spill::profiling

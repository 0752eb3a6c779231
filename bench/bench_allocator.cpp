// Allocator benchmarks. Every figure comes with its comparisons from the same run: the
// device's raw allocation (cudaMalloc on a GPU, mmap on SimDevice) and glibc malloc.
//   BM_hot_path_*      allocate + free of a size the cache holds (target: median <= 250 ns)
//   BM_random_*        RMM-style random allocations (max size 1/4/64 MiB, 73% allocate)
//   BM_replay_step     the allocation sequence of a real training step (GPT-2 small, batch 4,
//                      from the graph zoo's liveness), repeated as a training loop repeats it:
//                      time per op and fragmentation (peak reserved / peak allocated over all
//                      passes, target <= 1.10; also after the first pass, from a cold cache)
// guard: the allocator's peak_guard (0 wait, the default; 1 idle; 2 off), for source 0 (spill).
// The cuda:1 variants skip without a GPU.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "allocator/caching_allocator.hpp"
#include "core/units.hpp"
#include "bench/bench_support.hpp"
#include "device/cuda_device.hpp"
#include "device/sim_device.hpp"
#include "graph/liveness.hpp"
#include "graph/zoo.hpp"
#include "profiling/events.hpp"

namespace spill {
namespace {

std::unique_ptr<Device> make(bool cuda, benchmark::State& state) {
  return bench::make_device(cuda, state, 16 * GiB);
}

// The three ways to get memory that every sequence runs against.
enum class Source { Spill, Raw, Malloc };

struct Op {
  bool alloc;
  std::size_t slot;
  std::size_t bytes;
};

// RMM's random_allocations: allocate with probability p (else free a random live block),
// keeping at most `limit` bytes live (as RMM bounds its sequence by the memory it has).
std::vector<Op> random_ops(std::size_t count, std::size_t max_bytes, unsigned seed,
                           std::size_t limit = 8 * GiB) {
  std::mt19937_64 rng(seed);
  std::vector<Op> ops;
  std::vector<std::size_t> live;
  std::vector<std::size_t> bytes;
  std::size_t next_slot = 0, live_bytes = 0;
  for (std::size_t i = 0; i < count; ++i) {
    std::size_t n = 1 + rng() % max_bytes;
    if (live.empty() || (rng() % 100 < 73 && live_bytes + n <= limit)) {
      ops.push_back({true, next_slot, n});
      bytes.push_back(n);
      live_bytes += n;
      live.push_back(next_slot++);
    } else {
      std::size_t k = rng() % live.size();
      ops.push_back({false, live[k], 0});
      live_bytes -= bytes[live[k]];
      live[k] = live.back();
      live.pop_back();
    }
  }
  for (std::size_t s : live) ops.push_back({false, s, 0});
  return ops;
}

// A training step's allocation sequence: each non-persistent tensor is allocated before its
// first op and freed after its last (gpt2-small, batch 4, fp32, Adam).
std::vector<Op> step_ops() {
  graph::ZooOptions o;
  o.batch = 4;
  graph::Graph g = graph::build_model("gpt2-small", o);
  graph::Liveness l = graph::analyze_liveness(g);
  std::vector<std::vector<Op>> at_op(g.ops.size() + 1);
  std::vector<std::vector<Op>> after_op(g.ops.size() + 1);
  for (std::size_t t = 0; t < g.tensors.size(); ++t) {
    const graph::Interval& iv = l.live[t];
    if (iv.first < 0 || g.tensors[t].bytes == 0) continue;
    at_op[iv.first].push_back({true, t, g.tensors[t].bytes});
    after_op[iv.last].push_back({false, t, 0});
  }
  std::vector<Op> ops;
  for (std::size_t i = 0; i < g.ops.size(); ++i) {
    ops.insert(ops.end(), at_op[i].begin(), at_op[i].end());
    ops.insert(ops.end(), after_op[i].begin(), after_op[i].end());
  }
  return ops;
}

void run_sequence(benchmark::State& state, const std::vector<Op>& ops, Source source,
                  PeakGuard guard) {
  auto dev = make(state.range(0) != 0, state);
  if (!dev) return;
  profiling::TraceRecorder::global().set_enabled(false);
  std::size_t slots = 0;
  for (const Op& op : ops) slots = std::max(slots, op.slot + 1);
  std::vector<void*> ptr(slots, nullptr);
  std::unique_ptr<CachingAllocator> alloc;
  if (source == Source::Spill)
    alloc = std::make_unique<CachingAllocator>(
        *dev, AllocatorOptions{.budget = dev->info().total_bytes, .peak_guard = guard});
  Stream s = dev->create_stream();
  std::size_t peak_alloc = 0, live_bytes = 0;
  std::vector<std::size_t> bytes_of(slots, 0);
  double first_pass = 0;  // fragmentation after the first pass over the sequence (cold cache)
  for (auto _ : state) {
    for (const Op& op : ops) {
      if (op.alloc) {
        switch (source) {
          case Source::Spill: ptr[op.slot] = alloc->allocate(op.bytes, s); break;
          case Source::Raw: ptr[op.slot] = dev->allocate(op.bytes); break;
          case Source::Malloc: ptr[op.slot] = std::malloc(op.bytes); break;
        }
        bytes_of[op.slot] = op.bytes;
        live_bytes += op.bytes;
        peak_alloc = std::max(peak_alloc, live_bytes);
      } else {
        switch (source) {
          case Source::Spill: alloc->deallocate(ptr[op.slot]); break;
          case Source::Raw: dev->deallocate(ptr[op.slot]); break;
          case Source::Malloc: std::free(ptr[op.slot]); break;
        }
        live_bytes -= bytes_of[op.slot];
      }
    }
    if (alloc && first_pass == 0) {
      AllocatorStats st = alloc->stats();
      first_pass = static_cast<double>(st.reserved.peak) / static_cast<double>(st.allocated.peak);
    }
  }
  state.counters["ns_per_op"] = benchmark::Counter(
      static_cast<double>(state.iterations() * ops.size()),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  if (alloc) {
    AllocatorStats st = alloc->stats();
    state.counters["fragmentation"] =
        static_cast<double>(st.reserved.peak) / static_cast<double>(st.allocated.peak);
    state.counters["reserved_over_requested"] =
        static_cast<double>(st.reserved.peak) / static_cast<double>(st.requested.peak);
    state.counters["peak_allocated_MiB"] = static_cast<double>(st.allocated.peak) / MiB;
    state.counters["peak_reserved_MiB"] = static_cast<double>(st.reserved.peak) / MiB;
    state.counters["gathers"] = static_cast<double>(st.gathers);
    // Device calls and releases per pass over the sequence: the price of the peak guard.
    const double passes = static_cast<double>(state.iterations());
    state.counters["maps_per_pass"] = static_cast<double>(st.segment_maps) / passes;
    state.counters["releases_per_pass"] = static_cast<double>(st.cache_releases) / passes;
    state.counters["first_pass_fragmentation"] = first_pass;
  }
  alloc.reset();
  dev->destroy_stream(s);
  profiling::TraceRecorder::global().set_enabled(true);
}

void BM_hot_path_small(benchmark::State& state) {
  auto dev = make(state.range(0) != 0, state);
  if (!dev) return;
  profiling::TraceRecorder::global().set_enabled(state.range(1) != 0);
  CachingAllocator a(*dev, AllocatorOptions{.budget = 1 * GiB});
  a.deallocate(a.allocate(4096));  // warm the cache
  for (auto _ : state) {
    void* p = a.allocate(4096);
    benchmark::DoNotOptimize(p);
    a.deallocate(p);
  }
  profiling::TraceRecorder::global().set_enabled(true);
}
BENCHMARK(BM_hot_path_small)->ArgNames({"cuda", "trace"})->ArgsProduct({{0, 1}, {0, 1}});

void BM_hot_path_large(benchmark::State& state) {
  auto dev = make(state.range(0) != 0, state);
  if (!dev) return;
  profiling::TraceRecorder::global().set_enabled(false);
  CachingAllocator a(*dev, AllocatorOptions{.budget = 1 * GiB});
  a.deallocate(a.allocate(8 * MiB));
  for (auto _ : state) {
    void* p = a.allocate(8 * MiB);
    benchmark::DoNotOptimize(p);
    a.deallocate(p);
  }
  profiling::TraceRecorder::global().set_enabled(true);
}
BENCHMARK(BM_hot_path_large)->ArgName("cuda")->Arg(0)->Arg(1);

void BM_random(benchmark::State& state) {
  std::size_t max_mib = static_cast<std::size_t>(state.range(2));
  std::size_t count = static_cast<std::size_t>(state.range(3));
  run_sequence(state, random_ops(count, max_mib * MiB, 7), static_cast<Source>(state.range(1)),
               static_cast<PeakGuard>(state.range(4)));
}
BENCHMARK(BM_random)
    ->ArgNames({"cuda", "source", "max_MiB", "ops", "guard"})
    ->ArgsProduct({{0, 1}, {0, 1, 2}, {1, 4, 64}, {10000}, {0}})
    ->ArgsProduct({{0, 1}, {0}, {64}, {10000}, {1, 2}})
    ->Args({0, 0, 4, 100000, 0})
    ->Args({0, 2, 4, 100000, 0})
    ->Unit(benchmark::kMillisecond);

void BM_replay_step(benchmark::State& state) {
  static const std::vector<Op> ops = step_ops();
  run_sequence(state, ops, static_cast<Source>(state.range(1)),
               static_cast<PeakGuard>(state.range(2)));
  state.counters["ops"] = static_cast<double>(ops.size());
}
BENCHMARK(BM_replay_step)
    ->ArgNames({"cuda", "source", "guard"})
    ->ArgsProduct({{0, 1}, {0, 1, 2}, {0}})
    ->ArgsProduct({{0, 1}, {0}, {1, 2}})
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace spill

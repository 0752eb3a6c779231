// Device seam costs: host-side overhead of the operations the allocator and swapper call most
// (map/unmap, event record/query, enqueueing a copy), on the simulated device and, when a GPU
// is present, on CUDA; plus modelled/measured copy bandwidth per direction.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <memory>
#include <string>

#include "core/units.hpp"
#include "bench/bench_support.hpp"
#include "device/cuda_device.hpp"
#include "device/sim_device.hpp"

namespace spill {
namespace {

std::unique_ptr<Device> make(bool cuda, benchmark::State& state) {
  return bench::make_device(cuda, state, 1 * GiB);
}

// The block sizes of the sweep below: one granule, and the sizes gpt-medium's blocks mapped
// most at a third on an H200 (48 MiB: 429 maps in 4 steps; 512 MiB: 66), 2026-12-04.
std::size_t block_bytes(const Device& dev, benchmark::State& state) {
  return std::max<std::size_t>(dev.granularity(), std::size_t(state.range(1)) * MiB);
}

// Maps one physical chunk and unmaps it again (a swap-out's unmap and a gather's map).
void BM_map_unmap(benchmark::State& state) {
  auto dev = make(state.range(0), state);
  if (!dev) return;
  const std::size_t g = block_bytes(*dev, state);
  void* va = dev->reserve(g);
  PhysicalHandle h = dev->create_physical(g);
  for (auto _ : state) {
    dev->map(va, g, h);
    dev->unmap(va, g);
  }
  dev->release_physical(h, g);
  dev->unreserve(va, g);
}
BENCHMARK(BM_map_unmap)->ArgsProduct({{0, 1}, {2, 48, 512}})->ArgNames({"cuda", "MiB"});

// Creates physical memory and releases it (what a swap-in and a swap-out add to the maps).
void BM_create_release_physical(benchmark::State& state) {
  auto dev = make(state.range(0), state);
  if (!dev) return;
  const std::size_t g = block_bytes(*dev, state);
  for (auto _ : state) dev->release_physical(dev->create_physical(g), g);
}
BENCHMARK(BM_create_release_physical)
    ->ArgsProduct({{0, 1}, {2, 48, 512}})
    ->ArgNames({"cuda", "MiB"});

// Reserves an address range and frees it (what a new segment adds when no kept range of its
// size is there: CachingAllocator's spare ranges, docs/allocator.md).
void BM_reserve_unreserve(benchmark::State& state) {
  auto dev = make(state.range(0), state);
  if (!dev) return;
  const std::size_t g = block_bytes(*dev, state);
  for (auto _ : state) dev->unreserve(dev->reserve(g), g);
}
BENCHMARK(BM_reserve_unreserve)->ArgsProduct({{0, 1}, {2, 48, 512}})->ArgNames({"cuda", "MiB"});

// A new block's whole life in the allocator's terms: reserve, create, map, then unmap, release,
// unreserve (a cached block returned and mapped again elsewhere).
void BM_block_map_cycle(benchmark::State& state) {
  auto dev = make(state.range(0), state);
  if (!dev) return;
  const std::size_t g = block_bytes(*dev, state);
  for (auto _ : state) {
    void* va = dev->reserve(g);
    PhysicalHandle h = dev->create_physical(g);
    dev->map(va, g, h);
    dev->unmap(va, g);
    dev->release_physical(h, g);
    dev->unreserve(va, g);
  }
}
BENCHMARK(BM_block_map_cycle)->ArgsProduct({{0, 1}, {2, 48, 512}})->ArgNames({"cuda", "MiB"});

void BM_event_record_query(benchmark::State& state) {
  auto dev = make(state.range(0), state);
  if (!dev) return;
  Stream s = dev->create_stream();
  Event e = dev->create_event();
  for (auto _ : state) {
    dev->record(e, s);
    benchmark::DoNotOptimize(dev->query(e));
  }
  dev->synchronize(s);
  dev->destroy_event(e);
  dev->destroy_stream(s);
}
BENCHMARK(BM_event_record_query)->Arg(0)->Arg(1)->ArgName("cuda");

// Copy bandwidth by timing events: modelled on the simulated device, measured on a GPU.
void BM_copy_bandwidth(benchmark::State& state) {
  auto dev = make(state.range(0), state);
  if (!dev) return;
  const auto kind = static_cast<CopyKind>(state.range(1));
  const std::size_t bytes = static_cast<std::size_t>(state.range(2));
  void* d = dev->allocate(bytes);
  void* h = dev->allocate_host(bytes);
  Stream s = dev->create_stream();
  Event t0 = dev->create_event(true), t1 = dev->create_event(true);
  double total_ms = 0;
  for (auto _ : state) {
    dev->record(t0, s);
    if (kind == CopyKind::HostToDevice) dev->copy_async(d, h, bytes, kind, s);
    else dev->copy_async(h, d, bytes, kind, s);
    dev->record(t1, s);
    dev->synchronize(s);
    double ms = dev->elapsed_ms(t0, t1);
    total_ms += ms;
    state.SetIterationTime(ms * 1e-3);
  }
  state.counters["GBps"] = state.iterations() * static_cast<double>(bytes) / (total_ms * 1e-3) / 1e9;
  state.counters["simulated"] = dev->info().simulated ? 1 : 0;
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
  dev->destroy_event(t0);
  dev->destroy_event(t1);
  dev->destroy_stream(s);
  dev->free_host(h);
  dev->deallocate(d);
}
BENCHMARK(BM_copy_bandwidth)
    ->ArgNames({"cuda", "kind", "bytes"})
    ->ArgsProduct({{0, 1}, {0, 1}, {1 << 20, 64 << 20}})
    ->UseManualTime();

}  // namespace
}  // namespace spill

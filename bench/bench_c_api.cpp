// The C API's cost over the C++ it wraps, measured in the same run on the simulated device.
//   BM_c_malloc_free      spill_malloc + spill_free of 4 KiB through the exported C symbols,
//                         a cache hit (target: median <= 120 ns on the 2-core build machine)
//   BM_cpp_malloc_free    the same pair on the same kind of runtime, in C++
//                         (Runtime::allocator().allocate / deallocate)
//   BM_torch_malloc_free  spill_torch_malloc + spill_torch_free (PyTorch's hooks)
//   BM_c_pin_unpin        spill_pin + spill_unpin of a resident declared block, and
//   BM_cpp_pin_unpin      Swapper::pin + unpin of the same
//   BM_c_and_cpp_interleaved  the C and C++ malloc+free pairs in alternating batches of 1000,
//                         4000 batches each; counters c_ns / cpp_ns / overhead_ns are the
//                         fastest batch of each: on a shared, loaded machine the medians above
//                         measure the load, this pair measures the code
// trace: 0 = trace:off, 1 = trace:on in the configuration.
#include <benchmark/benchmark.h>
#include <spill/spill.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>

#include "core/config.hpp"
#include "core/units.hpp"
#include "profiling/events.hpp"
#include "swapper/runtime.hpp"

namespace spill {
namespace {

std::string conf(const benchmark::State& state) {
  return std::string("device:sim,sim_capacity:4GiB,budget:1GiB,policy:lru,trace:") +
         (state.range(0) ? "on" : "off");
}

// A fresh C API session with the benchmark's configuration.
bool open_c(benchmark::State& state) {
  spill_shutdown();
  if (spill_init(conf(state).c_str()) != SPILL_OK || spill_device_open(0, nullptr) != SPILL_OK) {
    state.SkipWithError(spill_last_error());
    return false;
  }
  return true;
}

void BM_c_malloc_free(benchmark::State& state) {
  if (!open_c(state)) return;
  void* p = nullptr;
  spill_malloc(&p, 4096, 0, nullptr);  // warm the cache
  spill_free(p, 0, nullptr);
  for (auto _ : state) {
    spill_malloc(&p, 4096, 0, nullptr);
    benchmark::DoNotOptimize(p);
    spill_free(p, 0, nullptr);
  }
  spill_shutdown();
}
BENCHMARK(BM_c_malloc_free)->ArgName("trace")->Arg(0)->Arg(1);

void BM_cpp_malloc_free(benchmark::State& state) {
  Runtime rt(Config::parse(conf(state)), RuntimeOptions{.opt_in_swappable = true});
  profiling::TraceRecorder::global().set_enabled(state.range(0) != 0);
  CachingAllocator& a = rt.allocator();
  a.deallocate(a.allocate(4096, nullptr), nullptr);
  for (auto _ : state) {
    void* p = a.allocate(4096, nullptr);
    benchmark::DoNotOptimize(p);
    a.deallocate(p, nullptr);
  }
  profiling::TraceRecorder::global().set_enabled(true);
}
BENCHMARK(BM_cpp_malloc_free)->ArgName("trace")->Arg(0)->Arg(1);

void BM_torch_malloc_free(benchmark::State& state) {
  if (!open_c(state)) return;
  spill_torch_free(spill_torch_malloc(4096, 0, nullptr), 4096, 0, nullptr);
  for (auto _ : state) {
    void* p = spill_torch_malloc(4096, 0, nullptr);
    benchmark::DoNotOptimize(p);
    spill_torch_free(p, 4096, 0, nullptr);
  }
  spill_shutdown();
}
BENCHMARK(BM_torch_malloc_free)->ArgName("trace")->Arg(0)->Arg(1);

void BM_c_pin_unpin(benchmark::State& state) {
  if (!open_c(state)) return;
  void* p = nullptr;
  spill_malloc(&p, 8 * MiB, 0, nullptr);
  spill_set_swappable(p, 1);
  spill_pin_token t;
  for (auto _ : state) {
    spill_pin(p, nullptr, &t);
    spill_unpin(&t, nullptr, 0);
  }
  spill_free(p, 0, nullptr);
  spill_shutdown();
}
BENCHMARK(BM_c_pin_unpin)->ArgName("trace")->Arg(0);

void BM_cpp_pin_unpin(benchmark::State& state) {
  Runtime rt(Config::parse(conf(state)), RuntimeOptions{.opt_in_swappable = true});
  profiling::TraceRecorder::global().set_enabled(false);
  void* p = rt.allocator().allocate(8 * MiB, nullptr);
  Swapper& sw = *rt.swapper();
  sw.set_swappable(p, true);
  for (auto _ : state) {
    PinToken t = sw.pin(p, nullptr);
    sw.unpin(t, nullptr, false);
  }
  rt.allocator().deallocate(p, nullptr);
  profiling::TraceRecorder::global().set_enabled(true);
}
BENCHMARK(BM_cpp_pin_unpin)->ArgName("trace")->Arg(0);

void BM_c_and_cpp_interleaved(benchmark::State& state) {
  if (!open_c(state)) return;
  Runtime rt(Config::parse(conf(state)), RuntimeOptions{.opt_in_swappable = true});
  profiling::TraceRecorder::global().set_enabled(state.range(0) != 0);
  CachingAllocator& a = rt.allocator();
  void* p = nullptr;
  spill_malloc(&p, 4096, 0, nullptr);
  spill_free(p, 0, nullptr);
  a.deallocate(a.allocate(4096, nullptr), nullptr);
  auto batch = [](auto&& pair) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 1000; ++i) pair();
    return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0)
               .count() / 1000;
  };
  double c = 1e9, cpp = 1e9;
  for (auto _ : state) {
    for (int k = 0; k < 4000; ++k) {
      c = std::min(c, batch([&] {
        spill_malloc(&p, 4096, 0, nullptr);
        benchmark::DoNotOptimize(p);
        spill_free(p, 0, nullptr);
      }));
      cpp = std::min(cpp, batch([&] {
        void* q = a.allocate(4096, nullptr);
        benchmark::DoNotOptimize(q);
        a.deallocate(q, nullptr);
      }));
    }
  }
  state.counters["c_ns"] = c;
  state.counters["cpp_ns"] = cpp;
  state.counters["overhead_ns"] = c - cpp;
  spill_shutdown();
  profiling::TraceRecorder::global().set_enabled(true);
}
BENCHMARK(BM_c_and_cpp_interleaved)->ArgName("trace")->Arg(0)->Arg(1)->Iterations(1);

}  // namespace
}  // namespace spill

// Planning time against graph size: the spill planner (and the simulator it calls) on zoo
// models from a few hundred ops to GPT-2 XL (~1,450 ops), at half the unlimited-memory peak.
// Target: a GPT-2 XL step plans in well under a second.
#include <benchmark/benchmark.h>

#include "graph/device_model.hpp"
#include "graph/liveness.hpp"
#include "graph/planner.hpp"
#include "graph/simulator.hpp"
#include "graph/zoo.hpp"

namespace {

using namespace spill::graph;

struct Case {
  const char* model;
  int batch;
  int seq;
};
const Case kCases[] = {{"resnet50", 32, 0}, {"gpt2-small", 8, 1024}, {"resnet152", 32, 0},
                       {"bert-large", 8, 512}, {"gpt2-xl", 8, 1024}};

void BM_plan_spill(benchmark::State& state) {
  const Case& c = kCases[state.range(0)];
  ZooOptions o;
  o.batch = c.batch;
  o.seq = c.seq;
  Graph g = build_model(c.model, o);
  const GpuModel& gpu = gpu_preset("a100-40gb");
  std::vector<double> times = op_times_s(g, gpu);
  PlannerOptions po;
  po.budget = analyze_liveness(g).peak / 2;
  std::size_t swaps = 0;
  for (auto _ : state) {
    Plan p = plan_spill(g, times, spill::link_preset("pcie4"), po);
    swaps = p.swaps.size();
    benchmark::DoNotOptimize(p);
  }
  state.SetLabel(std::string(c.model) + " ops=" + std::to_string(g.ops.size()) +
                 " tensors=" + std::to_string(g.tensors.size()) +
                 " swaps=" + std::to_string(swaps));
  state.counters["ops"] = double(g.ops.size());
}
BENCHMARK(BM_plan_spill)->DenseRange(0, 4)->Unit(benchmark::kMillisecond);

void BM_simulate(benchmark::State& state) {
  ZooOptions o;
  o.batch = 8;
  Graph g = build_model("gpt2-xl", o);
  const GpuModel& gpu = gpu_preset("a100-40gb");
  std::vector<double> times = op_times_s(g, gpu);
  PlannerOptions po;
  po.budget = analyze_liveness(g).peak / 2;
  Plan p = plan_spill(g, times, spill::link_preset("pcie4"), po);
  for (auto _ : state) {
    SimResult r = simulate(g, times, spill::link_preset("pcie4"), &p, {po.budget, false});
    benchmark::DoNotOptimize(r);
  }
  state.SetLabel("gpt2-xl ops=" + std::to_string(g.ops.size()));
}
BENCHMARK(BM_simulate)->Unit(benchmark::kMillisecond);

void BM_build_and_analyze(benchmark::State& state) {
  ZooOptions o;
  o.batch = 8;
  for (auto _ : state) {
    Graph g = build_model("gpt2-xl", o);
    Liveness l = analyze_liveness(g);
    benchmark::DoNotOptimize(l);
  }
}
BENCHMARK(BM_build_and_analyze)->Unit(benchmark::kMillisecond);

}  // namespace

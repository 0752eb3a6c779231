// Shared by the benchmark programs: the device a benchmark runs on, SimDevice or the GPU
// (skipped with the reason when there is none).
#pragma once

#include <benchmark/benchmark.h>

#include <memory>
#include <string>

#include "device/cuda_device.hpp"
#include "device/sim_device.hpp"

namespace spill::bench {

inline std::unique_ptr<Device> make_device(bool cuda, benchmark::State& state,
                                           std::size_t sim_capacity) {
  if (!cuda) return std::make_unique<SimDevice>(SimOptions{.capacity = sim_capacity});
  std::string why;
  if (!cuda_available(0, &why)) {
    state.SkipWithError(("no GPU: " + why).c_str());
    return nullptr;
  }
  return make_cuda_device(0);
}

}  // namespace spill::bench

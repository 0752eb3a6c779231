// The Device backends every contract test runs on. GPU backends skip with the reason when no
// GPU is usable.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "core/units.hpp"
#include "device/cuda_device.hpp"
#include "device/sim_device.hpp"

namespace spill::test {

struct SimBackend {
  static constexpr const char* name = "sim";
  static std::unique_ptr<Device> make(std::string*) {
    return std::make_unique<SimDevice>(SimOptions{.capacity = 256 * MiB});
  }
};

struct ChaosSimBackend {
  static constexpr const char* name = "sim-chaos";
  static std::unique_ptr<Device> make(std::string*) {
    return std::make_unique<SimDevice>(SimOptions{.capacity = 256 * MiB,
                                                  .chaos_seed = 1234,
                                                  .chaos_probability = 0.3,
                                                  .chaos_max_delay = std::chrono::microseconds(300)});
  }
};

struct CudaBackend {
  static constexpr const char* name = "cuda";
  static std::unique_ptr<Device> make(std::string* skip) {
    std::string why;
    if (!cuda_available(0, &why)) {
      *skip = "no GPU for the CUDA backend: " + why;
      return nullptr;
    }
    return make_cuda_device(0);
  }
};

}  // namespace spill::test

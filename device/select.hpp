// Chooses the backend a configuration asks for: `auto` takes the GPU when one is usable and
// the simulated device otherwise, and says which it chose and why.
#pragma once

#include <memory>
#include <string>

#include "core/config.hpp"
#include "device/device.hpp"

namespace spill {

struct DeviceSelection {
  std::unique_ptr<Device> device;
  std::string reason;  // e.g. "device:auto chose the simulated device: no CUDA GPU found"
};

// Throws CudaError when `device:cuda` is asked for and no GPU is usable.
DeviceSelection make_device(const Config& config);

}  // namespace spill

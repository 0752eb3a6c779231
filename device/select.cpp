#include "device/select.hpp"

#include "core/errors.hpp"
#include "device/cuda_device.hpp"
#include "device/sim_device.hpp"

namespace spill {

DeviceSelection make_device(const Config& config) {
  DeviceSelection sel;
  if (config.device == DeviceChoice::Sim) {
    sel.device = std::make_unique<SimDevice>(SimOptions::from_config(config));
    sel.reason = "device:sim asked for the simulated device";
    return sel;
  }
  std::string why;
  bool usable = cuda_available(config.gpu, &why);
  if (config.device == DeviceChoice::Cuda) {
    if (!usable) throw CudaError("device:cuda asked for a GPU, but " + why, 100);
    sel.device = make_cuda_device(config.gpu);
    sel.reason = "device:cuda asked for GPU " + std::to_string(config.gpu);
    return sel;
  }
  if (usable) {
    sel.device = make_cuda_device(config.gpu);
    sel.reason = "device:auto chose GPU " + std::to_string(config.gpu) + " (" +
                 sel.device->info().name + ")";
  } else {
    sel.device = std::make_unique<SimDevice>(SimOptions::from_config(config));
    sel.reason = "device:auto chose the simulated device: " + why;
  }
  return sel;
}

}  // namespace spill

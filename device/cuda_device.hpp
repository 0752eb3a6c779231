// CudaDevice: the Device contract on a real GPU through the CUDA runtime, with VMM through the
// driver entry points (device/cuda_driver.hpp). Only factories are exposed so that including
// this header needs no CUDA headers.
#pragma once

#include <memory>
#include <string>

#include "device/device.hpp"

namespace spill {

// True when GPU `ordinal` can be used (driver present, device exists, VMM supported);
// otherwise false with the reason, e.g. "no CUDA driver (cudaErrorInsufficientDriver)".
bool cuda_available(int ordinal, std::string* reason);

// Opens GPU `ordinal`; throws CudaError with the reason when it cannot.
std::unique_ptr<Device> make_cuda_device(int ordinal = 0);

}  // namespace spill

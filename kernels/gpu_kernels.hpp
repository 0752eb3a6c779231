// The CUDA implementation of Kernels: cuBLAS (FP32 math, no atomics, a fixed workspace),
// cuDNN for convolution, batch norm and pooling with deterministic algorithms, and spill's
// own kernels (gpu_elementwise.cu) for the rest. cuBLAS and cuDNN handles are created on
// first use, so nothing touches them unless a CUDA device runs kernels.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "kernels/kernels.hpp"

namespace spill::kernels {

// Throws InvalidArgument when `device` is not a CudaDevice.
std::unique_ptr<Kernels> make_gpu_kernels(Device& device);

// Whether this build has cuDNN (convolution, batch norm and pooling on a GPU need it).
bool gpu_has_cudnn();

}  // namespace spill::kernels

// Launcher for the stream-holding spin kernel (device/cuda_spin.cu), used by CudaDevice::hold.
#pragma once

namespace spill::detail {

// Enqueues on `stream` (a cudaStream_t) a one-thread kernel that returns once *device_flag is
// non-zero or `timeout_ns` have passed.
void launch_spin(volatile int* device_flag, void* stream, unsigned long long timeout_ns);

}  // namespace spill::detail

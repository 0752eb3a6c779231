// The kernel behind CudaDevice::hold: spins on a flag in mapped pinned host memory until the
// host sets it, or until about `timeout_ns` have passed so that a forgotten hold cannot hang.
#include <cuda_runtime.h>

#include "device/cuda_check.hpp"
#include "device/cuda_spin.hpp"

namespace spill::detail {
namespace {

__global__ void spin_kernel(volatile int* flag, unsigned long long timeout_ns) {
  unsigned long long start = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  for (;;) {
    if (*flag != 0) return;
    unsigned long long now = 0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start > timeout_ns) return;
    __nanosleep(1000);
  }
}

}  // namespace

void launch_spin(volatile int* device_flag, void* stream, unsigned long long timeout_ns) {
  spin_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(device_flag, timeout_ns);
  SPILL_CUDA_TRY(cudaGetLastError());
}

}  // namespace spill::detail

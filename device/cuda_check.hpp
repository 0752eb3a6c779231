// Error checking for CUDA runtime and driver calls: SPILL_CUDA_TRY and SPILL_CU_TRY throw
// CudaError naming the call and the error (or OutOfMemory when that is what it was).
// Only for translation units that include the CUDA headers.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <string>

namespace spill::detail {
[[noreturn]] void throw_cuda(cudaError_t err, const char* call, const char* file, int line);
[[noreturn]] void throw_cu(CUresult err, const char* call, const char* file, int line);
}  // namespace spill::detail

#define SPILL_CUDA_TRY(call)                                                            \
  do {                                                                                  \
    cudaError_t spill_err_ = (call);                                                    \
    if (spill_err_ != cudaSuccess)                                                      \
      ::spill::detail::throw_cuda(spill_err_, #call, __FILE__, __LINE__);               \
  } while (0)

#define SPILL_CU_TRY(call)                                                              \
  do {                                                                                  \
    CUresult spill_res_ = (call);                                                       \
    if (spill_res_ != CUDA_SUCCESS)                                                     \
      ::spill::detail::throw_cu(spill_res_, #call, __FILE__, __LINE__);                 \
  } while (0)

#include <cuda_runtime.h>

#include "core/pattern.hpp"
#include "device/cuda_check.hpp"
#include "kernels/pattern.hpp"

namespace spill::kernels {
namespace {

__global__ void fill_kernel(std::uint64_t* dst, std::size_t words, std::uint64_t seed) {
  for (std::size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < words;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    dst[i] = pattern_word(seed, i);
}

__global__ void check_kernel(const std::uint64_t* src, std::size_t words, std::uint64_t seed,
                             unsigned long long* mismatches) {
  unsigned long long local = 0;
  for (std::size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < words;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    local += src[i] != pattern_word(seed, i);
  if (local) atomicAdd(mismatches, local);
}

cudaStream_t cs(Stream s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

void fill_pattern_async(void* dst, std::size_t bytes, std::uint64_t seed, Stream stream) {
  std::size_t words = bytes / 8;
  if (words == 0) return;
  unsigned blocks = static_cast<unsigned>(std::min<std::size_t>((words + 255) / 256, 4096));
  fill_kernel<<<blocks, 256, 0, cs(stream)>>>(static_cast<std::uint64_t*>(dst), words, seed);
  SPILL_CUDA_TRY(cudaGetLastError());
}

std::uint64_t count_pattern_mismatches(const void* src, std::size_t bytes, std::uint64_t seed,
                                       Stream stream) {
  std::size_t words = bytes / 8;
  unsigned long long* counter = nullptr;
  SPILL_CUDA_TRY(cudaMallocAsync(&counter, sizeof(*counter), cs(stream)));
  SPILL_CUDA_TRY(cudaMemsetAsync(counter, 0, sizeof(*counter), cs(stream)));
  if (words > 0) {
    unsigned blocks = static_cast<unsigned>(std::min<std::size_t>((words + 255) / 256, 4096));
    check_kernel<<<blocks, 256, 0, cs(stream)>>>(static_cast<const std::uint64_t*>(src), words,
                                                 seed, counter);
    SPILL_CUDA_TRY(cudaGetLastError());
  }
  unsigned long long result = 0;
  SPILL_CUDA_TRY(cudaMemcpyAsync(&result, counter, sizeof(result), cudaMemcpyDeviceToHost,
                                 cs(stream)));
  SPILL_CUDA_TRY(cudaFreeAsync(counter, cs(stream)));
  SPILL_CUDA_TRY(cudaStreamSynchronize(cs(stream)));
  return result;
}

}  // namespace spill::kernels

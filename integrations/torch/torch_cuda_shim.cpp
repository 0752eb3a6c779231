// spill as PyTorch's CUDA allocator: the malloc and free that torch.cuda.memory's
// CUDAPluggableAllocator calls, over spill's C API. As the current allocator (enable()) PyTorch
// never checks the pointer it returns, so a failure there throws c10::OutOfMemoryError (what
// PyTorch turns into torch.cuda.OutOfMemoryError) or c10::Error with spill's message, instead of
// handing back NULL; behind a MemPool (pool()) PyTorch's caching allocator takes NULL as out of
// memory, so the pool's malloc returns it. Compiled against the running torch's headers (c10
// only): by CMake when Torch is found, else by spill.torch at first use through
// torch.utils.cpp_extension.
#include <sys/types.h>

#include <cstddef>
#include <string>

#include <c10/util/Exception.h>
#include <spill/spill.h>
// torch/version.h is under torch/csrc/api/include, an include path cpp_extension still adds
// (for torch/torch.h) but means to drop; the longer name needs only torch's include folder.
#if __has_include(<torch/version.h>)
#include <torch/version.h>
#else
#include <torch/csrc/api/include/torch/version.h>
#endif

#define SPILL_TORCH_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

[[noreturn]] void throw_failure(spill_status status, std::size_t size, int device) {
  std::string message = spill_last_error();
  if (message.empty()) message = spill_status_string(status);
  const std::string what = "spill: cannot allocate " + std::to_string(size) + " bytes on device " +
                           std::to_string(device) + ": " + message;
  if (status == SPILL_ERROR_OUT_OF_MEMORY || status == SPILL_ERROR_HOST_CAP)
    C10_THROW_ERROR(OutOfMemoryError, what);
  C10_THROW_ERROR(Error, what);
}

}  // namespace

// CUDAPluggableAllocator's alloc_fn: void* (size_t size, int device, cudaStream_t stream).
SPILL_TORCH_EXPORT void* spill_torch_shim_malloc(std::size_t size, int device, void* stream) {
  if (size == 0) return nullptr;  // as PyTorch's own allocator: a null DataPtr is never freed
  void* ptr = nullptr;
  spill_status status = spill_malloc(&ptr, size, device, stream);
  if (status != SPILL_OK) throw_failure(status, size, device);
  return ptr;
}

// The alloc_fn of the allocator behind spill.torch.pool(). A MemPool's allocator is called by
// PyTorch's own caching allocator (its raw_alloc, for a new segment of the pool), which takes
// NULL as out of memory: it then frees the pool's cached segments and retries before it raises
// torch.cuda.OutOfMemoryError itself. An exception from here would skip that (the pool's free
// cached segments, spill's memory, stayed held while the request failed). spill's account of the
// failure stays in spill_last_oom_message.
SPILL_TORCH_EXPORT void* spill_torch_shim_pool_malloc(std::size_t size, int device,
                                                      void* stream) {
  void* ptr = nullptr;
  if (size == 0 || spill_malloc(&ptr, size, device, stream) != SPILL_OK) return nullptr;
  return ptr;
}

// CUDAPluggableAllocator's free_fn: void (void* ptr, size_t size, int device, cudaStream_t).
// It cannot report a failure; spill_torch_free counts it (stats: free_errors).
SPILL_TORCH_EXPORT void spill_torch_shim_free(void* ptr, std::size_t size, int device,
                                              void* stream) {
  spill_torch_free(ptr, static_cast<ssize_t>(size), device, stream);
}

// The torch this shim was compiled against ("2.11.0 abi1"), so that a prebuilt shim is used
// only with the same torch.
SPILL_TORCH_EXPORT const char* spill_torch_shim_built_for(void) {
  return TORCH_VERSION " abi" C10_STRINGIZE(_GLIBCXX_USE_CXX11_ABI);
}

// The CPU bridge: spill, on its simulated device, installed as PyTorch's CPU allocator
// (c10::SetCPUAllocator), so that a CPU-only torch trains on memory spill manages. The
// simulated device's memory is host memory while a block is resident and faults while it is
// swapped out, so a use that no hook pinned crashes instead of passing. Tensors allocated
// before the install keep their own deleters; after uninstall the default allocator serves new
// tensors while spill's keep freeing into spill. In a child forked after spill started (a
// DataLoader worker) new tensors come from PyTorch's default allocator and frees of the
// parent's blocks do nothing: the child never touches the parent's runtime.
#include <pthread.h>

#include <atomic>
#include <cstdint>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <spill/spill.h>
// As in torch_cuda_shim.cpp: torch/csrc/api/include may leave cpp_extension's include paths.
#if __has_include(<torch/version.h>)
#include <torch/version.h>
#else
#include <torch/csrc/api/include/torch/version.h>
#endif

#define SPILL_TORCH_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// SetAllocator keeps the highest priority it has seen; ours outranks the default (0) and the
// same priority puts the default back.
constexpr std::uint8_t kPriority = 64;

std::atomic<int> g_device{0};
std::atomic<bool> g_forked{false};
std::atomic<bool> g_free_error_reported{false};
std::once_flag g_atfork_once;

void mark_forked() { g_forked.store(true); }

void spill_cpu_delete(void* ptr) {
  if (ptr == nullptr || g_forked.load(std::memory_order_relaxed)) return;
  spill_status status = spill_free(ptr, g_device.load(std::memory_order_relaxed), nullptr);
  // After spill_shutdown the memory went with the runtime; anything else is a bug worth one line.
  if (status != SPILL_OK && status != SPILL_ERROR_SHUT_DOWN &&
      !g_free_error_reported.exchange(true))
    std::fprintf(stderr, "spill: freeing a CPU tensor failed: %s\n", spill_last_error());
}

class SpillCpuAllocator final : public c10::Allocator {
 public:
  // torch < 2.3 declares allocate const, later versions non-const: one of these overrides it.
  c10::DataPtr allocate(std::size_t n) const { return allocate_block(n); }
  c10::DataPtr allocate(std::size_t n) { return allocate_block(n); }
  c10::DeleterFnPtr raw_deleter() const override { return &spill_cpu_delete; }
  // Required by torch >= 2.3 (Allocator::clone); the bytes must be resident to be copied.
  void copy_data(void* dest, const void* src, std::size_t count) const {
    spill_pin_token in{}, out{};
    bool pinned_in = spill_pin_for_host(const_cast<void*>(src), &in) == SPILL_OK;
    bool pinned_out = spill_pin_for_host(dest, &out) == SPILL_OK;
    std::memcpy(dest, src, count);
    if (pinned_out) spill_unpin(&out, nullptr, 1);
    if (pinned_in) spill_unpin(&in, nullptr, 0);
  }

 private:
  static c10::DataPtr allocate_block(std::size_t n) {
    if (g_forked.load(std::memory_order_relaxed))
      return c10::GetDefaultCPUAllocator()->allocate(n);
    const int device = g_device.load(std::memory_order_relaxed);
    void* ptr = nullptr;
    spill_status status = spill_malloc(&ptr, n, device, nullptr);
    if (status != SPILL_OK) {
      std::string message = spill_last_error();
      if (message.empty()) message = spill_status_string(status);
      const std::string what = "spill: cannot allocate " + std::to_string(n) +
                               " bytes for a CPU tensor (simulated device " +
                               std::to_string(device) + "): " + message;
      if (status == SPILL_ERROR_OUT_OF_MEMORY || status == SPILL_ERROR_HOST_CAP)
        C10_THROW_ERROR(OutOfMemoryError, what);
      C10_THROW_ERROR(Error, what);
    }
    // spill_malloc's memory is ready for work on its stream, and CPU kernels run on the host:
    // wait for that stream first. It is idle unless a block freed there still had a copy of
    // spill's in flight (a swap-in landing, a swap-out reading), which the stream waits for;
    // the new tensor's first write must not race that copy.
    status = spill_stream_synchronize(device, nullptr);
    if (status != SPILL_OK) {
      spill_cpu_delete(ptr);
      C10_THROW_ERROR(Error, std::string("spill: waiting for the simulated device's stream "
                                         "failed: ") + spill_last_error());
    }
    return {ptr, ptr, &spill_cpu_delete, c10::Device(c10::DeviceType::CPU)};
  }
};

SpillCpuAllocator g_allocator;

}  // namespace

// Installs spill's device `device` as PyTorch's CPU allocator. Returns a spill_status (the
// message is in spill_last_error()), or SPILL_ERROR_INVALID_ARGUMENT with no message when the
// device is a GPU, whose memory CPU kernels cannot read.
SPILL_TORCH_EXPORT int spill_torch_cpu_install(int device) {
  int simulated = 0;
  spill_status status = spill_device_open(device, &simulated);
  if (status != SPILL_OK) return status;
  if (!simulated) return SPILL_ERROR_INVALID_ARGUMENT;
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, &mark_forked); });
  g_device.store(device);
  c10::SetCPUAllocator(&g_allocator, kPriority);
  return SPILL_OK;
}

// Puts PyTorch's default CPU allocator back; tensors spill allocated still free into spill.
SPILL_TORCH_EXPORT void spill_torch_cpu_uninstall(void) {
  if (c10::GetCPUAllocator() == &g_allocator)
    c10::SetCPUAllocator(c10::GetDefaultCPUAllocator(), kPriority);
}

// 1 when spill is PyTorch's CPU allocator now.
SPILL_TORCH_EXPORT int spill_torch_cpu_installed(void) {
  return c10::GetCPUAllocator() == &g_allocator ? 1 : 0;
}

// 1 in a child forked after the install (its tensors come from the default allocator).
SPILL_TORCH_EXPORT int spill_torch_cpu_forked(void) { return g_forked.load() ? 1 : 0; }

// The torch this bridge was compiled against ("1.13.0 abi1").
SPILL_TORCH_EXPORT const char* spill_torch_shim_built_for(void) {
  return TORCH_VERSION " abi" C10_STRINGIZE(_GLIBCXX_USE_CXX11_ABI);
}

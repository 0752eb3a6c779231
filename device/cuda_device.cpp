#include "device/cuda_device.hpp"

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <mutex>
#include <new>
#include <optional>
#include <unordered_map>

#include "core/errors.hpp"
#include "core/link_model.hpp"
#include "core/units.hpp"
#include "device/cuda_check.hpp"
#include "device/cuda_driver.hpp"
#include "device/cuda_spin.hpp"

namespace spill {
namespace {

cudaStream_t cs(Stream s) { return reinterpret_cast<cudaStream_t>(s); }
cudaEvent_t ce(Event e) { return reinterpret_cast<cudaEvent_t>(e); }
CUdeviceptr dp(void* p) { return reinterpret_cast<CUdeviceptr>(p); }

// A nominal link guess from the device name; `spill bench link` measures the real one.
const LinkModel& guess_link(const cudaDeviceProp& prop) {
  std::string name = prop.name;
  if (name.find("GH200") != std::string::npos || name.find("GB200") != std::string::npos)
    return link_preset("nvlink-c2c");
  if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos ||
      name.find("B200") != std::string::npos)
    return link_preset("pcie5");
  if (name.find("V100") != std::string::npos || prop.major < 8) return link_preset("pcie3");
  return link_preset("pcie4");
}

// Pinning host memory that the host cannot page-lock fails with cudaErrorMemoryAllocation: it is
// spill's host-memory error (HostCapExceeded, an OutOfMemory), as when host_cap is reached, so
// the swapper treats it as it treats a full host pool; the failure is not sticky, and is
// cleared from the thread's last error.
void pin_or_throw(cudaError_t err, const char* call, std::size_t bytes) {
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    SPILL_FAIL_HOST_CAP(std::string(call) + " of " + format_bytes(bytes) +
                        " of pinned host memory failed: cudaErrorMemoryAllocation (the host "
                        "cannot page-lock that much more). Lower the budget's pressure or set a "
                        "host_cap");
  }
  SPILL_CUDA_TRY(err);
}

// Whether the work before `e`'s latest record has finished. cudaErrorNotReady is an answer,
// not an error, but the runtime also keeps it as the thread's last error, where the next
// cudaGetLastError would report it: spill's kernel-launch checks, and the frameworks' (PyTorch
// checks after every kernel it launches), on the very thread that asked. It is cleared here,
// and only it: another pending error stays for whoever made it.
bool event_done(cudaEvent_t e) {
  const cudaError_t err = cudaEventQuery(e);
  if (err == cudaErrorNotReady) {
    if (cudaPeekAtLastError() == cudaErrorNotReady) (void)cudaGetLastError();
    return false;
  }
  SPILL_CUDA_TRY(err);
  return true;
}

void host_trampoline(void* user) {
  std::unique_ptr<std::function<void()>> fn(static_cast<std::function<void()>*>(user));
  try {
    (*fn)();
  } catch (...) {
    SPILL_ASSERT(false, "a host callback threw; callbacks must not throw");
  }
}

// Makes one device current on the calling thread for the length of a call, and puts back the
// device that was current before: frameworks keep their own current device per thread (PyTorch's
// device guards, CuPy's Device contexts), and a memory manager must not change it under them.
class CurrentDevice {
 public:
  explicit CurrentDevice(int ordinal) {
    int current = 0;
    SPILL_CUDA_TRY(cudaGetDevice(&current));
    if (current != ordinal) {
      SPILL_CUDA_TRY(cudaSetDevice(ordinal));
      previous_ = current;
    }
  }
  ~CurrentDevice() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;

 private:
  int previous_ = -1;
};

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(int ordinal) : ordinal_(ordinal) {
    CurrentDevice current(ordinal);
    SPILL_CUDA_TRY(cudaFree(nullptr));  // create the primary context
    cudaDeviceProp prop{};
    SPILL_CUDA_TRY(cudaGetDeviceProperties(&prop, ordinal));
    api_ = &driver_api();
    prop_.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop_.location.id = ordinal;
    std::size_t gran = 0;
    SPILL_CU_TRY(api_->mem_get_allocation_granularity(&gran, &prop_,
                                                       CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    const LinkModel& link = guess_link(prop);
    info_.backend = Backend::Cuda;
    info_.name = prop.name;
    info_.ordinal = ordinal;
    info_.total_bytes = prop.totalGlobalMem;
    info_.granularity = gran;
    info_.cc_major = prop.major;
    info_.cc_minor = prop.minor;
    info_.link_name = link.name;
    info_.link_description = link.description + " (nominal, guessed from the device name)";
    info_.link_nominal_gbps = link.nominal_gbps;
    info_.h2d_gbps = link.h2d_gbps;
    info_.d2h_gbps = link.d2h_gbps;
    info_.simulated = false;
  }

 private:
  int ordinal_;
  const DriverApi* api_ = nullptr;
  CUmemAllocationProp prop_{};

  MemInfo do_mem_info() override {
    CurrentDevice current(ordinal_);
    MemInfo m;
    SPILL_CUDA_TRY(cudaMemGetInfo(&m.free, &m.total));
    return m;
  }
  void* do_reserve(std::size_t bytes) override {
    CurrentDevice current(ordinal_);
    CUdeviceptr p = 0;
    SPILL_CU_TRY(api_->mem_address_reserve(&p, bytes, info_.granularity, 0, 0));
    return reinterpret_cast<void*>(p);
  }
  void do_unreserve(void* addr, std::size_t bytes) override {
    CurrentDevice current(ordinal_);
    SPILL_CU_TRY(api_->mem_address_free(dp(addr), bytes));
  }
  PhysicalHandle do_create_physical(std::size_t bytes) override {
    CurrentDevice current(ordinal_);
    CUmemGenericAllocationHandle h = 0;
    SPILL_CU_TRY(api_->mem_create(&h, bytes, &prop_, 0));
    return static_cast<PhysicalHandle>(h);
  }
  void do_release_physical(PhysicalHandle handle, std::size_t) override {
    CurrentDevice current(ordinal_);
    SPILL_CU_TRY(api_->mem_release(static_cast<CUmemGenericAllocationHandle>(handle)));
  }
  void do_map(void* addr, std::size_t bytes, PhysicalHandle handle) override {
    CurrentDevice current(ordinal_);
    SPILL_CU_TRY(api_->mem_map(dp(addr), bytes, 0, handle, 0));
    CUmemAccessDesc access{};
    access.location = prop_.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CUresult res = api_->mem_set_access(dp(addr), bytes, &access, 1);
    if (res != CUDA_SUCCESS) {
      api_->mem_unmap(dp(addr), bytes);
      SPILL_CU_TRY(res);
    }
  }
  void do_unmap(void* addr, std::size_t bytes) override {
    CurrentDevice current(ordinal_);
    SPILL_CU_TRY(api_->mem_unmap(dp(addr), bytes));
  }
  void* do_allocate(std::size_t bytes) override {
    CurrentDevice current(ordinal_);
    void* p = nullptr;
    SPILL_CUDA_TRY(cudaMalloc(&p, bytes));
    return p;
  }
  void do_deallocate(void* ptr) override {
    CurrentDevice current(ordinal_);
    SPILL_CUDA_TRY(cudaFree(ptr));
  }
  void* do_allocate_host(std::size_t bytes) override {
    CurrentDevice current(ordinal_);
    void* p = nullptr;
    pin_or_throw(cudaHostAlloc(&p, bytes, cudaHostAllocPortable), "cudaHostAlloc", bytes);
    return p;
  }
  void do_free_host(void* ptr) override {
    CurrentDevice current(ordinal_);
    SPILL_CUDA_TRY(cudaFreeHost(ptr));
  }
  void do_register_host(void* ptr, std::size_t bytes) override {
    CurrentDevice current(ordinal_);
    pin_or_throw(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable), "cudaHostRegister",
                 bytes);
  }
  void do_unregister_host(void* ptr) override {
    CurrentDevice current(ordinal_);
    SPILL_CUDA_TRY(cudaHostUnregister(ptr));
  }
  Stream do_create_stream() override {
    CurrentDevice current(ordinal_);
    cudaStream_t s = nullptr;
    SPILL_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return reinterpret_cast<Stream>(s);
  }
  void do_destroy_stream(Stream stream) override {
    SPILL_CUDA_TRY(cudaStreamSynchronize(cs(stream)));
    SPILL_CUDA_TRY(cudaStreamDestroy(cs(stream)));
  }
  // The default stream (nullptr) is the *current* device's: those calls make this device
  // current first (a stream handle of this device carries its context with it).
  void do_synchronize_stream(Stream stream) override {
    std::optional<CurrentDevice> current;
    if (stream == nullptr) current.emplace(ordinal_);
    SPILL_CUDA_TRY(cudaStreamSynchronize(cs(stream)));
  }
  Event do_create_event(bool timing) override {
    CurrentDevice current(ordinal_);
    cudaEvent_t e = nullptr;
    SPILL_CUDA_TRY(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming));
    return reinterpret_cast<Event>(e);
  }
  void do_destroy_event(Event event) override { SPILL_CUDA_TRY(cudaEventDestroy(ce(event))); }
  void do_record(Event event, Stream stream) override {
    std::optional<CurrentDevice> current;
    if (stream == nullptr) current.emplace(ordinal_);
    SPILL_CUDA_TRY(cudaEventRecord(ce(event), cs(stream)));
  }
  void do_wait(Stream stream, Event event) override {
    std::optional<CurrentDevice> current;
    if (stream == nullptr) current.emplace(ordinal_);
    SPILL_CUDA_TRY(cudaStreamWaitEvent(cs(stream), ce(event), 0));
  }
  bool do_query(Event event) override { return event_done(ce(event)); }
  void do_synchronize_event(Event event) override {
    SPILL_CUDA_TRY(cudaEventSynchronize(ce(event)));
  }
  float do_elapsed_ms(Event start, Event end) override {
    float ms = 0;
    SPILL_CUDA_TRY(cudaEventElapsedTime(&ms, ce(start), ce(end)));
    return ms;
  }
  void do_copy_async(void* dst, const void* src, std::size_t bytes, CopyKind kind,
                     Stream stream) override {
    CurrentDevice current(ordinal_);
    cudaMemcpyKind k = kind == CopyKind::HostToDevice   ? cudaMemcpyHostToDevice
                       : kind == CopyKind::DeviceToHost ? cudaMemcpyDeviceToHost
                                                        : cudaMemcpyDeviceToDevice;
    SPILL_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, k, cs(stream)));
  }
  void do_fill_async(void* dst, std::uint8_t value, std::size_t bytes, Stream stream) override {
    CurrentDevice current(ordinal_);
    SPILL_CUDA_TRY(cudaMemsetAsync(dst, value, bytes, cs(stream)));
  }
  void do_host_callback(Stream stream, std::function<void()> fn) override {
    CurrentDevice current(ordinal_);
    auto* boxed = new std::function<void()>(std::move(fn));
    cudaError_t err = cudaLaunchHostFunc(cs(stream), host_trampoline, boxed);
    if (err != cudaSuccess) delete boxed;
    SPILL_CUDA_TRY(err);
  }
  void do_synchronize_device() override {
    CurrentDevice current(ordinal_);
    SPILL_CUDA_TRY(cudaDeviceSynchronize());
  }
  // Holds use slots in one mapped pinned array: a slot is free again once the event recorded
  // after its spin kernel has completed.
  HoldToken do_hold(Stream stream) override {
    CurrentDevice current(ordinal_);
    std::lock_guard lock(holds_mu_);
    if (flags_ == nullptr) {
      SPILL_CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&flags_), kHoldSlots * sizeof(int), cudaHostAllocMapped));
      SPILL_CUDA_TRY(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_flags_), flags_, 0));
      for (int i = 0; i < kHoldSlots; ++i) {
        flags_[i] = 1;
        SPILL_CUDA_TRY(cudaEventCreateWithFlags(&slot_done_[i], cudaEventDisableTiming));
      }
    }
    for (int i = 0; i < kHoldSlots; ++i) {
      if (slot_busy_[i] || !event_done(slot_done_[i])) continue;
      *const_cast<volatile int*>(&flags_[i]) = 0;
      detail::launch_spin(device_flags_ + i, cs(stream), 30ull * 1000 * 1000 * 1000);
      SPILL_CUDA_TRY(cudaEventRecord(slot_done_[i], cs(stream)));
      slot_busy_[i] = true;
      return static_cast<HoldToken>(i) + 1;
    }
    throw InvalidArgument("hold: more than " + std::to_string(kHoldSlots) +
                          " stream holds at once");
  }
  void do_release(HoldToken token) override {
    std::lock_guard lock(holds_mu_);
    SPILL_EXPECTS(token >= 1 && token <= kHoldSlots && slot_busy_[token - 1],
                  "release: " + std::to_string(token) + " is not a hold");
    *const_cast<volatile int*>(&flags_[token - 1]) = 1;
    slot_busy_[token - 1] = false;
  }

 public:
  ~CudaDevice() override {
    if (flags_ == nullptr) return;
    for (int i = 0; i < kHoldSlots; ++i) *const_cast<volatile int*>(&flags_[i]) = 1;
    int previous = ordinal_;  // not CurrentDevice: a destructor must not throw
    cudaGetDevice(&previous);
    cudaSetDevice(ordinal_);
    cudaDeviceSynchronize();
    for (int i = 0; i < kHoldSlots; ++i) cudaEventDestroy(slot_done_[i]);
    cudaFreeHost(flags_);
    cudaSetDevice(previous);
  }

 private:
  static constexpr int kHoldSlots = 64;
  std::mutex holds_mu_;
  int* flags_ = nullptr;
  int* device_flags_ = nullptr;
  cudaEvent_t slot_done_[kHoldSlots] = {};
  bool slot_busy_[kHoldSlots] = {};
};

}  // namespace

bool cuda_available(int ordinal, std::string* reason) {
  auto fail = [&](const std::string& why) {
    if (reason) *reason = why;
    return false;
  };
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return fail(std::string("no usable CUDA driver or GPU (") + cudaGetErrorName(err) + ": " +
                cudaGetErrorString(err) + ")");
  }
  if (count == 0) return fail("no CUDA GPU found");
  if (ordinal < 0 || ordinal >= count) {
    return fail("GPU " + std::to_string(ordinal) + " does not exist (" + std::to_string(count) +
                " found)");
  }
  int vmm = 0;
  try {
    const DriverApi& api = driver_api();
    CUdevice dev = 0;
    if (api.device_get(&dev, ordinal) != CUDA_SUCCESS ||
        api.device_get_attribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
                                 dev) != CUDA_SUCCESS)
      vmm = 0;
  } catch (const CudaError& e) {
    return fail(e.what());
  }
  if (vmm == 0)
    return fail("GPU " + std::to_string(ordinal) + " does not support virtual memory management");
  if (reason) reason->clear();
  return true;
}

std::unique_ptr<Device> make_cuda_device(int ordinal) {
  std::string why;
  if (!cuda_available(ordinal, &why)) throw CudaError(why, 100);
  return std::make_unique<CudaDevice>(ordinal);
}

}  // namespace spill

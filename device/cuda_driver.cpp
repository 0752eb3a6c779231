#include "device/cuda_driver.hpp"

#include <cuda_runtime_api.h>

#include <string>

#include "core/errors.hpp"
#include "device/cuda_check.hpp"

namespace spill {
namespace {

// The driver ABI version we ask for: VMM has been stable since 10.2; 12.0 is our floor.
constexpr unsigned kDriverVersion = 12000;

template <class F>
void load(F& fn, const char* symbol) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult status{};
  cudaError_t err =
      cudaGetDriverEntryPointByVersion(symbol, &p, kDriverVersion, cudaEnableDefault, &status);
  if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || p == nullptr) {
    throw CudaError(std::string("driver entry point ") + symbol + " is not available (" +
                        cudaGetErrorName(err) + ", query status " +
                        std::to_string(static_cast<int>(status)) + ")",
                    static_cast<int>(err));
  }
  fn = reinterpret_cast<F>(p);
}

DriverApi load_all() {
  DriverApi api{};
  load(api.mem_address_reserve, "cuMemAddressReserve");
  load(api.mem_address_free, "cuMemAddressFree");
  load(api.mem_create, "cuMemCreate");
  load(api.mem_release, "cuMemRelease");
  load(api.mem_map, "cuMemMap");
  load(api.mem_unmap, "cuMemUnmap");
  load(api.mem_set_access, "cuMemSetAccess");
  load(api.mem_get_allocation_granularity, "cuMemGetAllocationGranularity");
  load(api.get_error_name, "cuGetErrorName");
  load(api.device_get, "cuDeviceGet");
  load(api.device_get_attribute, "cuDeviceGetAttribute");
  return api;
}

}  // namespace

const DriverApi& driver_api() {
  static const DriverApi api = load_all();
  return api;
}

namespace detail {

void throw_cuda(cudaError_t err, const char* call, const char* file, int line) {
  // Clear a non-sticky error so that a later cudaGetLastError (after a kernel launch) does not
  // report this one again; sticky errors stay whatever we do.
  cudaGetLastError();
  std::string msg = std::string(call) + " failed: " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ") [" + where(file, line) + "]";
  if (err == cudaErrorMemoryAllocation) throw OutOfMemory(msg);
  throw CudaError(msg, static_cast<int>(err));
}

void throw_cu(CUresult err, const char* call, const char* file, int line) {
  const char* name = nullptr;
  if (driver_api().get_error_name(err, &name) != CUDA_SUCCESS || name == nullptr)
    name = "CUDA_ERROR_UNKNOWN";
  std::string msg = std::string(call) + " failed: " + name + " [" + where(file, line) + "]";
  if (err == CUDA_ERROR_OUT_OF_MEMORY) throw OutOfMemory(msg);
  throw CudaError(msg, static_cast<int>(err));
}

}  // namespace detail
}  // namespace spill

#include "device/cuda_driver.hpp"

#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <string>
#include <type_traits>

#include "core/errors.hpp"
#include "device/cuda_check.hpp"

namespace spill {
namespace {

// The driver ABI version we ask for: VMM has been stable since 10.2; 12.0 is our floor.
constexpr unsigned kDriverVersion = 12000;

// The pointers' types are the toolkit's own for the versions kDriverVersion gets (the newest
// version of each function up to 12.0): a signature that drifts from cuda.h fails to compile.
static_assert(std::is_same_v<decltype(DriverApi::mem_address_reserve), PFN_cuMemAddressReserve_v10020>);
static_assert(std::is_same_v<decltype(DriverApi::mem_address_free), PFN_cuMemAddressFree_v10020>);
static_assert(std::is_same_v<decltype(DriverApi::mem_create), PFN_cuMemCreate_v10020>);
static_assert(std::is_same_v<decltype(DriverApi::mem_release), PFN_cuMemRelease_v10020>);
static_assert(std::is_same_v<decltype(DriverApi::mem_map), PFN_cuMemMap_v10020>);
static_assert(std::is_same_v<decltype(DriverApi::mem_unmap), PFN_cuMemUnmap_v10020>);
static_assert(std::is_same_v<decltype(DriverApi::mem_set_access), PFN_cuMemSetAccess_v10020>);
static_assert(std::is_same_v<decltype(DriverApi::mem_get_allocation_granularity),
                             PFN_cuMemGetAllocationGranularity_v10020>);
static_assert(std::is_same_v<decltype(DriverApi::get_error_name), PFN_cuGetErrorName_v6000>);
static_assert(std::is_same_v<decltype(DriverApi::device_get), PFN_cuDeviceGet_v2000>);
static_assert(std::is_same_v<decltype(DriverApi::device_get_attribute), PFN_cuDeviceGetAttribute_v2000>);

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

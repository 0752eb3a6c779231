#include "device/device.hpp"

#include <chrono>
#include <type_traits>

#include "core/clock.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"

namespace spill {
namespace {

void expect_granular(const Device& d, std::size_t bytes, const char* op) {
  SPILL_EXPECTS(bytes > 0, std::string(op) + ": size must be above zero");
  SPILL_EXPECTS(bytes % d.granularity() == 0,
                std::string(op) + ": size " + std::to_string(bytes) +
                    " is not a multiple of the granularity " + format_bytes(d.granularity()));
}

void expect_aligned(const Device& d, const void* addr, const char* op) {
  SPILL_EXPECTS(addr != nullptr, std::string(op) + ": address is null");
  SPILL_EXPECTS(reinterpret_cast<std::uintptr_t>(addr) % d.granularity() == 0,
                std::string(op) + ": address " + format_address(addr) + " is not aligned to the granularity " +
                    format_bytes(d.granularity()));
}

// The calling thread's CPU time in virtual-memory calls (Device::thread_vmm_cpu_s).
thread_local std::uint64_t t_vmm_cpu_ns = 0;

// The device whose host callback the calling thread is running (SimDevice sets it).
thread_local const Device* t_in_callback_of = nullptr;

// CUDA's rule for host functions (cudaLaunchHostFunc): "must not make any CUDA API calls"
// (cudaErrorNotPermitted, or a deadlock). SimDevice runs callbacks inside a
// HostCallbackScope, so a call into the same device from one is refused there too; the error
// becomes the stream's sticky error, as a failed callback's would.
void expect_outside_callback(const Device& d, const char* op) {
  SPILL_EXPECTS(t_in_callback_of != &d,
                std::string(op) + ": called from a host callback of this device; a host "
                "function must not call CUDA (cudaLaunchHostFunc's rule)");
}

}  // namespace

Device::HostCallbackScope::HostCallbackScope(const Device* device) : previous_(t_in_callback_of) {
  t_in_callback_of = device;
}

Device::HostCallbackScope::~HostCallbackScope() { t_in_callback_of = previous_; }

const char* to_string(Backend b) { return b == Backend::Cuda ? "cuda" : "sim"; }

const char* to_string(CopyKind k) {
  switch (k) {
    case CopyKind::HostToDevice: return "h2d";
    case CopyKind::DeviceToHost: return "d2h";
    case CopyKind::DeviceToDevice: return "d2d";
  }
  return "?";
}

// Runs one virtual-memory call and, when it returns, counts it with the host's time in it.
template <class F>
decltype(auto) Device::tallied(Vmm kind, F&& call) {
  const auto start = std::chrono::steady_clock::now();
  const std::uint64_t cpu_start = thread_cpu_ns();
  auto count = [&] {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now() - start);
    t_vmm_cpu_ns += thread_cpu_ns() - cpu_start;
    vmm_calls_[kind].fetch_add(1, std::memory_order_relaxed);
    vmm_ns_[kind].fetch_add(static_cast<std::uint64_t>(ns.count()), std::memory_order_relaxed);
  };
  if constexpr (std::is_void_v<decltype(call())>) {
    call();
    count();
  } else {
    auto result = call();
    count();
    return result;
  }
}

void* Device::reserve(std::size_t bytes) {
  expect_outside_callback(*this, "reserve");
  expect_granular(*this, bytes, "reserve");
  return tallied(kReserve, [&] { return do_reserve(bytes); });
}

void Device::unreserve(void* addr, std::size_t bytes) {
  expect_outside_callback(*this, "unreserve");
  expect_aligned(*this, addr, "unreserve");
  expect_granular(*this, bytes, "unreserve");
  tallied(kUnreserve, [&] { do_unreserve(addr, bytes); });
}

PhysicalHandle Device::create_physical(std::size_t bytes) {
  expect_outside_callback(*this, "create_physical");
  expect_granular(*this, bytes, "create_physical");
  return tallied(kCreate, [&] { return do_create_physical(bytes); });
}

void Device::release_physical(PhysicalHandle handle, std::size_t bytes) {
  expect_outside_callback(*this, "release_physical");
  expect_granular(*this, bytes, "release_physical");
  tallied(kRelease, [&] { do_release_physical(handle, bytes); });
}

void Device::map(void* addr, std::size_t bytes, PhysicalHandle handle) {
  expect_outside_callback(*this, "map");
  expect_aligned(*this, addr, "map");
  expect_granular(*this, bytes, "map");
  tallied(kMap, [&] { do_map(addr, bytes, handle); });
}

void Device::unmap(void* addr, std::size_t bytes) {
  expect_outside_callback(*this, "unmap");
  expect_aligned(*this, addr, "unmap");
  expect_granular(*this, bytes, "unmap");
  tallied(kUnmap, [&] { do_unmap(addr, bytes); });
}

double Device::thread_vmm_cpu_s() { return double(t_vmm_cpu_ns) * 1e-9; }

VmmCalls Device::vmm_calls() const {
  VmmCalls v;
  VmmCalls::Tally* out[kVmmKinds] = {&v.reserve, &v.create,  &v.map,
                                     &v.unmap,   &v.release, &v.unreserve};
  for (int k = 0; k < kVmmKinds; ++k) {
    out[k]->calls = vmm_calls_[k].load(std::memory_order_relaxed);
    out[k]->seconds = double(vmm_ns_[k].load(std::memory_order_relaxed)) * 1e-9;
  }
  return v;
}

VmmCalls VmmCalls::operator-(const VmmCalls& earlier) const {
  auto less = [](Tally a, Tally b) { return Tally{a.calls - b.calls, a.seconds - b.seconds}; };
  return {less(reserve, earlier.reserve), less(create, earlier.create), less(map, earlier.map),
          less(unmap, earlier.unmap),     less(release, earlier.release),
          less(unreserve, earlier.unreserve)};
}

double VmmCalls::seconds() const {
  return reserve.seconds + create.seconds + map.seconds + unmap.seconds + release.seconds +
         unreserve.seconds;
}

void* Device::allocate(std::size_t bytes) {
  expect_outside_callback(*this, "allocate");
  SPILL_EXPECTS(bytes > 0, "allocate: size must be above zero");
  return do_allocate(bytes);
}

void Device::deallocate(void* ptr) {
  expect_outside_callback(*this, "deallocate");
  if (ptr != nullptr) do_deallocate(ptr);
}

void* Device::allocate_host(std::size_t bytes) {
  expect_outside_callback(*this, "allocate_host");
  SPILL_EXPECTS(bytes > 0, "allocate_host: size must be above zero");
  return do_allocate_host(bytes);
}

void Device::free_host(void* ptr) {
  expect_outside_callback(*this, "free_host");
  if (ptr != nullptr) do_free_host(ptr);
}

void Device::register_host(void* ptr, std::size_t bytes) {
  expect_outside_callback(*this, "register_host");
  SPILL_EXPECTS(ptr != nullptr, "register_host: pointer is null");
  SPILL_EXPECTS(bytes > 0, "register_host: size must be above zero");
  do_register_host(ptr, bytes);
}

void Device::unregister_host(void* ptr) {
  expect_outside_callback(*this, "unregister_host");
  SPILL_EXPECTS(ptr != nullptr, "unregister_host: pointer is null");
  do_unregister_host(ptr);
}

Stream Device::create_stream() {
  expect_outside_callback(*this, "create_stream");
  return do_create_stream();
}

void Device::destroy_stream(Stream stream) {
  expect_outside_callback(*this, "destroy_stream");
  SPILL_EXPECTS(stream != nullptr, "destroy_stream: the default stream cannot be destroyed");
  do_destroy_stream(stream);
}

void Device::synchronize(Stream stream) {
  expect_outside_callback(*this, "synchronize");
  do_synchronize_stream(stream);
}

Event Device::create_event(bool timing) {
  expect_outside_callback(*this, "create_event");
  return do_create_event(timing);
}

void Device::destroy_event(Event event) {
  expect_outside_callback(*this, "destroy_event");
  if (event != nullptr) do_destroy_event(event);
}

void Device::record(Event event, Stream stream) {
  expect_outside_callback(*this, "record");
  SPILL_EXPECTS(event != nullptr, "record: event is null");
  do_record(event, stream);
}

void Device::wait(Stream stream, Event event) {
  expect_outside_callback(*this, "wait");
  SPILL_EXPECTS(event != nullptr, "wait: event is null");
  do_wait(stream, event);
}

bool Device::query(Event event) {
  expect_outside_callback(*this, "query");
  SPILL_EXPECTS(event != nullptr, "query: event is null");
  return do_query(event);
}

void Device::synchronize(Event event) {
  expect_outside_callback(*this, "synchronize");
  SPILL_EXPECTS(event != nullptr, "synchronize: event is null");
  do_synchronize_event(event);
}

float Device::elapsed_ms(Event start, Event end) {
  expect_outside_callback(*this, "elapsed_ms");
  SPILL_EXPECTS(start != nullptr && end != nullptr, "elapsed_ms: event is null");
  return do_elapsed_ms(start, end);
}

void Device::copy_async(void* dst, const void* src, std::size_t bytes, CopyKind kind,
                        Stream stream) {
  expect_outside_callback(*this, "copy_async");
  if (bytes == 0) return;
  SPILL_EXPECTS(dst != nullptr && src != nullptr,
                std::string("copy_async(") + to_string(kind) + "): " +
                    (dst == nullptr ? "destination" : "source") + " is null");
  do_copy_async(dst, src, bytes, kind, stream);
}

void Device::fill_async(void* dst, std::uint8_t value, std::size_t bytes, Stream stream) {
  expect_outside_callback(*this, "fill_async");
  if (bytes == 0) return;
  SPILL_EXPECTS(dst != nullptr, "fill_async: destination is null");
  do_fill_async(dst, value, bytes, stream);
}

void Device::host_callback(Stream stream, std::function<void()> fn) {
  expect_outside_callback(*this, "host_callback");
  SPILL_EXPECTS(static_cast<bool>(fn), "host_callback: empty function");
  do_host_callback(stream, std::move(fn));
}

void Device::synchronize() {
  expect_outside_callback(*this, "synchronize");
  do_synchronize_device();
}

HoldToken Device::hold(Stream stream) {
  expect_outside_callback(*this, "hold");
  return do_hold(stream);
}

void Device::release(HoldToken token) {
  expect_outside_callback(*this, "release");
  do_release(token);
}

}  // namespace spill

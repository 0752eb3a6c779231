// The seam between spill and the hardware: exactly what the layers above need from a GPU.
// Two backends implement it: CudaDevice (the CUDA runtime plus the driver's VMM entry points)
// and SimDevice (a simulated GPU in host memory). All methods are thread-safe.
//
// Stream semantics follow CUDA's: work on one stream runs in order; work on different streams
// is unordered unless joined with record(event, s1) + wait(s2, event); wait() binds to the
// event's most recent record() at the time of the call; query() of a never-recorded event is
// true. Copies and fills are asynchronous: the caller must keep host buffers alive and
// unchanged until the stream has passed the copy. Errors from asynchronous work (e.g. touching
// unmapped memory) are sticky and are thrown by the next synchronize/query as CudaError.
// The default stream (nullptr) is an ordinary in-order stream; spill never relies on CUDA's
// legacy implicit synchronisation with other streams.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace spill {

struct StreamImpl;
struct EventImpl;
using Stream = StreamImpl*;   // a cudaStream_t on CudaDevice (reinterpret_cast either way)
using Event = EventImpl*;     // a cudaEvent_t on CudaDevice
using PhysicalHandle = std::uint64_t;  // CUmemGenericAllocationHandle on CudaDevice
using HoldToken = std::uint64_t;       // a stream hold (see Device::hold)

enum class Backend { Cuda, Sim };
enum class CopyKind { HostToDevice, DeviceToHost, DeviceToDevice };

const char* to_string(Backend b);
const char* to_string(CopyKind k);

struct DeviceInfo {
  Backend backend = Backend::Sim;
  std::string name;                 // e.g. "NVIDIA H100 80GB HBM3" or "SimDevice"
  int ordinal = 0;
  std::size_t total_bytes = 0;
  std::size_t granularity = 0;      // VMM mapping granularity
  int cc_major = 0, cc_minor = 0;   // compute capability (0.0 on SimDevice)
  std::string link_name;            // preset key or detected link, e.g. "pcie5"
  std::string link_description;     // e.g. "PCIe 5.0 x16"
  double link_nominal_gbps = 0;     // spec bandwidth per direction, GB/s
  double h2d_gbps = 0, d2h_gbps = 0;  // modelled (SimDevice) or nominal estimate (CudaDevice)
  bool simulated = true;
};

// The host's time in the virtual-memory calls (the driver's cuMem* on CUDA), per kind, since the
// device was made: what a step's maps and unmaps cost the host (`spill train --json`'s "vmm").
struct VmmCalls {
  struct Tally {
    std::uint64_t calls = 0;
    double seconds = 0;
  };
  Tally reserve, create, map, unmap, release, unreserve;
  VmmCalls operator-(const VmmCalls& earlier) const;  // the calls made since `earlier`
  double seconds() const;                             // of all kinds
};

struct MemInfo {
  std::size_t total = 0;
  std::size_t free = 0;
};

class Device {
 public:
  virtual ~Device() = default;
  Device() = default;
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  const DeviceInfo& info() const { return info_; }
  std::size_t granularity() const { return info_.granularity; }
  MemInfo mem_info() { return do_mem_info(); }

  // ---- Virtual memory. Sizes and addresses are multiples of granularity().
  // Reserves an address range with nothing behind it; touching it faults until map().
  void* reserve(std::size_t bytes);
  // Frees a reserved range; every mapping inside must have been unmapped.
  void unreserve(void* addr, std::size_t bytes);
  // Creates physical device memory; throws OutOfMemory when the device has no room.
  PhysicalHandle create_physical(std::size_t bytes);
  // Releases physical memory; it must no longer be mapped anywhere.
  void release_physical(PhysicalHandle handle, std::size_t bytes);
  // Maps a whole physical chunk at `addr` (inside a reservation) with read/write access.
  // Contents of a fresh chunk are undefined; a chunk keeps its contents across map/unmap.
  void map(void* addr, std::size_t bytes, PhysicalHandle handle);
  // Unmaps one mapping, whole, as map() made it (CUDA's cuMemUnmap takes whole mappings: a
  // range of several is unmapped chunk by chunk); the range faults again. The caller must have
  // synchronised all work touching it.
  void unmap(void* addr, std::size_t bytes);
  // The virtual-memory calls above made so far (successful ones), with the host's time in them.
  VmmCalls vmm_calls() const;
  // The calling thread's CPU time in successful virtual-memory calls of any device since the
  // thread began: the part of a caller's own CPU time that went to maps and unmaps (on
  // SimDevice this machine's mmap and page-table work, on CUDA the driver's).
  static double thread_vmm_cpu_s();

  // ---- Plain device memory (non-swappable pools). Throws OutOfMemory when full.
  void* allocate(std::size_t bytes);
  void deallocate(void* ptr);

  // ---- Pinned host memory.
  void* allocate_host(std::size_t bytes);
  void free_host(void* ptr);
  void register_host(void* ptr, std::size_t bytes);
  void unregister_host(void* ptr);

  // ---- Streams and events.
  Stream create_stream();
  void destroy_stream(Stream stream);  // waits for its work first
  void synchronize(Stream stream);
  Event create_event(bool timing = false);
  void destroy_event(Event event);
  void record(Event event, Stream stream);
  void wait(Stream stream, Event event);
  bool query(Event event);
  void synchronize(Event event);
  // Milliseconds between two completed timing events (simulated time on SimDevice).
  float elapsed_ms(Event start, Event end);

  // ---- Asynchronous work on a stream.
  void copy_async(void* dst, const void* src, std::size_t bytes, CopyKind kind, Stream stream);
  void fill_async(void* dst, std::uint8_t value, std::size_t bytes, Stream stream);
  // Runs `fn` on a host thread once preceding work on `stream` is done; later work on the
  // stream waits for it. `fn` must not call this Device (CUDA's rule for host functions;
  // SimDevice refuses such a call, which becomes the stream's sticky error).
  void host_callback(Stream stream, std::function<void()> fn);
  // Waits for all work on all streams.
  void synchronize();

  // Holds `stream`: work enqueued after this waits until release(token). Used to enqueue many
  // operations before any starts, so that timings exclude launch overhead (nvbandwidth's
  // method). A hold left unreleased for about 30 s lets go by itself rather than hang.
  // Enqueue only pinned-memory copies, fills and device copies behind a hold: on CUDA a copy
  // to or from pageable host memory may block the host until the stream runs it, and so may a
  // kernel's first launch in the process (lazy module loading can synchronise the context).
  HoldToken hold(Stream stream);
  void release(HoldToken token);

 protected:
  DeviceInfo info_;

  // A backend runs each host callback inside one: every call into this Device from the
  // callback's thread meanwhile is refused (InvalidArgument naming the call), as CUDA forbids
  // CUDA calls in a host function. SimDevice does; CUDA's own driver thread needs none.
  class HostCallbackScope {
   public:
    explicit HostCallbackScope(const Device* device);
    ~HostCallbackScope();
    HostCallbackScope(const HostCallbackScope&) = delete;
    HostCallbackScope& operator=(const HostCallbackScope&) = delete;

   private:
    const Device* previous_;
  };

  virtual MemInfo do_mem_info() = 0;
  virtual void* do_reserve(std::size_t bytes) = 0;
  virtual void do_unreserve(void* addr, std::size_t bytes) = 0;
  virtual PhysicalHandle do_create_physical(std::size_t bytes) = 0;
  virtual void do_release_physical(PhysicalHandle handle, std::size_t bytes) = 0;
  virtual void do_map(void* addr, std::size_t bytes, PhysicalHandle handle) = 0;
  virtual void do_unmap(void* addr, std::size_t bytes) = 0;
  virtual void* do_allocate(std::size_t bytes) = 0;
  virtual void do_deallocate(void* ptr) = 0;
  virtual void* do_allocate_host(std::size_t bytes) = 0;
  virtual void do_free_host(void* ptr) = 0;
  virtual void do_register_host(void* ptr, std::size_t bytes) = 0;
  virtual void do_unregister_host(void* ptr) = 0;
  virtual Stream do_create_stream() = 0;
  virtual void do_destroy_stream(Stream stream) = 0;
  virtual void do_synchronize_stream(Stream stream) = 0;
  virtual Event do_create_event(bool timing) = 0;
  virtual void do_destroy_event(Event event) = 0;
  virtual void do_record(Event event, Stream stream) = 0;
  virtual void do_wait(Stream stream, Event event) = 0;
  virtual bool do_query(Event event) = 0;
  virtual void do_synchronize_event(Event event) = 0;
  virtual float do_elapsed_ms(Event start, Event end) = 0;
  virtual void do_copy_async(void* dst, const void* src, std::size_t bytes, CopyKind kind,
                             Stream stream) = 0;
  virtual void do_fill_async(void* dst, std::uint8_t value, std::size_t bytes,
                             Stream stream) = 0;
  virtual void do_host_callback(Stream stream, std::function<void()> fn) = 0;
  virtual void do_synchronize_device() = 0;
  virtual HoldToken do_hold(Stream stream) = 0;
  virtual void do_release(HoldToken token) = 0;

 private:
  enum Vmm { kReserve, kCreate, kMap, kUnmap, kRelease, kUnreserve, kVmmKinds };
  template <class F>
  decltype(auto) tallied(Vmm kind, F&& call);
  std::array<std::atomic<std::uint64_t>, kVmmKinds> vmm_calls_{}, vmm_ns_{};
};

}  // namespace spill

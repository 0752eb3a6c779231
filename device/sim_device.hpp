// SimDevice: a simulated GPU in host memory, so that everything above device/ runs in CI.
// Reserved ranges are PROT_NONE mappings; physical chunks are memfd files mapped MAP_FIXED over
// them, so touching unmapped memory faults as an illegal address does on a GPU, and a chunk's
// bytes follow it wherever it is mapped. Each stream has a worker thread; H2D and D2H each have
// one serialised copy engine timed by a link model. Time is simulated: every stream carries a
// clock that copies and compute advance, so timings are the model's and deterministic; with
// time_scale > 0 work also takes that many wall seconds per simulated second. Chaos mode
// (seeded) adds random wall-clock delays to stream work and splits copies, so that missing
// synchronisation shows up as wrong data.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "core/link_model.hpp"
#include "device/device.hpp"
#include "device/host_memory.hpp"

namespace spill {

// In a SimDevice out-of-memory message when the process ran out of file descriptors (each
// physical allocation is a memfd): out-of-memory reports look for it to give the right advice.
inline constexpr const char* kSimOutOfDescriptors = "out of file descriptors";

struct Config;

struct SimOptions {
  std::size_t capacity = 8ull << 30;
  std::size_t granularity = 2ull << 20;
  LinkModel link = link_preset("pcie4");
  double d2d_gbps = 1500.0;   // device-memory copy bandwidth of the model
  double time_scale = 0.0;    // wall seconds per simulated second; 0 never sleeps
  // What query() answers for work its worker thread has finished. false: done, and the host's
  // simulated clock moves to the work's end (a poll is a wait, in wall-clock order: step times
  // then depend on how far the workers ran ahead). true: done only when it ended by the host's
  // simulated clock, which a query never moves (the host learns of later work by waiting for
  // it), so simulated times do not depend on the threads' scheduling.
  bool simulated_queries = false;
  std::optional<std::uint64_t> chaos_seed;
  double chaos_probability = 0.5;                 // chance that a task is delayed
  std::chrono::microseconds chaos_max_delay{1500};  // upper bound of one delay
  std::string name = "SimDevice";
  int ordinal = 0;  // the device ordinal it reports (config: gpu)
  // Where the host's memory and the cgroup limit are read (tests point it at a made-up tree).
  HostMemorySources host_memory;

  static SimOptions from_config(const Config& config);
};

class SimDevice final : public Device {
 public:
  // Throws InvalidArgument for a capacity above the host's RAM and swap, or the process's
  // cgroup memory limit when lower, less the capacity of the simulated devices already open in
  // the process (the simulated memory lives in host RAM), naming them, and for options out of
  // range.
  explicit SimDevice(SimOptions options = {});
  ~SimDevice() override;

  const SimOptions& options() const;

  // Enqueues simulated compute: advances the stream's clock by `sim_seconds`, then runs `work`
  // (CPU reference code standing in for a kernel; may be empty) on the stream's worker.
  void enqueue_compute(Stream stream, double sim_seconds, std::function<void()> work = {});

  // Fault injection for tests: the next `n` copy_async calls fail at enqueue with a CudaError,
  // as a CUDA copy that the runtime rejects does.
  void fail_next_copies(int n);

  // The simulated clock: the latest time any stream or copy engine has reached, in seconds.
  double sim_time_s() const;
  // The calling thread's simulated time in nanoseconds, for trace events: on a stream's worker
  // (callbacks, stream work) the stream's clock; on any other thread the host's simulated time
  // (the latest completion it has observed, or wall time / time_scale when that is later).
  std::uint64_t trace_now_ns() const;

  // Bytes of physical chunks plus plain allocations currently held (what capacity limits).
  std::size_t used_bytes() const;
  // Bytes currently mapped into reserved ranges.
  std::size_t mapped_bytes() const;
  // Number of live physical chunks, reservations, streams and events (leak checks in tests).
  struct Counts {
    std::size_t chunks, reservations, mappings, allocations, host_buffers, streams, events;
  };
  Counts counts() const;

 private:
  void forget_capacity();  // this device's capacity leaves the process's open devices' sum

  struct State;
  std::unique_ptr<State> s_;

  MemInfo do_mem_info() override;
  void* do_reserve(std::size_t bytes) override;
  void do_unreserve(void* addr, std::size_t bytes) override;
  PhysicalHandle do_create_physical(std::size_t bytes) override;
  void do_release_physical(PhysicalHandle handle, std::size_t bytes) override;
  void do_map(void* addr, std::size_t bytes, PhysicalHandle handle) override;
  void do_unmap(void* addr, std::size_t bytes) override;
  void* do_allocate(std::size_t bytes) override;
  void do_deallocate(void* ptr) override;
  void* do_allocate_host(std::size_t bytes) override;
  void do_free_host(void* ptr) override;
  void do_register_host(void* ptr, std::size_t bytes) override;
  void do_unregister_host(void* ptr) override;
  Stream do_create_stream() override;
  void do_destroy_stream(Stream stream) override;
  void do_synchronize_stream(Stream stream) override;
  Event do_create_event(bool timing) override;
  void do_destroy_event(Event event) override;
  void do_record(Event event, Stream stream) override;
  void do_wait(Stream stream, Event event) override;
  bool do_query(Event event) override;
  void do_synchronize_event(Event event) override;
  float do_elapsed_ms(Event start, Event end) override;
  void do_copy_async(void* dst, const void* src, std::size_t bytes, CopyKind kind,
                     Stream stream) override;
  void do_fill_async(void* dst, std::uint8_t value, std::size_t bytes, Stream stream) override;
  void do_host_callback(Stream stream, std::function<void()> fn) override;
  void do_synchronize_device() override;
  HoldToken do_hold(Stream stream) override;
  void do_release(HoldToken token) override;
};

}  // namespace spill

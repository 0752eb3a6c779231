// Internal state of SimDevice, shared by sim_device.cpp (memory) and sim_stream.cpp (work).
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>

#include "device/sim_device.hpp"

namespace spill {

// One queued piece of stream work. `always` tasks (event records) still run after a sticky
// error so that nobody waiting on them hangs.
struct SimTask {
  std::function<void()> fn;
  bool always = false;
  double issued = 0;  // simulated time the host enqueued it; the task starts no earlier
};

struct StreamImpl {
  std::uint64_t id = 0;
  std::mutex m;
  std::condition_variable cv;       // work arrived or stop
  std::condition_variable idle_cv;  // pending reached zero
  std::deque<SimTask> queue;
  std::size_t pending = 0;          // queued + running
  bool stop = false;
  std::atomic<double> clock{0.0};   // simulated seconds this stream has reached
  std::mt19937_64 rng;              // chaos delays; used by the worker only
  std::thread worker;
};

// The simulated completion times of an event's most recent generations, in a fixed ring:
// recording an event allocates nothing (the allocator records one at each large free, on its
// hot path).
class RecentTimes {
 public:
  void set(std::uint64_t gen, double t) {
    Slot& s = slots_[gen % kSlots];
    if (s.gen <= gen) s = {gen, t};  // never over a newer generation
  }
  // The time of `gen`, or null once newer generations have taken its place.
  const double* find(std::uint64_t gen) const {
    const Slot& s = slots_[gen % kSlots];
    return gen != 0 && s.gen == gen ? &s.t : nullptr;
  }

 private:
  static constexpr std::size_t kSlots = 64;
  struct Slot {
    std::uint64_t gen = 0;
    double t = 0;
  };
  std::array<Slot, kSlots> slots_{};
};

struct EventImpl {
  bool timing = false;
  std::mutex m;
  std::condition_variable cv;
  std::uint64_t recorded = 0;           // generation of the latest record()
  std::set<std::uint64_t> pending;      // recorded generations not yet reached by their stream
  RecentTimes done;                     // simulated completion time of recent generations
  double last_time = 0;
};

struct SimDevice::State {
  SimOptions opt;
  std::chrono::steady_clock::time_point epoch = std::chrono::steady_clock::now();

  // Address space and memory. Exclusive to change, shared while a copy touches memory.
  mutable std::shared_mutex vm;
  struct Mapping {
    std::size_t bytes;
    PhysicalHandle handle;
  };
  struct Chunk {
    int fd;
    std::size_t bytes;
    int mapped;
    // Backed in full by a copy into it (back_written): under `backing` while the chunk is
    // mapped, under `vm` held exclusively otherwise. Kept with a spare chunk.
    bool backed = false;
  };
  std::map<std::uintptr_t, std::size_t> reservations;
  std::map<std::uintptr_t, Mapping> mappings;
  std::unordered_map<PhysicalHandle, Chunk> chunks;
  PhysicalHandle next_handle = 1;
  // Released chunks kept for the next create of the same size (memfds by size), up to
  // kSpareLimit bytes: freeing a chunk's host pages and faulting in new ones costs the host
  // about a millisecond per 4 MiB here, which a swapping step would pay for every block it
  // moves. Spare bytes are host memory the simulated device does not count as used. At most
  // kSpareChunks files are kept (small granules would otherwise hold thousands of descriptors).
  static constexpr std::size_t kSpareLimit = 256ull << 20;
  static constexpr std::size_t kSpareChunks = 512;
  std::unordered_map<std::size_t, std::vector<Chunk>> spare;
  std::mutex backing;
  std::size_t spare_bytes = 0, spare_chunks = 0;
  std::map<std::uintptr_t, std::size_t> allocations;      // plain device memory
  std::map<std::uintptr_t, std::size_t> host_pinned;      // allocate_host
  std::map<std::uintptr_t, std::size_t> host_registered;  // register_host
  std::size_t used = 0;
  std::size_t mapped = 0;

  // Streams and events, owned here; handles are the raw pointers.
  mutable std::mutex reg_mu;
  std::unordered_map<StreamImpl*, std::shared_ptr<StreamImpl>> streams;
  std::unordered_map<EventImpl*, std::shared_ptr<EventImpl>> events;
  StreamImpl* default_stream = nullptr;
  std::uint64_t next_stream_id = 0;

  // Copy engines: one per direction, each serialised in simulated time.
  struct Engine {
    std::mutex m;
    double free_at = 0;
  };
  Engine h2d, d2h;
  std::atomic<double> clock_max{0.0};
  std::atomic<int> copies_to_fail{0};
  // The host's simulated clock: the latest completion it has observed (synchronize, query).
  // Work it enqueues afterwards cannot start before that, as on a real device.
  std::atomic<double> host_clock{0.0};

  // Stream holds: a gate the held stream's worker waits on.
  struct Gate {
    std::mutex m;
    std::condition_variable cv;
    bool open = false;
  };
  std::mutex hold_mu;
  std::unordered_map<HoldToken, std::shared_ptr<Gate>> holds;
  HoldToken next_hold = 1;

  // Sticky error from asynchronous work (CUDA's "illegal address").
  mutable std::mutex err_mu;
  std::string sticky;

  // ---- helpers (sim_device.cpp)
  bool is_device_address(const void* p) const;      // inside a reservation or allocation
  bool accessible(const void* p, std::size_t n) const;  // fully mapped or allocated
  // Before a copy writes [p, p + n) (vm held shared, the range accessible): backs each chunk
  // under it that is not backed yet, in 2 MiB pages where the kernel can (sim_device.cpp).
  void back_written(void* p, std::size_t n);
  bool is_pinned_host(const void* p) const;
  void set_sticky(const std::string& message);
  void throw_if_sticky() const;
  bool has_sticky() const;

  // ---- helpers (sim_stream.cpp)
  StreamImpl& stream(Stream s);
  std::shared_ptr<EventImpl> event(Event e);
  void enqueue(StreamImpl& s, SimTask task);
  void start_worker(StreamImpl& s);
  void stop_worker(StreamImpl& s);
  void wait_idle(StreamImpl& s);
  void chaos_delay(StreamImpl& s);
  double host_now_sim() const;
  void sleep_until_sim(double sim_seconds) const;
  void advance(StreamImpl& s, double end);
  void observe(double t);  // the host has seen work complete at simulated time t
};

}  // namespace spill

// The C API's internal state, shared by integrations/c/*.cpp: one slot per device ordinal
// holding its runtime, the lifecycle (session, shutdown, fork, process exit) and the
// translation of C++ exceptions into status codes with a thread-local message.
//
// Hot path without a global lock and without a locked instruction: a call takes a Lease on its
// device's slot by announcing the slot in its thread's own record (a hazard pointer: a plain
// store), then loading the slot's runtime pointer. spill_shutdown swaps the pointer out, runs
// membarrier(2) (every thread of the process passes a full memory barrier), then waits until
// no thread's record names the slot, and frees the runtime: either a call sees no runtime or
// the shutdown sees the call. Where membarrier is not available, the call uses a sequentially
// consistent fence instead. Slots and thread records are never freed (the Global object is
// leaked on purpose: calls during static destruction at exit must still find it).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include <pthread.h>

#include "core/config.hpp"
#include "spill/spill.h"
#include "swapper/runtime.hpp"

// Internal to libspill.so (no PLT indirection on the hot path); the API is spill.h's.
#pragma GCC visibility push(hidden)
namespace spill::capi {

inline constexpr int kMaxDevices = SPILL_MAX_DEVICES;
inline constexpr int kMaxSimStreams = 256;

// CUDA's special stream handles. cudaStreamLegacy (1) is the legacy default stream, which NULL
// already names here (libspill is built without per-thread default streams): it becomes NULL,
// so both spellings share one stream's blocks and NULL's device guard. cudaStreamPerThread (2)
// names the calling thread's own default stream, a different stream on every thread: spill
// keeps the streams a block was used on and records events on them later from whichever
// thread evicts or reuses the block, where that handle names the other thread's stream (a
// swap-out would not wait for the work on the block; a block freed on one thread's stream
// would be reused at once by another's). It is refused (stream_known), naming what to pass.
inline constexpr std::uintptr_t kStreamLegacy = 1, kStreamPerThread = 2;
inline Stream to_stream(void* s) {
  return reinterpret_cast<std::uintptr_t>(s) == kStreamLegacy ? nullptr : static_cast<Stream>(s);
}

// One device's runtime and what the C API keeps beside it.
struct DeviceState {
  DeviceState(Config config, int ordinal);

  const int ordinal;
  std::unique_ptr<Runtime> rt;
  bool simulated = false;
  // The entry point whose call created this runtime (a read such as spill_stats_json
  // included), for spill_init's refusal of another configuration.
  const char* started_by = "";

  // On the simulated device the only valid streams are those spill_stream_create made (and
  // the default stream's two spellings, so that a portable program runs there); on a GPU any
  // stream but cudaStreamPerThread (see to_stream).
  bool stream_known(void* s) const {
    if (s == nullptr || reinterpret_cast<std::uintptr_t>(s) == kStreamLegacy) return true;
    if (!simulated) return reinterpret_cast<std::uintptr_t>(s) != kStreamPerThread;
    const int n = n_streams.load(std::memory_order_acquire);
    for (int i = 0; i < n; ++i)
      if (streams[i].load(std::memory_order_relaxed) == s) return true;
    return false;
  }
  void add_stream(void* s);     // throws InvalidArgument when the table is full
  void remove_stream(void* s);

  void note_oom(const std::string& message);
  std::string last_oom() const;
  // The integration's sentence for out-of-memory messages (spill_set_oom_note); "" for none.
  void set_oom_note(std::string note);
  std::string oom_note() const;

  std::atomic<std::uint64_t> torch_free_errors{0};

 private:
  std::array<std::atomic<void*>, kMaxSimStreams> streams{};
  std::atomic<int> n_streams{0};
  mutable std::mutex mu_;  // stream registration, last_oom_, oom_note_
  std::string last_oom_;
  std::string oom_note_;
};

struct Slot {
  std::atomic<DeviceState*> state{nullptr};
};

// One thread's leases: the slots its calls in progress use (calls nest a little: an error
// path may ask the other devices). Linked into Global::threads once, reused after the thread
// ends. A record has one owning thread at a time: it is handed back only after the thread's
// last C++ thread_local destructor ran (see register_thread), and a thread that calls spill
// after that registers again, so `depth` and `held` are never written by two threads.
struct ThreadLeases {
  static constexpr int kDepth = 4;
  std::array<std::atomic<Slot*>, kDepth> held{};
  int depth = 0;                   // touched by the owning thread only
  std::atomic<bool> in_use{true};
  ThreadLeases* next = nullptr;
};

struct Global {
  Global();
  std::mutex mu;  // lifecycle: init, shutdown, creating runtimes; never held by a hot path
  std::array<Slot, kMaxDevices> slots;
  std::optional<Config> config;  // from spill_init or SPILL_CONF at the first runtime
  bool shut_down = false;
  bool shut_down_freed = false;     // that shutdown retired a running device
  bool started = false;                // a runtime was created in this process
  std::atomic<int> only_device{-1};    // the ordinal when exactly one runtime is alive
  std::atomic<bool> forked{false};     // this process is a fork of one where spill started
  std::atomic<bool> exiting{false};    // exit() has begun: nothing is freed any more
  int start_pid = 0, child_pid = 0;
  bool atexit_registered = false;
  std::atomic<ThreadLeases*> threads{nullptr};  // every thread that ever took a lease
  bool membarrier = false;                       // the heavy side of the fence pair works
  // Hands a thread's record back when the thread ends (its destructor runs after every C++
  // thread_local destructor); without it (no key left) records are never reused.
  pthread_key_t thread_key{};
  bool has_thread_key = false;
};

inline Global& global() {
  static Global* const g = new Global();  // never destroyed: calls may come during exit
  return *g;
}

// The calling thread's lease record (registered on first use, and again after the thread's
// record was handed back at its end: a later destructor of the thread calling spill).
ThreadLeases& register_thread();
extern thread_local ThreadLeases* tl_leases;  // constant-initialised: no TLS wrapper
inline ThreadLeases& thread_leases() {
  ThreadLeases* t = tl_leases;
  return t != nullptr ? *t : register_thread();
}
// Frees the runtime of `slot` once no call uses it (lifecycle mutex held).
void retire_slot(Slot& slot);

const char* last_error_text() noexcept;
// Sets the calling thread's message; returns `code`.
spill_status fail(spill_status code, const std::string& message) noexcept;
// Translates the exception being handled into a code and a message prefixed with `context`.
spill_status current_error(const std::string& context) noexcept;
// SPILL_ERROR_FORKED_CHILD with the message for `fn`.
spill_status forked_error(const char* fn) noexcept;
spill_status bad_stream(const char* fn, void* stream, int device) noexcept;

// A device's runtime held for the duration of one call.
class Lease {
 public:
  Lease() = default;
  ~Lease() { reset(); }
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;

  bool try_take(Slot& slot) {
    ThreadLeases& t = thread_leases();
    const int i = t.depth;
    if (i >= ThreadLeases::kDepth) return false;  // never nested this deep
    t.held[i].store(&slot, std::memory_order_relaxed);
    // Orders the announcement before the load (see the top comment).
    if (global().membarrier) std::atomic_signal_fence(std::memory_order_seq_cst);
    else std::atomic_thread_fence(std::memory_order_seq_cst);
    DeviceState* st = slot.state.load(std::memory_order_acquire);
    if (st == nullptr) {
      t.held[i].store(nullptr, std::memory_order_release);
      return false;
    }
    t.depth = i + 1;
    leases_ = &t;
    index_ = i;
    state_ = st;
    return true;
  }
  void reset() {
    if (leases_ != nullptr) {
      leases_->held[index_].store(nullptr, std::memory_order_release);
      leases_->depth = index_;
    }
    leases_ = nullptr;
    state_ = nullptr;
  }
  DeviceState* operator->() const { return state_; }
  DeviceState& operator*() const { return *state_; }
  Runtime& rt() const { return *state_->rt; }

 private:
  ThreadLeases* leases_ = nullptr;
  int index_ = 0;
  DeviceState* state_ = nullptr;
};

// The calling thread already holds as many leases as nest (a bug in spill: its own calls nest
// at most a level or two); acquire refuses rather than take the slot for one without a runtime.
inline bool lease_stack_full() { return thread_leases().depth >= ThreadLeases::kDepth; }
spill_status nested_too_deep(const char* fn) noexcept;

// The slow path of acquire: creates the runtime (when `create`) or says why there is none.
spill_status acquire_slow(int device, const char* fn, Lease& lease, bool create,
                          bool* no_runtime) noexcept;

// Leases `device`'s runtime; with `create`, makes it on first use. On failure the message is
// set and the code returned; but where `no_runtime` is given and the only failure is that a
// valid device has no runtime (without `create`), *no_runtime is set and nothing is reported
// (the caller decides what that means: an unpin's token is then stale).
inline spill_status acquire(int device, const char* fn, Lease& lease, bool create = true,
                            bool* no_runtime = nullptr) noexcept {
  Global& g = global();
  if (g.forked.load(std::memory_order_relaxed)) return forked_error(fn);
  if (device >= 0 && device < kMaxDevices && lease.try_take(g.slots[device])) return SPILL_OK;
  return acquire_slow(device, fn, lease, create, no_runtime);
}

// Leases the runtime whose allocator holds `ptr` (any device alive). INVALID_ARGUMENT naming
// the pointer when none does.
spill_status acquire_owner(const void* ptr, const char* fn, Lease& lease) noexcept;

// The ordinal of another live device whose allocator holds `ptr`, or -1.
int other_owner(const void* ptr, int device) noexcept;

// The shape of most entry points: lease `device`'s runtime, run `body(lease)`, translate any
// exception into a status with `fn` and the device as its context.
template <class Body>
spill_status on_device(int device, const char* fn, Body&& body, bool create = true) noexcept {
  Lease lease;
  if (spill_status s = acquire(device, fn, lease, create)) return s;
  try {
    return body(lease);
  } catch (...) {
    return current_error(std::string(fn) + " (device " + std::to_string(device) + ")");
  }
}

// The same for entry points that name a block: the runtime that holds `ptr`.
std::string pointer_context(const char* fn, const void* ptr);
template <class Body>
spill_status on_block(const void* ptr, const char* fn, Body&& body) noexcept {
  Lease lease;
  if (spill_status s = acquire_owner(ptr, fn, lease)) return s;
  try {
    return body(lease);
  } catch (...) {
    return current_error(pointer_context(fn, ptr));
  }
}

// Throws InvalidArgument unless `ptr` is the start of a live block of the lease's allocator (the
// address its allocation returned), naming the block it points inside, if any.
void expect_block_start(Lease& lease, const void* ptr);

// Copies `text` into a string the caller frees with spill_string_free.
spill_status give_string(const std::string& text, char** out, const char* fn) noexcept;

}  // namespace spill::capi
#pragma GCC visibility pop

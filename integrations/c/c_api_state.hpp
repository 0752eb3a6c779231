// The C API's internal state, shared by integrations/c/*.cpp: one slot per device ordinal
// holding its runtime, the lifecycle (session, shutdown, fork, process exit) and the
// translation of C++ exceptions into status codes with a thread-local message.
//
// Hot path without a global lock: a call takes a Lease on its device's slot (one atomic
// increment of the slot's user count, then a load of its runtime pointer); spill_shutdown
// swaps the pointer out, waits until the count drops to zero, then frees the runtime. Both
// sides use sequentially consistent operations, so either the call sees no runtime or the
// shutdown sees the call. Slots are never freed (the Global object is leaked on purpose: calls
// during static destruction at exit must still find it).
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "core/config.hpp"
#include "spill/spill.h"
#include "swapper/runtime.hpp"

namespace spill::capi {

inline constexpr int kMaxDevices = SPILL_MAX_DEVICES;
inline constexpr int kMaxSimStreams = 256;

inline Stream to_stream(void* s) { return static_cast<Stream>(s); }

// One device's runtime and what the C API keeps beside it.
struct DeviceState {
  DeviceState(Config config, int ordinal);

  const int ordinal;
  std::unique_ptr<Runtime> rt;
  bool simulated = false;

  // On the simulated device the only valid streams are those spill_stream_create made.
  bool stream_known(void* s) const {
    if (s == nullptr || !simulated) return true;
    const int n = n_streams.load(std::memory_order_acquire);
    for (int i = 0; i < n; ++i)
      if (streams[i].load(std::memory_order_relaxed) == s) return true;
    return false;
  }
  void add_stream(void* s);     // throws InvalidArgument when the table is full
  void remove_stream(void* s);

  void note_oom(const std::string& message);
  std::string last_oom() const;

  std::atomic<std::uint64_t> torch_free_errors{0};

 private:
  std::array<std::atomic<void*>, kMaxSimStreams> streams{};
  std::atomic<int> n_streams{0};
  mutable std::mutex mu_;  // stream registration, last_oom_
  std::string last_oom_;
};

struct Slot {
  std::atomic<int> users{0};
  std::atomic<DeviceState*> state{nullptr};
};

struct Global {
  Global();
  std::mutex mu;  // lifecycle: init, shutdown, creating runtimes; never held by a hot path
  std::array<Slot, kMaxDevices> slots;
  std::optional<Config> config;  // from spill_init or SPILL_CONF at the first runtime
  bool shut_down = false;
  bool started = false;                // a runtime was created in this process
  std::atomic<int> only_device{-1};    // the ordinal when exactly one runtime is alive
  std::atomic<bool> forked{false};     // this process is a fork of one where spill started
  std::atomic<bool> exiting{false};    // exit() has begun: nothing is freed any more
  int start_pid = 0, child_pid = 0;
  bool atexit_registered = false;
};

Global& global();

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
    slot.users.fetch_add(1);  // seq_cst: ordered before the load below (see the top comment)
    DeviceState* st = slot.state.load();
    if (st != nullptr) {
      slot_ = &slot;
      state_ = st;
      return true;
    }
    slot.users.fetch_sub(1, std::memory_order_release);
    return false;
  }
  void reset() {
    if (slot_ != nullptr) slot_->users.fetch_sub(1, std::memory_order_release);
    slot_ = nullptr;
    state_ = nullptr;
  }
  DeviceState* operator->() const { return state_; }
  DeviceState& operator*() const { return *state_; }
  Runtime& rt() const { return *state_->rt; }

 private:
  Slot* slot_ = nullptr;
  DeviceState* state_ = nullptr;
};

// The slow path of acquire: creates the runtime (when `create`) or says why there is none.
spill_status acquire_slow(int device, const char* fn, Lease& lease, bool create) noexcept;

// Leases `device`'s runtime; with `create`, makes it on first use. On failure the message is
// set and the code returned.
inline spill_status acquire(int device, const char* fn, Lease& lease, bool create = true) noexcept {
  Global& g = global();
  if (g.forked.load(std::memory_order_relaxed)) return forked_error(fn);
  if (device >= 0 && device < kMaxDevices && lease.try_take(g.slots[device])) return SPILL_OK;
  return acquire_slow(device, fn, lease, create);
}

// Leases the runtime whose allocator holds `ptr` (any device alive). INVALID_ARGUMENT naming
// the pointer when none does.
spill_status acquire_owner(const void* ptr, const char* fn, Lease& lease) noexcept;

// The ordinal of another live device whose allocator holds `ptr`, or -1.
int other_owner(const void* ptr, int device) noexcept;

// Copies `text` into a string the caller frees with spill_string_free.
spill_status give_string(const std::string& text, char** out, const char* fn) noexcept;

}  // namespace spill::capi

// The C API's lifecycle and errors: the global state, runtimes created per device on first
// use, spill_init / spill_shutdown, fork children, process exit, and status translation.
#include <linux/membarrier.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "core/version.hpp"
#include "device/cuda_device.hpp"
#include "integrations/c/c_api_state.hpp"
#include "profiling/events.hpp"

#pragma GCC visibility push(hidden)
namespace spill::capi {

namespace {

// The calling thread's latest error message: a plain pointer (nothing of it is destroyed with
// the thread's C++ thread_locals) to a string that a thread-specific key's destructor frees,
// after every C++ thread_local destructor of the thread has run. A thread_local std::string
// was made at the thread's first failing call, so it was destroyed before the destructors of
// thread_locals made earlier (an RAII holder freeing its block at thread exit), and their
// failing spill calls then wrote into the freed string: heap corruption, an abort. The main
// thread's static destructors at exit, which run after its thread_locals', did the same.
constinit thread_local std::string* tl_error = nullptr;

void free_error(void* text) {
  auto* message = static_cast<std::string*>(text);
  if (tl_error == message) tl_error = nullptr;  // a later key destructor may fail again
  delete message;
}

// Null when no key is left (PTHREAD_KEYS_MAX): the thread's message then lives to the end.
const pthread_key_t* error_key() {
  static const pthread_key_t* const key = [] {
    auto* k = new pthread_key_t;
    return ::pthread_key_create(k, free_error) == 0 ? k : nullptr;
  }();
  return key;
}

void on_exit() { global().exiting.store(true); }

void before_fork() { global().mu.lock(); }
void after_fork_parent() { global().mu.unlock(); }
bool register_membarrier() {
  return ::syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
}

void after_fork_child() {
  Global& g = global();
  g.mu.unlock();
  // Only this thread lives on: the others' records name nothing any more.
  ThreadLeases* mine = &thread_leases();
  for (ThreadLeases* t = g.threads.load(); t != nullptr; t = t->next) {
    if (t == mine) continue;
    for (auto& h : t->held) h.store(nullptr);
    t->depth = 0;
    t->in_use.store(false);
  }
  g.membarrier = g.membarrier && register_membarrier();
  if (g.started) {
    g.child_pid = static_cast<int>(::getpid());
    g.forked.store(true);
  }
}

std::string device_name(int device) { return "device " + std::to_string(device); }

}  // namespace

constinit thread_local ThreadLeases* tl_leases = nullptr;

namespace {
// The thread-specific key's destructor: the thread has ended. It runs after every C++
// thread_local destructor of the thread (glibc runs those first), so a destructor of a
// user's thread_local that calls spill still holds the record. A C key destructor that runs
// after this one and calls spill registers again (the key is set again, so this runs again).
// A main thread that ends the process (exit) never gets here: its record stays its own.
void hand_back(void* record) {
  auto* t = static_cast<ThreadLeases*>(record);
  if (tl_leases == t) tl_leases = nullptr;
  t->in_use.store(false, std::memory_order_release);
}
}  // namespace

Global::Global() : membarrier(register_membarrier()) {
  has_thread_key = ::pthread_key_create(&thread_key, hand_back) == 0;
  // First, so that the recorders' prepare runs after ours: a thread that holds mu (a
  // shutdown joining stream workers) may wait for them, never the other way round.
  profiling::TraceRecorder::install_fork_handlers();
  ::pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

ThreadLeases& register_thread() {
  Global& g = global();
  ThreadLeases* found = nullptr;
  for (ThreadLeases* t = g.threads.load(); t != nullptr && found == nullptr; t = t->next) {
    bool free = false;
    if (t->in_use.compare_exchange_strong(free, true)) found = t;
  }
  if (found == nullptr) {
    found = new ThreadLeases();  // never freed: other threads may be reading it
    found->next = g.threads.load();
    while (!g.threads.compare_exchange_weak(found->next, found)) {
    }
  }
  found->depth = 0;
  tl_leases = found;
  // A C++ thread_local owner would be destroyed before the user's thread_locals made earlier
  // than the thread's first spill call; their destructors then shared the record with the
  // next thread to register (a lease stack two threads wrote, runtimes made over live ones).
  if (g.has_thread_key) ::pthread_setspecific(g.thread_key, found);
  return *found;
}

void retire_slot(Slot& slot) {
  Global& g = global();
  DeviceState* st = slot.state.exchange(nullptr);
  if (st == nullptr) return;
  // Every thread passes a full barrier: a call that announced the slot before our exchange is
  // visible below; one that announces it later loads the null pointer.
  if (!g.membarrier || ::syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) != 0)
    std::atomic_thread_fence(std::memory_order_seq_cst);
  for (ThreadLeases* t = g.threads.load(); t != nullptr; t = t->next)
    for (auto& h : t->held)
      while (h.load(std::memory_order_acquire) == &slot) std::this_thread::yield();
  delete st;  // the runtime frees every block, cached segment and host buffer
}

const char* last_error_text() noexcept { return tl_error != nullptr ? tl_error->c_str() : ""; }

spill_status fail(spill_status code, const std::string& message) noexcept {
  try {
    if (tl_error == nullptr) {
      auto text = std::make_unique<std::string>();
      if (const pthread_key_t* key = error_key()) ::pthread_setspecific(*key, text.get());
      tl_error = text.release();
    }
    // Invalid input is named by the message; where in spill's code it was noticed ("[x.cpp:NN]")
    // is noise to the caller (audit 38b), kept for the other errors.
    *tl_error = code == SPILL_ERROR_INVALID_ARGUMENT ? without_source_location(message) : message;
  } catch (...) {
    // No memory for the message: the code still says what happened.
    if (tl_error != nullptr) tl_error->clear();
  }
  return code;
}

namespace {
// The context before an exception's message, unless the message begins with it already (a
// reader told which call it serves names it: "spill_init: spill_init: unknown key" before).
std::string in_context(const std::string& context, const char* what) {
  const std::string message(what);
  if (message.compare(0, context.size(), context) == 0 && message.size() > context.size() &&
      message[context.size()] == ':')
    return message;
  return context + ": " + message;
}
}  // namespace

spill_status current_error(const std::string& context) noexcept {
  try {
    throw;
  } catch (const HostCapExceeded& e) {
    return fail(SPILL_ERROR_HOST_CAP, in_context(context, e.what()));
  } catch (const OutOfMemory& e) {
    return fail(SPILL_ERROR_OUT_OF_MEMORY, in_context(context, e.what()));
  } catch (const CudaError& e) {
    return fail(SPILL_ERROR_CUDA, in_context(context, e.what()));
  } catch (const InvalidArgument& e) {
    return fail(SPILL_ERROR_INVALID_ARGUMENT, in_context(context, e.what()));
  } catch (const WriteFailed& e) {
    return fail(SPILL_ERROR_WRITE_FAILED, in_context(context, e.what()));
  } catch (const std::bad_alloc&) {
    return fail(SPILL_ERROR_OUT_OF_MEMORY, context + ": host memory exhausted (std::bad_alloc)");
  } catch (const std::exception& e) {
    return fail(SPILL_ERROR_INTERNAL, in_context(context, e.what()));
  } catch (...) {
    return fail(SPILL_ERROR_INTERNAL, context + ": an unknown exception");
  }
}

spill_status forked_error(const char* fn) noexcept {
  const Global& g = global();
  char msg[512];
  std::snprintf(msg, sizeof msg,
                "%s: this process (pid %d) is a fork of pid %d, where spill had already "
                "started; the child cannot use the parent's runtime (nor its CUDA context), "
                "so every spill call fails here. Use spill in the parent, fork before the "
                "first spill call, or start workers with the 'spawn' method",
                fn, g.child_pid, g.start_pid);
  return fail(SPILL_ERROR_FORKED_CHILD, msg);
}

spill_status bad_stream(const char* fn, void* stream, int device) noexcept {
  if (reinterpret_cast<std::uintptr_t>(stream) == kStreamPerThread)
    return fail(SPILL_ERROR_INVALID_ARGUMENT,
                std::string(fn) + ": stream 0x2 is cudaStreamPerThread, a different stream on "
                "every thread; spill keeps a block's streams and uses them from whichever "
                "thread evicts or reuses it. Pass a stream of your own (cudaStreamCreate, "
                "torch.cuda.Stream, cupy.cuda.Stream) or NULL, the legacy default stream");
  return fail(SPILL_ERROR_INVALID_ARGUMENT,
              std::string(fn) + ": stream " + format_address(stream) +
                  " is not a stream of simulated " + device_name(device) +
                  " (streams there come from spill_stream_create)");
}

// ---- DeviceState

DeviceState::DeviceState(Config config, int device) : ordinal(device) {
  config.gpu = device;
  if (config.device == DeviceChoice::Auto && device != 0) {
    // `auto` picks the simulated device only when there is no GPU at all: a missing ordinal
    // on a machine with GPUs is an error, not a silent simulation.
    std::string why_zero, why;
    if (cuda_available(0, &why_zero) && !cuda_available(device, &why))
      throw InvalidArgument(device_name(device) + ": " + why);
  }
  rt = std::make_unique<Runtime>(config, RuntimeOptions{.opt_in_swappable = true});
  simulated = rt->device().info().simulated;
}

void DeviceState::add_stream(void* s) {
  if (!simulated) return;
  std::lock_guard lock(mu_);
  const int n = n_streams.load(std::memory_order_relaxed);
  for (int i = 0; i < n; ++i) {
    if (streams[i].load(std::memory_order_relaxed) == nullptr) {
      streams[i].store(s, std::memory_order_release);
      return;
    }
  }
  // A table that is full is a resource that ran out, not bad input (audit 42b #8).
  if (n >= kMaxSimStreams)
    SPILL_FAIL_OOM("the simulated device has " + std::to_string(n) +
                   " streams already (the most spill keeps): destroy streams no longer used "
                   "(spill_stream_destroy)");
  streams[n].store(s, std::memory_order_relaxed);
  n_streams.store(n + 1, std::memory_order_release);
}

void DeviceState::remove_stream(void* s) {
  if (!simulated) return;
  std::lock_guard lock(mu_);
  const int n = n_streams.load(std::memory_order_relaxed);
  for (int i = 0; i < n; ++i)
    if (streams[i].load(std::memory_order_relaxed) == s) streams[i].store(nullptr);
}

void DeviceState::note_oom(const std::string& message) {
  std::lock_guard lock(mu_);
  last_oom_ = message;
}

std::string DeviceState::last_oom() const {
  std::lock_guard lock(mu_);
  return last_oom_;
}

void DeviceState::set_oom_note(std::string note) {
  std::lock_guard lock(mu_);
  oom_note_ = std::move(note);
}

std::string DeviceState::oom_note() const {
  std::lock_guard lock(mu_);
  return oom_note_;
}

// ---- leases

namespace {

void update_only_device_locked(Global& g) {
  int only = -1, count = 0;
  for (int i = 0; i < kMaxDevices; ++i) {
    if (g.slots[i].state.load() != nullptr) {
      only = i;
      ++count;
    }
  }
  g.only_device.store(count == 1 ? only : -1);
}

}  // namespace

spill_status nested_too_deep(const char* fn) noexcept {
  return fail(SPILL_ERROR_INTERNAL,
              std::string(fn) + ": this thread is inside " +
                  std::to_string(ThreadLeases::kDepth) +
                  " spill calls already, the most that nest; the call was refused");
}

spill_status acquire_slow(int device, const char* fn, Lease& lease, bool create,
                          bool* no_runtime) noexcept {
  if (device < 0 || device >= kMaxDevices) {
    return fail(SPILL_ERROR_INVALID_ARGUMENT,
                std::string(fn) + ": device " + std::to_string(device) +
                    " is not a device ordinal (0 to " + std::to_string(kMaxDevices - 1) + ")");
  }
  Global& g = global();
  try {
    if (lease_stack_full()) return nested_too_deep(fn);
    std::lock_guard lock(g.mu);
    if (g.shut_down) {
      return fail(SPILL_ERROR_SHUT_DOWN,
                  std::string(fn) + ": spill was shut down (" +
                      (g.shut_down_freed ? "spill_shutdown freed every block"
                                         : "spill_shutdown was called before any device started") +
                      "); spill_init starts a new session");
    }
    Slot& slot = g.slots[device];
    if (lease.try_take(slot)) return SPILL_OK;  // another thread made it meanwhile
    // Runtimes are made and retired under the lock: one there now is live, and the take can
    // only have failed for a full lease stack. Never make another over it.
    if (slot.state.load() != nullptr) return nested_too_deep(fn);
    if (!create) {
      if (no_runtime != nullptr) {
        *no_runtime = true;
        return SPILL_ERROR_INVALID_ARGUMENT;
      }
      return fail(SPILL_ERROR_INVALID_ARGUMENT,
                  std::string(fn) + ": " + device_name(device) +
                      " has no runtime yet: it holds no block or stream for this call to "
                      "act on");
    }
    if (!g.config) g.config = Config::from_env();
    auto state = std::make_unique<DeviceState>(*g.config, device);
    state->started_by = fn;
    profiling::TraceRecorder::global().set_enabled(g.config->trace);
    if (!g.started) g.start_pid = static_cast<int>(::getpid());
    g.started = true;
    slot.state.store(state.release());
    update_only_device_locked(g);
    if (!g.atexit_registered) {
      // Registered after the first runtime started the CUDA runtime, so it runs before the
      // CUDA runtime's own teardown.
      g.atexit_registered = std::atexit(on_exit) == 0;
    }
    if (lease.try_take(slot)) return SPILL_OK;
    return fail(SPILL_ERROR_INTERNAL, std::string(fn) + ": a new runtime vanished");
  } catch (...) {
    return current_error(std::string(fn) + " (" + device_name(device) + ")");
  }
}

spill_status acquire_owner(const void* ptr, const char* fn, Lease& lease) noexcept {
  Global& g = global();
  if (g.forked.load(std::memory_order_relaxed)) return forked_error(fn);
  if (ptr == nullptr)
    return fail(SPILL_ERROR_INVALID_ARGUMENT, std::string(fn) + ": the pointer is NULL");
  if (lease_stack_full()) return nested_too_deep(fn);  // not "no device holds it"
  const int only = g.only_device.load();
  // One device: its swapper and allocator say whether they know the pointer.
  if (only >= 0 && lease.try_take(g.slots[only])) return SPILL_OK;
  try {
    bool any = false;
    for (Slot& slot : g.slots) {
      if (slot.state.load() == nullptr || !lease.try_take(slot)) continue;
      any = true;
      if (lease.rt().allocator().owns(ptr)) return SPILL_OK;
      lease.reset();
    }
    if (!any) {
      std::lock_guard lock(g.mu);
      if (g.shut_down) {
        return fail(SPILL_ERROR_SHUT_DOWN,
                    std::string(fn) + ": spill was shut down; " + format_address(ptr) +
                        " was freed by spill_shutdown");
      }
    }
    return fail(SPILL_ERROR_INVALID_ARGUMENT,
                std::string(fn) + ": " + format_address(ptr) +
                    " is not inside a block allocated by spill on any device");
  } catch (...) {
    return current_error(fn);
  }
}

int other_owner(const void* ptr, int device) noexcept {
  Global& g = global();
  for (int i = 0; i < kMaxDevices; ++i) {
    Lease lease;
    if (i == device || !lease.try_take(g.slots[i])) continue;
    try {
      if (lease.rt().allocator().owns(ptr)) return i;
    } catch (...) {
      // A device that cannot answer owns nothing we can name.
    }
  }
  return -1;
}

std::string pointer_context(const char* fn, const void* ptr) {
  return std::string(fn) + "(" + format_address(ptr) + ")";
}

void expect_block_start(Lease& lease, const void* ptr) {
  const std::optional<BlockInfo> b = lease.rt().allocator().block_info(ptr);
  SPILL_EXPECTS(b && b->base == ptr,
                b ? format_address(ptr) + " points inside the block at " +
                        format_address(b->base) + " (" + format_bytes(b->size) +
                        "); use the address the allocation returned"
                  : format_address(ptr) + " is not the start of a block allocated by spill "
                                          "(never allocated, or freed)");
}

spill_status give_string(const std::string& text, char** out, const char* fn) noexcept {
  if (out == nullptr) return fail(SPILL_ERROR_INVALID_ARGUMENT, std::string(fn) + ": out is NULL");
  *out = static_cast<char*>(std::malloc(text.size() + 1));
  if (*out == nullptr) return fail(SPILL_ERROR_OUT_OF_MEMORY, std::string(fn) + ": no host memory");
  std::memcpy(*out, text.c_str(), text.size() + 1);
  return SPILL_OK;
}

}  // namespace spill::capi
#pragma GCC visibility pop

// PyTorch's CUDAPluggableAllocator hooks over the C API, and the failure handler that
// spill_torch_malloc calls when it cannot return memory (PyTorch never checks for NULL).
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#include "core/units.hpp"
#include "integrations/c/c_api_state.hpp"

using namespace spill;
using namespace spill::capi;

namespace {

struct Handler {
  std::mutex mu;
  spill_oom_handler fn = nullptr;
  void* user = nullptr;
};

Handler& handler() {
  static Handler* h = new Handler();  // never destroyed: frees may come during exit
  return *h;
}

// A failure spill_torch_free / record_stream / set_memory_fraction cannot return: counted,
// kept in spill_last_error, and the first one per device (or process) printed.
// Prints a failure of a hook that returns nothing. Frees, which may fail once per block in a
// loop, print only their first one per device (and one with no runtime to count on); every
// other hook's failure (a setting, a reset, an init the caller asked for) prints: before, one
// flag for the whole process let only the first of those print, whatever the function.
void report(const char* fn, int device, bool first_only = false) {
  bool print = true;
  if (first_only) {
    static std::atomic<bool> printed_unknown{false};
    Lease lease;
    if (device >= 0 && device < kMaxDevices && lease.try_take(global().slots[device])) {
      print = lease->torch_free_errors.fetch_add(1) == 0;
    } else {
      print = !printed_unknown.exchange(true);
    }
  }
  if (print) std::fprintf(stderr, "spill: %s failed: %s\n", fn, last_error_text());
}

// Set while this thread runs the OOM handler: a spill_torch_malloc that fails inside it (a
// handler that retries) returns NULL instead of calling the handler again, which recursed
// until the stack overflowed when the retry kept failing (audit 42b #5).
thread_local bool t_in_oom_handler = false;

}  // namespace

extern "C" {

spill_status spill_set_oom_handler(spill_oom_handler fn, void* user_data) {
  Handler& h = handler();
  std::lock_guard lock(h.mu);
  h.fn = fn;
  h.user = user_data;
  return SPILL_OK;
}

void* spill_torch_malloc(ssize_t size, int device, void* stream) {
  if (size == 0) return nullptr;
  void* p = nullptr;
  spill_status s;
  if (size < 0) {
    s = fail(SPILL_ERROR_INVALID_ARGUMENT,
             "spill_torch_malloc: size " + std::to_string(size) + " is negative");
  } else {
    s = spill_malloc(&p, static_cast<size_t>(size), device, stream);
    if (s == SPILL_OK) return p;
  }
  // No lease or lock is held here: the handler may call spill or throw.
  spill_oom_handler fn;
  void* user;
  {
    Handler& h = handler();
    std::lock_guard lock(h.mu);
    fn = h.fn;
    user = h.user;
  }
  const std::string message = last_error_text();
  if (t_in_oom_handler) return nullptr;  // the outer call's handler sees this NULL
  if (fn == nullptr) {
    std::fprintf(stderr,
                 "spill: spill_torch_malloc(%zd bytes, device %d) failed and PyTorch cannot be "
                 "told (it does not check for NULL); aborting. Use spill.torch.enable(), which "
                 "raises torch.cuda.OutOfMemoryError, or spill_set_oom_handler.\n%s\n",
                 size, device, message.c_str());
    std::abort();
  }
  struct InHandler {  // also when the handler throws
    InHandler() { t_in_oom_handler = true; }
    ~InHandler() { t_in_oom_handler = false; }
  } in_handler;
  fn(s, size < 0 ? 0 : static_cast<size_t>(size), device, message.c_str(), user);
  return nullptr;
}

void spill_torch_free(void* ptr, ssize_t /*size*/, int device, void* stream) {
  const spill_status s = spill_free(ptr, device, stream);
  // After spill_shutdown the block is already gone: tensors outliving spill are fine.
  if (s != SPILL_OK && s != SPILL_ERROR_SHUT_DOWN) report("spill_torch_free", device, true);
}

void spill_torch_record_stream(void* ptr, void* stream) {
  if (spill_record_stream(ptr, stream) != SPILL_OK)
    report("spill_torch_record_stream", -1, true);
}

void spill_torch_reset(void) {
  Global& g = global();
  for (int d = 0; d < kMaxDevices; ++d) {
    if (g.slots[d].state.load() == nullptr) continue;
    if (spill_empty_cache(d) != SPILL_OK) report("spill_torch_reset", d);
  }
}

void spill_torch_set_memory_fraction(double fraction, int device) {
  if (!(fraction > 0.0 && fraction <= 1.0)) {
    fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_torch_set_memory_fraction: fraction " +
                                           std::to_string(fraction) + " is not in (0, 1]");
    report("spill_torch_set_memory_fraction", -1);
    return;
  }
  std::size_t total = 0;
  {
    Lease lease;
    if (acquire(device, "spill_torch_set_memory_fraction", lease) != SPILL_OK) {
      report("spill_torch_set_memory_fraction", -1);
      return;
    }
    total = lease.rt().device().info().total_bytes;
  }
  const auto bytes = static_cast<uint64_t>(fraction * static_cast<double>(total));
  if (spill_set_budget(device, bytes) != SPILL_OK) report("spill_torch_set_memory_fraction", -1);
}

void spill_torch_init(int device_count) {
  if (device_count < 0 || device_count > kMaxDevices) {
    fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_torch_init: device count " +
                                           std::to_string(device_count) + " is not in 0.." +
                                           std::to_string(kMaxDevices));
    report("spill_torch_init", -1);
  }
}

}  // extern "C"

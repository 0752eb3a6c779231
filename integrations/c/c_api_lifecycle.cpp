// The C API's lifecycle entry points: status strings, the thread's last error, version,
// spill_init, spill_shutdown, spill_device_open, spill_string_free.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "core/config.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"
#include "core/version.hpp"
#include "integrations/c/c_api_state.hpp"

using namespace spill;
using namespace spill::capi;

extern "C" {

const char* spill_status_string(spill_status status) {
  switch (status) {
    case SPILL_OK: return "ok";
    case SPILL_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case SPILL_ERROR_OUT_OF_MEMORY: return "out of memory";
    case SPILL_ERROR_HOST_CAP: return "pinned host memory cap reached";
    case SPILL_ERROR_CUDA: return "CUDA error";
    case SPILL_ERROR_SHUT_DOWN: return "spill was shut down";
    case SPILL_ERROR_FORKED_CHILD: return "forked child of a process where spill had started";
    case SPILL_ERROR_ALREADY_INITIALIZED: return "already initialised with another configuration";
    case SPILL_ERROR_NOT_FOUND: return "not found";
    case SPILL_ERROR_WRITE_FAILED: return "a file could not be written (no room or I/O error)";
    case SPILL_ERROR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

const char* spill_last_error(void) { return last_error_text(); }

const char* spill_version(void) { return kVersion; }

void spill_version_numbers(int* major, int* minor, int* patch) {
  int v[3] = {0, 0, 0};
  std::sscanf(kVersion, "%d.%d.%d", &v[0], &v[1], &v[2]);
  if (major) *major = v[0];
  if (minor) *minor = v[1];
  if (patch) *patch = v[2];
}

void spill_string_free(char* text) { std::free(text); }

spill_status spill_parse_size(const char* text, uint64_t* bytes) {
  if (text == nullptr || bytes == nullptr)
    return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_parse_size: text or bytes is NULL");
  try {
    *bytes = parse_size(text, "spill_parse_size");
    return SPILL_OK;
  } catch (const Error& e) {
    return fail(SPILL_ERROR_INVALID_ARGUMENT, e.what());
  } catch (...) {
    return current_error("spill_parse_size");
  }
}

spill_status spill_init(const char* conf) {
  Global& g = global();
  if (g.forked.load()) return forked_error("spill_init");
  try {
    Config c = conf ? Config::parse(conf, "spill_init") : Config::from_env();
    std::lock_guard lock(g.mu);
    if (g.shut_down) {
      g.shut_down = false;  // a new session
      g.config = c;
      return SPILL_OK;
    }
    // Which runtimes run, and the call that started each (a read starts one too: a device's
    // runtime is made at the first call that needs it).
    std::string running;
    for (int i = 0; i < kMaxDevices; ++i) {
      if (const DeviceState* st = g.slots[i].state.load()) {
        running += (running.empty() ? "device " : ", device ") + std::to_string(i) +
                   " (started by " + (*st->started_by ? st->started_by : "a call") + ")";
      }
    }
    if (!running.empty() && g.config && !(*g.config == c)) {
      return fail(SPILL_ERROR_ALREADY_INITIALIZED,
                  "spill_init: runtimes already run (" + running + ") with the configuration '" +
                      g.config->to_string() + "'; the new one '" + c.to_string() +
                      "' differs: call spill_shutdown first (a device's runtime starts at the "
                      "first call that needs the device, with the configuration then in effect)");
    }
    g.config = c;
    return SPILL_OK;
  } catch (...) {
    return current_error("spill_init");
  }
}

spill_status spill_shutdown(void) {
  Global& g = global();
  if (g.forked.load()) return forked_error("spill_shutdown");
  try {
    std::lock_guard lock(g.mu);
    const bool running = std::any_of(g.slots.begin(), g.slots.end(),
                                     [](const Slot& s) { return s.state.load() != nullptr; });
    g.shut_down_freed = running || (g.shut_down && g.shut_down_freed);  // (shut down twice)
    g.shut_down = true;
    g.config.reset();
    g.only_device.store(-1);
    for (Slot& slot : g.slots) retire_slot(slot);  // waits for calls still inside
    return SPILL_OK;
  } catch (...) {
    return current_error("spill_shutdown");
  }
}

spill_status spill_device_open(int device, int* simulated) {
  Lease lease;
  if (spill_status s = acquire(device, "spill_device_open", lease)) return s;
  if (simulated) *simulated = lease->simulated ? 1 : 0;
  return SPILL_OK;
}

}  // extern "C"

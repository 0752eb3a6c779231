// The C API's streams and memory: stream create/destroy/synchronize/destroyed, malloc, free,
// record_stream, empty_cache and the budget. Messages name the pointer, size, device, stream.
#include <string>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "integrations/c/c_api_state.hpp"

using namespace spill;
using namespace spill::capi;

namespace {

std::string context(const char* fn, int device) {
  return std::string(fn) + " (device " + std::to_string(device) + ")";
}

}  // namespace

extern "C" {

// ---- streams

spill_status spill_stream_create(int device, void** stream) {
  if (stream == nullptr) return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_stream_create: stream is NULL");
  *stream = nullptr;
  return on_device(device, "spill_stream_create", [&](Lease& lease) {
    Stream created = lease.rt().device().create_stream();
    try {
      lease->add_stream(created);
    } catch (...) {
      lease.rt().device().destroy_stream(created);
      throw;
    }
    *stream = created;
    return SPILL_OK;
  });
}

spill_status spill_stream_destroy(int device, void* stream) {
  if (to_stream(stream) == nullptr) {
    return fail(SPILL_ERROR_INVALID_ARGUMENT,
                std::string("spill_stream_destroy: the default stream (") +
                    (stream == nullptr ? "NULL" : "cudaStreamLegacy") + ") cannot be destroyed");
  }
  return on_device(device, "spill_stream_destroy", [&](Lease& lease) {
    if (!lease->stream_known(stream)) return bad_stream("spill_stream_destroy", stream, device);
    lease.rt().allocator().forget_stream(to_stream(stream));
    lease->remove_stream(stream);
    lease.rt().device().destroy_stream(to_stream(stream));
    return SPILL_OK;
  }, false);
}

spill_status spill_stream_synchronize(int device, void* stream) {
  return on_device(device, "spill_stream_synchronize", [&](Lease& lease) {
    if (!lease->stream_known(stream)) return bad_stream("spill_stream_synchronize", stream, device);
    lease.rt().device().synchronize(to_stream(stream));
    return SPILL_OK;
  });
}

spill_status spill_stream_destroyed(int device, void* stream) {
  return on_device(device, "spill_stream_destroyed", [&](Lease& lease) {
    if (!lease->stream_known(stream)) return bad_stream("spill_stream_destroyed", stream, device);
    lease.rt().allocator().forget_stream(to_stream(stream));
    return SPILL_OK;
  }, false);
}

// ---- memory

spill_status spill_malloc(void** out, size_t size, int device, void* stream) {
  if (out == nullptr) return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_malloc: out is NULL");
  *out = nullptr;
  Lease lease;
  if (spill_status s = acquire(device, "spill_malloc", lease)) return s;
  if (!lease->stream_known(stream)) return bad_stream("spill_malloc", stream, device);
  try {
    *out = lease.rt().allocator().allocate(size, to_stream(stream));
    return SPILL_OK;
  } catch (...) {
    spill_status s = current_error("spill_malloc(" + std::to_string(size) + " bytes, device " +
                                   std::to_string(device) + ")");
    if (s == SPILL_ERROR_OUT_OF_MEMORY || s == SPILL_ERROR_HOST_CAP) {
      try {
        const std::string note = lease->oom_note();
        if (!note.empty()) fail(s, with_more(last_error_text(), "\n" + note));
        lease->note_oom(last_error_text());
      } catch (...) {
        // The message stays in spill_last_error.
      }
    }
    return s;
  }
}

spill_status spill_free(void* ptr, int device, void* stream) {
  if (ptr == nullptr) return SPILL_OK;
  Global& g = global();
  if (g.exiting.load(std::memory_order_relaxed) && !g.forked.load(std::memory_order_relaxed))
    return SPILL_OK;  // the process is exiting: the memory goes with it
  Lease lease;
  bool no_runtime = false;
  if (spill_status s = acquire(device, "spill_free", lease, false, &no_runtime)) {
    if (!no_runtime) return s;
    // A device with no runtime holds no block: name the pointer, and its owner where another
    // device holds it (audit 41a #2: the message named neither).
    const int owner = other_owner(ptr, device);
    return fail(SPILL_ERROR_INVALID_ARGUMENT,
                "spill_free: " + format_address(ptr) +
                    (owner >= 0 ? " belongs to device " + std::to_string(owner) + ", not"
                                : " was not allocated by spill on") +
                    " device " + std::to_string(device) + " (which has no runtime yet: it " +
                    "holds no block; nothing was freed)");
  }
  if (!lease->stream_known(stream)) return bad_stream("spill_free", stream, device);
  try {
    lease.rt().allocator().deallocate(ptr, to_stream(stream));
    return SPILL_OK;
  } catch (const InvalidArgument&) {
    spill_status s = current_error(context("spill_free", device));
    lease.reset();
    const int owner = other_owner(ptr, device);
    if (owner >= 0) {
      return fail(SPILL_ERROR_INVALID_ARGUMENT,
                  "spill_free: " + format_address(ptr) + " belongs to device " +
                      std::to_string(owner) + ", not device " + std::to_string(device) +
                      " (nothing was freed)");
    }
    return s;
  } catch (...) {
    return current_error(context("spill_free", device));
  }
}

spill_status spill_record_stream(void* ptr, void* stream) {
  return on_block(ptr, "spill_record_stream", [&](Lease& lease) {
    if (!lease->stream_known(stream)) return bad_stream("spill_record_stream", stream, lease->ordinal);
    lease.rt().allocator().record_stream(ptr, to_stream(stream));
    if (Swapper* sw = lease.rt().swapper()) sw->record_stream(ptr, to_stream(stream));
    return SPILL_OK;
  });
}

spill_status spill_empty_cache(int device) {
  return on_device(device, "spill_empty_cache", [](Lease& lease) {
    lease.rt().empty_cache();
    return SPILL_OK;
  });
}

spill_status spill_set_budget(int device, uint64_t bytes) {
  return on_device(device, "spill_set_budget", [&](Lease& lease) {
    lease.rt().set_budget(static_cast<std::size_t>(bytes));
    return SPILL_OK;
  });
}

spill_status spill_get_budget(int device, uint64_t* bytes) {
  if (bytes == nullptr) return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_get_budget: bytes is NULL");
  return on_device(device, "spill_get_budget", [&](Lease& lease) {
    *bytes = lease.rt().allocator().budget();
    return SPILL_OK;
  });
}

}  // extern "C"

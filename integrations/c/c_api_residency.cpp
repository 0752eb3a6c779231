// The C API's residency and steps: set_swappable, pin (stream and host), unpin by token,
// prefetch/evict hints, residence, step scopes, and the recorded step as a graph file.
#include <string>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "graph/graph_json.hpp"
#include "graph/trace.hpp"
#include "integrations/c/c_api_state.hpp"

using namespace spill;
using namespace spill::capi;

namespace {

std::string on_pointer(const char* fn, const void* ptr) {
  return std::string(fn) + "(" + format_address(ptr) + ")";
}

// With one device alive, acquire_owner does not ask the allocator; without a swapper (policy
// none) nobody else would, so this check names a pointer spill does not know.
void expect_owned(Lease& lease, const void* ptr, const char* fn) {
  SPILL_EXPECTS(lease.rt().allocator().owns(ptr),
                std::string(fn) + ": " + format_address(ptr) +
                    " is not inside a block allocated by spill");
}

spill_status pin_impl(void* ptr, void* stream, spill_pin_token* token, bool host) {
  const char* fn = host ? "spill_pin_for_host" : "spill_pin";
  if (token == nullptr) return fail(SPILL_ERROR_INVALID_ARGUMENT, std::string(fn) + ": token is NULL");
  *token = spill_pin_token{};
  Lease lease;
  if (spill_status s = acquire_owner(ptr, fn, lease)) return s;
  if (!host && !lease->stream_known(stream)) return bad_stream(fn, stream, lease->ordinal);
  try {
    Swapper* sw = lease.rt().swapper();
    if (sw == nullptr) {
      expect_owned(lease, ptr, fn);
      return SPILL_OK;  // nothing ever moves
    }
    const PinToken t = host ? sw->pin_for_host(ptr) : sw->pin(ptr, to_stream(stream));
    token->block = t.block;
    token->generation = t.generation;
    token->device = lease->ordinal;
    token->flags = t.host ? SPILL_PIN_HOST : 0u;
    return SPILL_OK;
  } catch (...) {
    return current_error(on_pointer(fn, ptr));
  }
}

}  // namespace

extern "C" {

spill_status spill_set_swappable(void* ptr, int swappable) {
  Lease lease;
  if (spill_status s = acquire_owner(ptr, "spill_set_swappable", lease)) return s;
  try {
    if (Swapper* sw = lease.rt().swapper()) sw->set_swappable(ptr, swappable != 0);
    else expect_owned(lease, ptr, "spill_set_swappable");
    return SPILL_OK;
  } catch (...) {
    return current_error(on_pointer("spill_set_swappable", ptr));
  }
}

spill_status spill_pin(void* ptr, void* stream, spill_pin_token* token) {
  return pin_impl(ptr, stream, token, false);
}

spill_status spill_pin_for_host(void* ptr, spill_pin_token* token) {
  return pin_impl(ptr, nullptr, token, true);
}

spill_status spill_unpin(const spill_pin_token* token, void* stream, int wrote) {
  if (token == nullptr) return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_unpin: token is NULL");
  if (token->block == 0) {
    if (global().forked.load()) return forked_error("spill_unpin");
    return SPILL_OK;  // a block that never moves
  }
  Lease lease;
  if (spill_status s = acquire(token->device, "spill_unpin", lease, false)) return s;
  const bool host = (token->flags & SPILL_PIN_HOST) != 0;
  if (!host && !lease->stream_known(stream)) return bad_stream("spill_unpin", stream, token->device);
  try {
    Swapper* sw = lease.rt().swapper();
    SPILL_EXPECTS(sw != nullptr, "spill_unpin: the token is not from this device's runtime");
    sw->unpin(PinToken{static_cast<std::uintptr_t>(token->block), token->generation, host},
              to_stream(stream), wrote != 0);
    return SPILL_OK;
  } catch (...) {
    return current_error(on_pointer("spill_unpin", reinterpret_cast<void*>(token->block)));
  }
}

spill_status spill_prefetch(void* ptr) {
  Lease lease;
  if (spill_status s = acquire_owner(ptr, "spill_prefetch", lease)) return s;
  try {
    if (Swapper* sw = lease.rt().swapper()) sw->prefetch(ptr);
    else expect_owned(lease, ptr, "spill_prefetch");
    return SPILL_OK;
  } catch (...) {
    return current_error(on_pointer("spill_prefetch", ptr));
  }
}

spill_status spill_evict(void* ptr) {
  Lease lease;
  if (spill_status s = acquire_owner(ptr, "spill_evict", lease)) return s;
  try {
    if (Swapper* sw = lease.rt().swapper()) sw->evict(ptr);
    else expect_owned(lease, ptr, "spill_evict");
    return SPILL_OK;
  } catch (...) {
    return current_error(on_pointer("spill_evict", ptr));
  }
}

spill_status spill_get_residence(const void* ptr, spill_residence* residence) {
  if (residence == nullptr)
    return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_get_residence: residence is NULL");
  Lease lease;
  if (spill_status s = acquire_owner(ptr, "spill_get_residence", lease)) return s;
  try {
    expect_owned(lease, ptr, "spill_get_residence");
    Swapper* sw = lease.rt().swapper();
    const Residence r = sw ? sw->residence(ptr) : Residence::Resident;
    *residence = static_cast<spill_residence>(static_cast<int>(r));
    return SPILL_OK;
  } catch (...) {
    return current_error(on_pointer("spill_get_residence", ptr));
  }
}

// ---- steps

spill_status spill_begin_step(int device, uint64_t scope) {
  Lease lease;
  if (spill_status s = acquire(device, "spill_begin_step", lease)) return s;
  try {
    if (Swapper* sw = lease.rt().swapper()) sw->begin_step(scope);
    return SPILL_OK;
  } catch (...) {
    return current_error("spill_begin_step(device " + std::to_string(device) + ")");
  }
}

spill_status spill_end_step(int device, uint64_t scope) {
  Lease lease;
  if (spill_status s = acquire(device, "spill_end_step", lease)) return s;
  try {
    if (Swapper* sw = lease.rt().swapper()) sw->end_step(scope);
    return SPILL_OK;
  } catch (...) {
    return current_error("spill_end_step(device " + std::to_string(device) + ")");
  }
}

spill_status spill_begin_op(int device, uint64_t scope, const char* name) {
  Lease lease;
  if (spill_status s = acquire(device, "spill_begin_op", lease)) return s;
  try {
    if (Swapper* sw = lease.rt().swapper()) sw->begin_op(name ? name : "", scope);
    return SPILL_OK;
  } catch (...) {
    return current_error("spill_begin_op(device " + std::to_string(device) + ")");
  }
}

spill_status spill_write_step_graph(int device, uint64_t scope, const char* path) {
  if (path == nullptr || *path == '\0')
    return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_write_step_graph: the path is NULL or empty");
  Lease lease;
  if (spill_status s = acquire(device, "spill_write_step_graph", lease)) return s;
  const std::string where = "spill_write_step_graph(device " + std::to_string(device) +
                            ", scope " + std::to_string(scope) + ")";
  try {
    Swapper* sw = lease.rt().swapper();
    graph::Trace trace = sw ? sw->last_trace(scope) : graph::Trace{};
    if (trace.accesses.empty()) {
      return fail(SPILL_ERROR_NOT_FOUND,
                  where + ": no step of this scope was recorded (recording needs policy:plan "
                          "and a budget; the first step after spill_begin_step is recorded)");
    }
    graph::Graph g = graph::graph_from_trace(trace, "recorded step (scope " +
                                                        std::to_string(scope) + ")");
    graph::save_graph_file(g, path);
    return SPILL_OK;
  } catch (const Error&) {
    spill_status s = current_error(where);
    return s == SPILL_ERROR_INTERNAL ? fail(SPILL_ERROR_INVALID_ARGUMENT, last_error_text()) : s;
  } catch (...) {
    return current_error(where);
  }
}

}  // extern "C"

// The C API's residency and steps: set_swappable, pin (stream and host), unpin by token,
// prefetch/evict hints, residence, step scopes, and the recorded step as a graph file.
#include <optional>
#include <string>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "core/utf8.hpp"
#include "graph/graph_json.hpp"
#include "graph/trace.hpp"
#include "integrations/c/c_api_state.hpp"

using namespace spill;
using namespace spill::capi;

namespace {

// With one device alive, acquire_owner does not ask the allocator; without a swapper (policy
// none) nobody else would, so this check names a pointer spill does not know (on_block's
// message names the call).
void expect_owned(Lease& lease, const void* ptr) {
  SPILL_EXPECTS(lease.rt().allocator().owns(ptr),
                format_address(ptr) + " is not inside a block allocated by spill");
}

// The swapper of the runtime holding `ptr`, or nullptr without one (policy none: nothing ever
// moves, but the pointer must still be spill's).
Swapper* swapper_for(Lease& lease, const void* ptr) {
  Swapper* sw = lease.rt().swapper();
  if (sw == nullptr) expect_owned(lease, ptr);
  return sw;
}

spill_status pin_impl(void* ptr, void* stream, spill_pin_token* token, bool host) {
  const char* fn = host ? "spill_pin_for_host" : "spill_pin";
  if (token == nullptr) return fail(SPILL_ERROR_INVALID_ARGUMENT, std::string(fn) + ": token is NULL");
  *token = spill_pin_token{};
  return on_block(ptr, fn, [&](Lease& lease) {
    if (!host && !lease->stream_known(stream)) return bad_stream(fn, stream, lease->ordinal);
    Swapper* sw = swapper_for(lease, ptr);
    if (sw == nullptr) return SPILL_OK;  // nothing ever moves: an empty token
    const PinToken t = host ? sw->pin_for_host(ptr) : sw->pin(ptr, to_stream(stream));
    token->block = t.block;
    token->generation = t.generation;
    token->device = lease->ordinal;
    token->flags = t.host ? SPILL_PIN_HOST : 0u;
    token->pin = t.pin;
    return SPILL_OK;
  });
}

// Hints and steps: the same call on the swapper, a no-op without one.
template <class Call>
spill_status on_swapper_of(void* ptr, const char* fn, Call&& call) {
  return on_block(ptr, fn, [&](Lease& lease) {
    if (Swapper* sw = swapper_for(lease, ptr)) call(*sw);
    return SPILL_OK;
  });
}

template <class Call>
spill_status on_swapper(int device, const char* fn, Call&& call) {
  return on_device(device, fn, [&](Lease& lease) {
    if (Swapper* sw = lease.rt().swapper()) call(*sw);
    return SPILL_OK;
  });
}

}  // namespace

extern "C" {

spill_status spill_set_swappable(void* ptr, int swappable) {
  return on_swapper_of(ptr, "spill_set_swappable",
                       [&](Swapper& sw) { sw.set_swappable(ptr, swappable != 0); });
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
  const bool host = (token->flags & SPILL_PIN_HOST) != 0;
  Lease lease;
  bool no_runtime = false;
  if (spill_status s = acquire(token->device, "spill_unpin", lease, false, &no_runtime)) {
    // The pin that made the token started its device's runtime; none there now means that
    // runtime was shut down since: the token is stale, and its unpin does nothing, as it does
    // once the device has started again (where stale_unpins counts it; audit 41a #1: it was
    // refused until then, so a framework's queued unpins after a re-init failed by call order).
    return no_runtime ? SPILL_OK : s;
  }
  if (!host && !lease->stream_known(stream)) return bad_stream("spill_unpin", stream, token->device);
  try {
    Swapper* sw = lease.rt().swapper();
    SPILL_EXPECTS(sw != nullptr, "spill_unpin: the token is not from this device's runtime");
    PinToken t{static_cast<std::uintptr_t>(token->block), token->generation, host};
    t.pin = token->pin;
    sw->unpin(t, to_stream(stream), wrote != 0);
    return SPILL_OK;
  } catch (...) {
    return current_error(pointer_context("spill_unpin", reinterpret_cast<void*>(token->block)));
  }
}

spill_status spill_prefetch(void* ptr) {
  return on_swapper_of(ptr, "spill_prefetch", [&](Swapper& sw) { sw.prefetch(ptr); });
}

spill_status spill_evict(void* ptr) {
  return on_swapper_of(ptr, "spill_evict", [&](Swapper& sw) {
    sw.evict(ptr);
    sw.reap();  // earlier evictions whose copies have finished give their memory back
  });
}

spill_status spill_discard(void* ptr, size_t bytes) {
  return on_block(ptr, "spill_discard", [&](Lease& lease) {
    const std::optional<BlockInfo> b = lease.rt().allocator().block_info(ptr);
    SPILL_EXPECTS(b, format_address(ptr) + " is not in a block allocated by spill (never "
                                           "allocated, or freed)");
    SPILL_EXPECTS(bytes > 0, "bytes is 0: name the bytes about to be overwritten");
    const auto offset = static_cast<std::size_t>(static_cast<const char*>(ptr) -
                                                 static_cast<const char*>(b->base));
    // (exact byte counts: a range a few bytes too long reads the same in MiB)
    SPILL_EXPECTS(offset < b->requested && bytes <= b->requested - offset,
                  std::to_string(bytes) + " bytes at " + format_address(ptr) +
                      " run past the end of the block at " + format_address(b->base) + " (" +
                      std::to_string(b->requested) + " bytes allocated)");
    // Only the whole allocation's bytes are dead: over a part of it (a tensor made over its
    // first bytes, or inside it) the rest is live, and discarding the whole lost the rest.
    if (offset == 0 && bytes == b->requested)
      if (Swapper* sw = lease.rt().swapper()) sw->discard(ptr);
    return SPILL_OK;
  });
}

spill_status spill_get_residence(const void* ptr, spill_residence* residence) {
  if (residence == nullptr)
    return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_get_residence: residence is NULL");
  return on_block(ptr, "spill_get_residence", [&](Lease& lease) {
    expect_owned(lease, ptr);
    Swapper* sw = lease.rt().swapper();
    const Residence r = sw ? sw->settle(ptr) : Residence::Resident;
    *residence = static_cast<spill_residence>(static_cast<int>(r));
    return SPILL_OK;
  });
}

spill_status spill_get_generation(const void* ptr, uint64_t* generation) {
  if (generation == nullptr)
    return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_get_generation: generation is NULL");
  *generation = 0;
  return on_block(ptr, "spill_get_generation", [&](Lease& lease) {
    expect_owned(lease, ptr);
    if (Swapper* sw = lease.rt().swapper()) *generation = sw->generation(ptr);
    return SPILL_OK;
  });
}

spill_status spill_get_block_info(const void* ptr, spill_block_info* info) {
  if (info == nullptr)
    return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_get_block_info: info is NULL");
  *info = spill_block_info{};
  return on_block(ptr, "spill_get_block_info", [&](Lease& lease) {
    const std::optional<BlockInfo> b = lease.rt().allocator().block_info(ptr);
    SPILL_EXPECTS(b, format_address(ptr) + " is not inside a block allocated by spill");
    info->base = reinterpret_cast<std::uintptr_t>(b->base);
    info->size = b->requested;
    info->residence = SPILL_RESIDENT;
    if (Swapper* sw = lease.rt().swapper())
      if (const std::optional<Swapper::BlockUse> use = sw->use_of(ptr)) {
        info->movable = 1;
        info->residence = static_cast<spill_residence>(static_cast<int>(use->residence));
        info->swappable = use->swappable ? 1 : 0;
        info->pins = use->pins;
        info->generation = use->generation;
      }
    return SPILL_OK;
  });
}

// ---- steps

spill_status spill_begin_step(int device, uint64_t scope) {
  return on_swapper(device, "spill_begin_step", [&](Swapper& sw) { sw.begin_step(scope); });
}

spill_status spill_end_step(int device, uint64_t scope) {
  return on_swapper(device, "spill_end_step", [&](Swapper& sw) { sw.end_step(scope); });
}

spill_status spill_end_scope(int device, uint64_t scope) {
  return on_swapper(device, "spill_end_scope", [&](Swapper& sw) { sw.end_scope(scope); });
}

spill_status spill_begin_op(int device, uint64_t scope, const char* name) {
  return on_device(device, "spill_begin_op", [&](Lease& lease) {
    // Op names go into the step graph's JSON, which refuses bad bytes and strings past 1024
    // bytes (spill plan could not read the graph spill_write_step_graph wrote): cut as block
    // names are, bad bytes refused here, where the caller learns which argument it was (also
    // without a swapper to record them).
    const std::string_view op = kept_name(name, SPILL_MAX_BLOCK_NAME, "name");
    if (Swapper* sw = lease.rt().swapper()) sw->begin_op(op, scope);
    return SPILL_OK;
  });
}

spill_status spill_set_scope(int device, uint64_t scope) {
  return on_swapper(device, "spill_set_scope", [&](Swapper& sw) { sw.set_scope(scope); });
}

spill_status spill_step_key(int device, uint64_t scope, uint64_t key) {
  return on_swapper(device, "spill_step_key", [&](Swapper& sw) { sw.set_step_key(scope, key); });
}

spill_status spill_set_scope_name(int device, uint64_t scope, const char* name) {
  return on_device(device, "spill_set_scope_name", [&](Lease& lease) {
    // Checked without a swapper too: the caller learns of bad text where it is.
    const std::string_view kept = kept_name(name, SPILL_MAX_BLOCK_NAME, "name");
    if (Swapper* sw = lease.rt().swapper()) sw->set_scope_name(scope, kept);
    return SPILL_OK;
  });
}

spill_status spill_write_step_graph(int device, uint64_t scope, const char* path) {
  if (path == nullptr || *path == '\0')
    return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_write_step_graph: the path is NULL or empty");
  const std::string where = "spill_write_step_graph(device " + std::to_string(device) +
                            ", scope " + std::to_string(scope) + ")";
  std::optional<graph::Graph> g;
  const spill_status s = on_device(device, "spill_write_step_graph", [&](Lease& lease) {
    Swapper* sw = lease.rt().swapper();
    graph::Trace trace = sw ? sw->last_trace(scope) : graph::Trace{};
    if (trace.accesses.empty()) {
      return fail(SPILL_ERROR_NOT_FOUND,
                  where + ": no step of this scope was recorded (recording needs policy:plan "
                          "and a budget; the first step after spill_begin_step is recorded)");
    }
    const std::string name = sw->scope_name(scope);
    g = graph::graph_from_trace(
        trace, "recorded step (scope " + std::to_string(scope) + (name.empty() ? "" : ", ") +
                   name + ")");
    return SPILL_OK;
  });
  if (s != SPILL_OK) return s;
  // Written after the lease is given back: a slow file (a FIFO whose reader is late) must not
  // keep spill_shutdown and every other caller of this device waiting.
  try {
    graph::save_graph_file(*g, path);
  } catch (const InvalidArgument& e) {
    return fail(SPILL_ERROR_INVALID_ARGUMENT, where + ": " + e.what());
  } catch (const WriteFailed& e) {  // (named as the refusals are: device and scope)
    return fail(SPILL_ERROR_WRITE_FAILED, where + ": " + e.what());
  } catch (...) {
    return current_error(where);
  }
  return SPILL_OK;
}

}  // extern "C"

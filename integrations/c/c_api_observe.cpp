// The C API's observability: stats (struct and JSON), memory snapshots, trace export, the
// latest OOM message.
#include <algorithm>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>

#include "core/errors.hpp"
#include "core/output_file.hpp"
#include "core/utf8.hpp"
#include "integrations/c/c_api_state.hpp"
#include "profiling/chrome_trace.hpp"
#include "profiling/counters.hpp"
#include "profiling/events.hpp"
#include "profiling/snapshot.hpp"

using namespace spill;
using namespace spill::capi;

namespace {

std::uint64_t u(std::int64_t v) { return v < 0 ? 0 : static_cast<std::uint64_t>(v); }

void put_stat(nlohmann::json& j, const std::string& name, const Stat& s) {
  j[name + ".current"] = u(s.current);
  j[name + ".peak"] = u(s.peak);
  j[name + ".allocated"] = s.allocated;
  j[name + ".freed"] = s.freed;
}

profiling::TagNamer tag_names() {
  return [](std::uint32_t t) { return profiling::TraceRecorder::global().tag_name(t); };
}

// What an export's metadata says about the state when its first event happened: the live
// devices' figures now (the recorder is process-wide, so summed) less what the exported
// events changed, raised where needed so that no counter replays below zero (events recorded
// between the peek and the stats read). Exact when nothing runs during the export. Bytes on
// the host are what CounterReplay counts: blocks evicted and not yet back, i.e. the
// allocator's unbacked bytes plus the swapper's blocks still swapping out.
void put_starting_state(nlohmann::json& meta, const std::vector<profiling::TraceEvent>& events) {
  profiling::MemoryCounters now;
  nlohmann::json budgets = nlohmann::json::object();
  std::uint64_t budget_sum = 0;
  Global& g = global();
  for (int d = 0; d < kMaxDevices; ++d) {
    Lease lease;
    if (!lease.try_take(g.slots[d])) continue;
    Runtime& rt = lease.rt();
    const AllocatorStats a = rt.allocator().stats();
    now.allocated += a.allocated.current;
    now.mapped += a.reserved.current;
    now.host_pinned += a.host_pinned.current;
    std::uint64_t on_host = a.swapped_out_bytes;
    if (Swapper* sw = rt.swapper()) on_host += sw->stats().swapping_out_bytes;
    now.on_host += static_cast<std::int64_t>(on_host);
    budgets[std::to_string(d)] = rt.allocator().budget();
    budget_sum += rt.allocator().budget();
  }
  profiling::CounterReplay delta;  // from zero: the events' changes, and how low each went
  profiling::MemoryCounters low;
  for (const profiling::TraceEvent& e : events) {
    delta.apply(e);
    const profiling::MemoryCounters& c = delta.current();
    low = {std::min(low.allocated, c.allocated), std::min(low.mapped, c.mapped),
           std::min(low.on_host, c.on_host), std::min(low.host_pinned, c.host_pinned)};
  }
  const profiling::MemoryCounters& d = delta.current();
  auto start = [](std::int64_t now_v, std::int64_t delta_v, std::int64_t low_v) {
    return std::max(now_v - delta_v, -low_v);
  };
  meta["baseline"] = {{"allocated", start(now.allocated, d.allocated, low.allocated)},
                      {"mapped", start(now.mapped, d.mapped, low.mapped)},
                      {"on_host", start(now.on_host, d.on_host, low.on_host)},
                      {"host_pinned", start(now.host_pinned, d.host_pinned, low.host_pinned)}};
  if (!budgets.empty()) {
    meta["budget_bytes"] = budget_sum;  // the key spill train writes; summed like the counters
    meta["device_budgets"] = budgets;
  }
}

}  // namespace

extern "C" {

spill_status spill_get_stats(int device, spill_stats* stats) {
  if (stats == nullptr) return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_get_stats: stats is NULL");
  if (stats->struct_size < sizeof(stats->struct_size)) {
    return fail(SPILL_ERROR_INVALID_ARGUMENT,
                "spill_get_stats: struct_size " + std::to_string(stats->struct_size) +
                    " is too small (set it to sizeof(spill_stats))");
  }
  return on_device(device, "spill_get_stats", [&](Lease& lease) {
    Runtime& rt = lease.rt();
    const AllocatorStats a = rt.allocator().stats();
    spill_stats full{};
    full.struct_size = sizeof(spill_stats);
    full.device = device;
    full.simulated = lease->simulated ? 1 : 0;
    full.budget_bytes = rt.allocator().budget();
    full.allocated_bytes = u(a.allocated.current);
    full.allocated_peak_bytes = u(a.allocated.peak);
    full.requested_bytes = u(a.requested.current);
    full.reserved_bytes = u(a.reserved.current);
    full.reserved_peak_bytes = u(a.reserved.peak);
    full.cached_bytes = u(a.cached.current);
    full.swapped_out_bytes = a.swapped_out_bytes;
    full.host_pinned_bytes = u(a.host_pinned.current);
    full.allocations = a.allocations;
    full.frees = a.frees;
    full.cache_hits = a.cache_hits;
    full.ooms = a.ooms;
    if (Swapper* sw = rt.swapper()) {
      const SwapStats s = sw->stats();
      full.swap_out_bytes_total = s.bytes_out;
      full.swap_in_bytes_total = s.bytes_in;
      full.swap_outs = s.swap_outs;
      full.swap_ins = s.swap_ins;
      full.clean_evictions = s.clean_evictions;
      full.prefetches = s.prefetches;
      full.prefetch_hits = s.prefetch_hits;
      full.demand_fetches = s.demand_fetches;
      full.evictions_reactive = s.evictions_reactive;
      full.evictions_planned = s.evictions_planned;
      full.stale_unpins = s.stale_unpins;
      full.pinned_bytes = s.pinned_bytes;
      full.unswappable_bytes = s.unswappable_bytes;
      full.steps_recorded = s.steps_recorded;
      full.steps_planned = s.steps_planned;
      full.deviations = s.deviations;
      full.steps_resynced = s.steps_resynced;
    }
    full.free_errors = lease->torch_free_errors.load();
    full.granularity_bytes = rt.device().granularity();
    full.small_limit_bytes = small_limit_for(rt.config().swap_threshold);
    full.min_movable_bytes = min_movable_request(rt.config().swap_threshold, rt.device().granularity());
    const std::size_t n = std::min(stats->struct_size, sizeof(spill_stats));
    std::memcpy(reinterpret_cast<char*>(stats) + sizeof(size_t),
                reinterpret_cast<const char*>(&full) + sizeof(size_t), n - sizeof(size_t));
    stats->struct_size = n;
    return SPILL_OK;
  });
}

spill_status spill_stats_json(int device, char** json) {
  if (json == nullptr) return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_stats_json: json is NULL");
  *json = nullptr;
  return on_device(device, "spill_stats_json", [&](Lease& lease) {
    Runtime& rt = lease.rt();
    const AllocatorStats a = rt.allocator().stats();
    nlohmann::json j;
    j["device"] = device;
    j["device_name"] = rt.device().info().name;
    j["simulated"] = lease->simulated;
    j["budget_bytes"] = rt.allocator().budget();
    j["granularity_bytes"] = rt.device().granularity();
    j["small_limit_bytes"] = small_limit_for(rt.config().swap_threshold);
    j["min_movable_bytes"] = min_movable_request(rt.config().swap_threshold, rt.device().granularity());
    put_stat(j, "allocated_bytes", a.allocated);
    put_stat(j, "requested_bytes", a.requested);
    put_stat(j, "reserved_bytes", a.reserved);
    put_stat(j, "cached_bytes", a.cached);
    put_stat(j, "host_pinned_bytes", a.host_pinned);
    j["swapped_out_bytes"] = a.swapped_out_bytes;
    j["num_allocs"] = a.allocations;
    j["num_frees"] = a.frees;
    j["num_cache_hits"] = a.cache_hits;
    j["num_segment_maps"] = a.segment_maps;
    j["num_segment_unmaps"] = a.segment_unmaps;
    j["num_gathers"] = a.gathers;
    j["num_splits"] = a.splits;
    j["num_views_reused"] = a.views_reused;
    j["num_ranges_reused"] = a.ranges_reused;
    j["num_cache_releases"] = a.cache_releases;
    j["num_eviction_requests"] = a.eviction_requests;
    j["num_ooms"] = a.ooms;
    j["num_free_errors"] = lease->torch_free_errors.load();
    if (Swapper* sw = rt.swapper()) {
      const SwapStats s = sw->stats();
      j["swap.bytes_out"] = s.bytes_out;
      j["swap.bytes_in"] = s.bytes_in;
      j["swap.swap_outs"] = s.swap_outs;
      j["swap.swap_ins"] = s.swap_ins;
      j["swap.clean_evictions"] = s.clean_evictions;
      j["swap.prefetches"] = s.prefetches;
      j["swap.prefetches_skipped"] = s.prefetches_skipped;
      j["swap.prefetch_hits"] = s.prefetch_hits;
      j["swap.prefetch_late"] = s.prefetch_late;
      j["swap.demand_fetches"] = s.demand_fetches;
      j["swap.evictions_reactive"] = s.evictions_reactive;
      j["swap.evictions_planned"] = s.evictions_planned;
      j["swap.host_wait_s"] = s.host_wait_s;
      j["swap.stall_s"] = s.stall_s;
      j["swap.host_bytes"] = s.host_bytes;
      j["swap.resident_bytes"] = s.resident_bytes;
      j["swap.on_host_bytes"] = s.on_host_bytes;
      j["swap.pinned_bytes"] = s.pinned_bytes;
      j["swap.unswappable_bytes"] = s.unswappable_bytes;
      j["swap.stale_unpins"] = s.stale_unpins;
      j["swap.steps_recorded"] = s.steps_recorded;
      j["swap.steps_planned"] = s.steps_planned;
      j["swap.deviations"] = s.deviations;
      j["swap.steps_resynced"] = s.steps_resynced;
    }
    // The device's virtual-memory calls so far and the host's time in them (the driver's cuMem*
    // on CUDA, this machine's mmap work on the simulated device): what mapping blocks in and
    // out costs the host, per kind, and in all.
    const VmmCalls v = rt.device().vmm_calls();
    const std::pair<const char*, const VmmCalls::Tally*> kinds[] = {
        {"reserve", &v.reserve}, {"create", &v.create},   {"map", &v.map},
        {"unmap", &v.unmap},     {"release", &v.release}, {"unreserve", &v.unreserve}};
    for (const auto& [name, t] : kinds) {
      j[std::string("vmm.") + name + "_calls"] = t->calls;
      j[std::string("vmm.") + name + "_s"] = t->seconds;
    }
    j["vmm.host_s"] = v.seconds();
    return give_string(j.dump(), json, "spill_stats_json");
  });
}

spill_status spill_snapshot_json(int device, char** json) {
  if (json == nullptr) return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_snapshot_json: json is NULL");
  *json = nullptr;
  return on_device(device, "spill_snapshot_json", [&](Lease& lease) {
    const profiling::MemoryState state = lease.rt().allocator().snapshot();
    const nlohmann::json j =
        profiling::to_memory_viz(state, profiling::TraceRecorder::global().peek(), tag_names());
    return give_string(j.dump(), json, "spill_snapshot_json");
  });
}

spill_status spill_trace_export(const char* path) {
  Global& g = global();
  if (g.forked.load()) return forked_error("spill_trace_export");
  if (path == nullptr || *path == '\0')
    return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_trace_export: the path is NULL or empty");
  try {
    // The path first: a path that cannot be written is refused naming it, before any work.
    check_writable(path, "spill_trace_export");
    // The events are taken only once they are written (a full disk keeps them for the next
    // export); one export at a time, so two never write the same events.
    static std::mutex exporting;
    static std::uint64_t dropped_counted = 0;  // the recorder's drops the exports have told
    std::lock_guard lock(exporting);
    auto& rec = profiling::TraceRecorder::global();
    profiling::TraceRecorder::Mark written;
    const std::vector<profiling::TraceEvent> events = rec.peek(&written);
    // Drops counted so far, and those the take will count (rings that overwrote events the
    // previous export had not taken).
    const std::uint64_t dropped = rec.dropped() + written.lost;
    nlohmann::json meta = {{"source", "spill C API"},
                           {"dropped_events", dropped - std::min(dropped, dropped_counted)}};
    put_starting_state(meta, events);
    profiling::write_chrome_trace(path, events, tag_names(), meta, "spill_trace_export");
    rec.take(written);
    dropped_counted = dropped;
    return SPILL_OK;
  } catch (const Error&) {
    spill_status s = current_error("spill_trace_export");
    return s == SPILL_ERROR_INTERNAL ? fail(SPILL_ERROR_INVALID_ARGUMENT, last_error_text()) : s;
  } catch (...) {
    return current_error("spill_trace_export");
  }
}

spill_status spill_last_oom_message(int device, char** message) {
  if (message == nullptr)
    return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_last_oom_message: message is NULL");
  *message = nullptr;
  return on_device(device, "spill_last_oom_message", [&](Lease& lease) {
    return give_string(lease->last_oom(), message, "spill_last_oom_message");
  });
}

spill_status spill_reset_peak_stats(int device) {
  return on_device(device, "spill_reset_peak_stats", [](Lease& lease) {
    lease.rt().allocator().reset_peak();
    return SPILL_OK;
  });
}

spill_status spill_take_allocated_peak(int device, uint64_t* peak_bytes) {
  if (peak_bytes == nullptr)
    return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_take_allocated_peak: peak_bytes is NULL");
  return on_device(device, "spill_take_allocated_peak", [&](Lease& lease) {
    *peak_bytes = lease.rt().allocator().take_allocated_window_peak();
    return SPILL_OK;
  });
}

spill_status spill_set_oom_note(int device, const char* note) {
  return on_device(device, "spill_set_oom_note", [&](Lease& lease) {
    // Cut at a character boundary (the note is text Python decodes), then checked: a note
    // goes back to callers as a string inside every out-of-memory message.
    constexpr std::size_t kMaxNote = 4096;
    const std::string_view text =
        note == nullptr ? std::string_view() : std::string_view(note, strnlen(note, kMaxNote + 1));
    const std::string_view kept = utf8_prefix(text, kMaxNote);
    expect_utf8(kept, "note");
    lease->set_oom_note(std::string(kept));
    return SPILL_OK;
  });
}

}  // extern "C"

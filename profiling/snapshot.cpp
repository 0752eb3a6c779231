#include "profiling/snapshot.hpp"

#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "core/errors.hpp"
#include "core/output_file.hpp"
#include "core/json_read.hpp"

namespace spill::profiling {
namespace {

constexpr int kSnapshotVersion = 1;

// A block's frames, innermost first as memory_viz lists them: its name (what the caller called
// it), where its bytes are, the event's tag.
nlohmann::json frames_for(std::uint32_t tag, bool on_host, const TagNamer& tags,
                          const std::string& name = {}) {
  nlohmann::json frames = nlohmann::json::array();
  if (!name.empty()) frames.push_back({{"filename", "spill"}, {"line", 0}, {"name", name}});
  if (on_host) frames.push_back({{"filename", "spill"}, {"line", 0}, {"name", "[on host]"}});
  if (tag != 0 && tags) {
    std::string name = tags(tag);
    if (!name.empty()) frames.push_back({{"filename", name}, {"line", 0}, {"name", name}});
  }
  return frames;
}

const char* state_name(SnapshotBlock::State s) {
  switch (s) {
    case SnapshotBlock::State::Allocated: return "active_allocated";
    case SnapshotBlock::State::PendingFree: return "active_pending_free";
    case SnapshotBlock::State::Free: return "inactive";
  }
  return "inactive";
}

}  // namespace

nlohmann::json to_memory_viz(const MemoryState& state, const std::vector<TraceEvent>& history,
                             const TagNamer& tags) {
  nlohmann::json segments = nlohmann::json::array();
  for (const SnapshotSegment& seg : state.segments) {
    nlohmann::json blocks = nlohmann::json::array();
    std::uint64_t allocated = 0, active = 0, requested = 0;
    for (const SnapshotBlock& b : seg.blocks) {
      if (b.state == SnapshotBlock::State::Allocated) allocated += b.size, requested += b.requested;
      if (b.state != SnapshotBlock::State::Free) active += b.size;
      blocks.push_back({{"address", b.address},
                        {"size", b.size},
                        {"requested_size", b.requested},
                        {"state", state_name(b.state)},
                        {"frames", frames_for(b.tag, b.on_host, tags, b.name)}});
      if (!b.name.empty()) blocks.back()["name"] = b.name;
    }
    segments.push_back({{"device", state.device},
                        {"address", seg.address},
                        {"total_size", seg.size},
                        {"allocated_size", allocated},
                        {"active_size", active},
                        {"requested_size", requested},
                        {"stream", seg.stream},
                        {"segment_type", seg.large ? "large" : "small"},
                        {"segment_pool_id", {0, 0}},
                        {"is_expandable", seg.large},
                        {"frames", nlohmann::json::array()},
                        {"blocks", blocks}});
  }
  nlohmann::json trace = nlohmann::json::array();
  // Live blocks of the history: the index of their alloc action, and their name once a Name
  // event gave one (it names the alloc action after the fact, and the frees).
  struct AllocAction {
    std::size_t index;  // in `trace`
    std::uint32_t tag;
  };
  std::unordered_map<std::uint64_t, AllocAction> alloc_at;
  std::unordered_map<std::uint64_t, std::string> named;
  // Addresses of blocks allocated at the event being replayed: a Map or Unmap at one is that
  // block's swap in or out, not a segment's birth or end (memory_viz's segment view drops a
  // segment at a segment_alloc's address when it steps back over it, and then finds an
  // allocated block outside every segment). Allocated before the history began: blocks whose
  // first history event is a free, and blocks allocated now that the history never mentions.
  std::unordered_set<std::uint64_t> live;
  {
    std::unordered_set<std::uint64_t> seen;
    for (const TraceEvent& e : history) {
      if (e.device != state.device) continue;
      if (e.kind != EventKind::Alloc && e.kind != EventKind::Free) continue;
      if (seen.insert(e.address).second && e.kind == EventKind::Free) live.insert(e.address);
    }
    for (const SnapshotSegment& seg : state.segments)
      for (const SnapshotBlock& b : seg.blocks)
        if (b.state != SnapshotBlock::State::Free && !seen.count(b.address)) live.insert(b.address);
  }
  auto entry = [&](const char* action, const TraceEvent& e) {
    auto it = named.find(e.address);
    trace.push_back({{"action", action},
                     {"addr", e.address},
                     {"size", e.bytes},
                     {"stream", e.stream},
                     {"time_us", e.time_ns / 1000},
                     {"frames", frames_for(e.tag, false, tags,
                                           it != named.end() ? it->second : std::string())}});
  };
  for (const TraceEvent& e : history) {
    if (e.device != state.device) continue;
    switch (e.kind) {
      case EventKind::Alloc:
        named.erase(e.address);
        alloc_at[e.address] = {trace.size(), e.tag};
        live.insert(e.address);
        entry("alloc", e);
        break;
      case EventKind::Free:
        entry("free_requested", e);
        entry("free_completed", e);
        alloc_at.erase(e.address);
        named.erase(e.address);
        live.erase(e.address);
        break;
      case EventKind::Name: {
        std::string name = e.tag != 0 && tags ? tags(e.tag) : std::string();
        // The alloc action shows the latest name the block had (a clear leaves it).
        auto at = alloc_at.find(e.address);
        if (at != alloc_at.end() && !name.empty()) {
          trace[at->second.index]["frames"] = frames_for(at->second.tag, false, tags, name);
        }
        if (name.empty()) named.erase(e.address);
        else named[e.address] = std::move(name);
        break;
      }
      // A swap is an action memory_viz does not know: listed in its events, left out of what
      // it replays (the block keeps its segment there, as in `segments`).
      case EventKind::Map: entry(live.count(e.address) ? "swap_in" : "segment_alloc", e); break;
      case EventKind::Unmap: entry(live.count(e.address) ? "swap_out" : "segment_free", e); break;
      case EventKind::Oom:
        // torch's memory_viz reads what was free ("... free in CUDA"): under spill, the bytes
        // the budget still had unmapped. The event has no address of its own.
        entry("oom", e);
        trace.back()["addr"] = 0;
        trace.back()["device_free"] = e.address;
        break;
      default: break;
    }
  }
  nlohmann::json device_traces = nlohmann::json::array();
  for (int d = 0; d < state.device; ++d) device_traces.push_back(nlohmann::json::array());
  device_traces.push_back(trace);
  return {{"segments", segments},
          {"device_traces", device_traces},
          {"spill", {{"format", "spill-snapshot"}, {"version", kSnapshotVersion}}}};
}

void write_snapshot(const std::string& path, const MemoryState& state,
                    const std::vector<TraceEvent>& history, const TagNamer& tags) {
  // The text first: a snapshot that cannot be built leaves no file.
  write_file(path, to_memory_viz(state, history, tags).dump() + "\n", "snapshot");
}

nlohmann::json read_snapshot(const std::string& path) {
  std::string origin = "snapshot '" + path + "'";
  nlohmann::json j = parse_json(read_file_text(path, origin), origin);
  const JsonValue top(j, origin);
  auto marker = top.is_object() ? top.find("spill") : std::nullopt;
  expect_format(marker, "spill-snapshot", kSnapshotVersion, origin,
                origin + ": not a spill snapshot" + which_spill_file(j), "version");
  return j;
}

}  // namespace spill::profiling

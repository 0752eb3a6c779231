#include "profiling/chrome_trace.hpp"

#include <fstream>
#include <map>
#include <sstream>

#include "core/errors.hpp"
#include "profiling/counters.hpp"
#include "profiling/json_errors.hpp"

namespace spill::profiling {
namespace {

constexpr int kPid = 1;
constexpr int kTidD2H = 1, kTidH2D = 2, kTidAllocator = 3, kTidFirstStream = 100;

std::string hex(std::uint64_t v) {
  std::ostringstream s;
  s << "0x" << std::hex << v;
  return s.str();
}

bool is_span_kind(EventKind k) {
  return k == EventKind::SwapOut || k == EventKind::SwapIn || k == EventKind::Prefetch ||
         k == EventKind::Stall;
}

int engine_track(EventKind k) {
  if (k == EventKind::SwapOut) return kTidD2H;
  if (k == EventKind::SwapIn || k == EventKind::Prefetch) return kTidH2D;
  return 0;
}

bool allocator_kind(EventKind k) {
  return k == EventKind::Alloc || k == EventKind::Free || k == EventKind::Map ||
         k == EventKind::Unmap || k == EventKind::HostAlloc || k == EventKind::HostFree ||
         k == EventKind::Oom;
}

nlohmann::json thread_name(int tid, const std::string& name, int sort) {
  return {{"ph", "M"}, {"pid", kPid}, {"tid", tid}, {"name", "thread_name"},
          {"args", {{"name", name}}}, {"sort_index", sort}};
}

}  // namespace

nlohmann::json to_chrome_trace(const std::vector<TraceEvent>& events, const TagNamer& tags,
                               const nlohmann::json& metadata) {
  nlohmann::json out = nlohmann::json::array();
  out.push_back({{"ph", "M"}, {"pid", kPid}, {"name", "process_name"},
                 {"args", {{"name", "spill"}}}});
  out.push_back(thread_name(kTidAllocator, "allocator", 0));
  out.push_back(thread_name(kTidH2D, "H2D copy engine (swap-in, prefetch)", 1));
  out.push_back(thread_name(kTidD2H, "D2H copy engine (swap-out)", 2));
  std::map<std::uint64_t, int> stream_tids;
  std::map<std::uint32_t, std::string> used_tags;
  CounterReplay counters;
  for (const TraceEvent& e : events) {
    int tid;
    if (allocator_kind(e.kind)) {
      tid = kTidAllocator;
    } else if (int engine = engine_track(e.kind)) {
      tid = engine;
    } else {
      auto [it, fresh] = stream_tids.emplace(e.stream, kTidFirstStream + static_cast<int>(stream_tids.size()));
      tid = it->second;
      if (fresh) {
        out.push_back(thread_name(tid, e.stream ? "stream " + hex(e.stream) : "default stream",
                                  10 + tid));
      }
    }
    std::string name = to_string(e.kind);
    if (e.tag != 0 && tags) {
      auto [it, fresh] = used_tags.emplace(e.tag, std::string());
      if (fresh) it->second = tags(e.tag);
      if (!it->second.empty()) name += " " + it->second;
    }
    nlohmann::json ev = {{"name", name},
                         {"cat", to_string(e.kind)},
                         {"pid", kPid},
                         {"tid", tid},
                         {"ts", static_cast<double>(e.time_ns) / 1e3},
                         {"args",
                          {{"kind", to_string(e.kind)},
                           {"addr", hex(e.address)},
                           {"bytes", e.bytes},
                           {"stream", hex(e.stream)},
                           {"device", e.device},
                           {"tag", e.tag},
                           {"thread", e.thread},
                           {"time_ns", e.time_ns},
                           {"duration_ns", e.duration_ns}}}};
    if (is_span_kind(e.kind) || e.duration_ns > 0) {
      ev["ph"] = "X";
      ev["dur"] = static_cast<double>(e.duration_ns) / 1e3;
    } else {
      ev["ph"] = "i";
      ev["s"] = "t";
    }
    out.push_back(std::move(ev));
    if (counters.apply(e)) {
      const MemoryCounters& c = counters.current();
      out.push_back({{"ph", "C"}, {"pid", kPid}, {"name", "memory (bytes)"},
                     {"ts", static_cast<double>(e.time_ns + e.duration_ns) / 1e3},
                     {"args", {{"allocated", c.allocated}, {"mapped", c.mapped},
                               {"on_host", c.on_host}, {"host_pinned", c.host_pinned}}}});
    }
  }
  nlohmann::json tag_table = nlohmann::json::object();
  for (auto& [id, n] : used_tags) tag_table[std::to_string(id)] = n;
  return {{"traceEvents", out},
          {"displayTimeUnit", "ns"},
          {"otherData",
           {{"format", "spill-trace"},
            {"version", kTraceFormatVersion},
            {"tags", tag_table},
            {"metadata", metadata}}}};
}

void write_chrome_trace(const std::string& path, const std::vector<TraceEvent>& events,
                        const TagNamer& tags, const nlohmann::json& metadata) {
  std::ofstream out(path, std::ios::binary);
  if (!out) throw Error("trace: cannot open '" + path + "' for writing");
  out << to_chrome_trace(events, tags, metadata).dump();
  out.close();
  if (!out) throw Error("trace: writing '" + path + "' failed (disk full?)");
}

namespace {

EventKind kind_from(const std::string& name, const std::string& origin, std::size_t index) {
  for (int k = 0; k < kEventKindCount; ++k) {
    if (name == to_string(static_cast<EventKind>(k))) return static_cast<EventKind>(k);
  }
  throw InvalidArgument(origin + ": traceEvents[" + std::to_string(index) +
                        "] has unknown kind '" + name + "'");
}

std::uint64_t from_hex(const nlohmann::json& v, const std::string& what) {
  try {
    return std::stoull(v.get<std::string>(), nullptr, 16);
  } catch (const std::exception&) {
    throw InvalidArgument(what + " is not a hex number");
  }
}

}  // namespace

ParsedTrace parse_chrome_trace(const std::string& text, const std::string& origin) {
  nlohmann::json j = parse_json_file_text(text, origin);
  SPILL_EXPECTS(j.is_object() && j.contains("traceEvents") && j.contains("otherData") &&
                    j["otherData"].value("format", "") == "spill-trace",
                origin + ": not a spill trace (no otherData.format = \"spill-trace\")");
  int version = j["otherData"].value("version", 0);
  SPILL_EXPECTS(version == kTraceFormatVersion,
                origin + ": trace format version " + std::to_string(version) +
                    " is not supported (this spill reads version " +
                    std::to_string(kTraceFormatVersion) + ")");
  ParsedTrace t;
  t.metadata = j["otherData"].value("metadata", nlohmann::json::object());
  const auto& tag_table = j["otherData"].value("tags", nlohmann::json::object());
  for (auto& [id, name] : tag_table.items()) {
    std::size_t i = std::stoul(id);
    if (t.tag_names.size() <= i) t.tag_names.resize(i + 1);
    t.tag_names[i] = name.get<std::string>();
  }
  const auto& evs = j["traceEvents"];
  SPILL_EXPECTS(evs.is_array(), origin + ": traceEvents is not an array");
  for (std::size_t i = 0; i < evs.size(); ++i) {
    const auto& ev = evs[i];
    if (!ev.is_object() || !ev.contains("args") || !ev["args"].contains("kind")) continue;
    const auto& a = ev["args"];
    std::string where = origin + ": traceEvents[" + std::to_string(i) + "]";
    try {
      TraceEvent e;
      e.kind = kind_from(a["kind"].get<std::string>(), origin, i);
      e.address = from_hex(a.at("addr"), where + ".args.addr");
      e.stream = from_hex(a.at("stream"), where + ".args.stream");
      e.bytes = a.at("bytes").get<std::uint64_t>();
      e.device = a.value("device", 0);
      e.tag = a.value("tag", 0u);
      e.thread = a.value("thread", 0u);
      e.time_ns = a.at("time_ns").get<std::uint64_t>();
      e.duration_ns = a.value("duration_ns", std::uint64_t{0});
      t.events.push_back(e);
    } catch (const nlohmann::json::exception& ex) {
      throw InvalidArgument(where + ": missing or malformed field (" + ex.what() + ")");
    }
  }
  return t;
}

ParsedTrace read_chrome_trace(const std::string& path) {
  std::string origin = "trace '" + path + "'";
  return parse_chrome_trace(read_text_file(path, origin), origin);
}

}  // namespace spill::profiling

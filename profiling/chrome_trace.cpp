#include "profiling/chrome_trace.hpp"

#include <charconv>
#include <cstdio>
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

// Appends JSON text directly: building nlohmann objects per event is ~100x slower, and a
// training step can record millions of events.
class Writer {
 public:
  explicit Writer(std::string& out) : out_(out) {}
  Writer& raw(std::string_view s) {
    out_ += s;
    return *this;
  }
  Writer& str(std::string_view s) {
    out_ += '"';
    for (char c : s) {
      if (c == '"' || c == '\\') {
        out_ += '\\';
        out_ += c;
      } else if (static_cast<unsigned char>(c) < 0x20) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\u%04x", c);
        out_ += buf;
      } else {
        out_ += c;
      }
    }
    out_ += '"';
    return *this;
  }
  template <class T>
  Writer& num(T v) {
    char buf[32];
    auto res = std::to_chars(buf, buf + sizeof buf, v);
    out_.append(buf, res.ptr);
    return *this;
  }
  Writer& micros(std::uint64_t ns) {  // ns as microseconds with 3 decimals, exactly
    num(ns / 1000);
    char buf[8];
    std::snprintf(buf, sizeof buf, ".%03u", static_cast<unsigned>(ns % 1000));
    out_ += buf;
    return *this;
  }
  Writer& hex(std::uint64_t v) {
    char buf[24];
    buf[0] = '"', buf[1] = '0', buf[2] = 'x';
    auto res = std::to_chars(buf + 3, buf + sizeof buf - 1, v, 16);
    *res.ptr = '"';
    out_.append(buf, res.ptr + 1);
    return *this;
  }

 private:
  std::string& out_;
};

void thread_name(Writer& w, int tid, const std::string& name, int sort) {
  w.raw(",\n{\"ph\":\"M\",\"pid\":").num(kPid).raw(",\"tid\":").num(tid);
  w.raw(",\"name\":\"thread_name\",\"args\":{\"name\":").str(name);
  w.raw("}},\n{\"ph\":\"M\",\"pid\":").num(kPid).raw(",\"tid\":").num(tid);
  w.raw(",\"name\":\"thread_sort_index\",\"args\":{\"sort_index\":").num(sort).raw("}}");
}

}  // namespace

std::string chrome_trace_text(const std::vector<TraceEvent>& events, const TagNamer& tags,
                              const nlohmann::json& metadata) {
  std::string text;
  text.reserve(events.size() * 300 + 4096);
  Writer w(text);
  w.raw("{\"traceEvents\":[\n{\"ph\":\"M\",\"pid\":").num(kPid);
  w.raw(",\"name\":\"process_name\",\"args\":{\"name\":\"spill\"}}");
  thread_name(w, kTidAllocator, "allocator", 0);
  thread_name(w, kTidH2D, "H2D copy engine (swap-in, prefetch)", 1);
  thread_name(w, kTidD2H, "D2H copy engine (swap-out)", 2);
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
      auto [it, fresh] =
          stream_tids.emplace(e.stream, kTidFirstStream + static_cast<int>(stream_tids.size()));
      tid = it->second;
      if (fresh) {
        std::string name = "default stream";
        if (e.stream == kHostStream) {
          name = "host (swapper hints and waits)";
        } else if (e.stream) {
          std::string h;
          Writer(h).hex(e.stream);
          name = "stream " + h.substr(1, h.size() - 2);
        }
        thread_name(w, tid, name, 10 + tid);
      }
    }
    const char* kind = to_string(e.kind);
    const std::string* tag_name = nullptr;
    if (e.tag != 0 && tags) {
      auto [it, fresh] = used_tags.emplace(e.tag, std::string());
      if (fresh) it->second = tags(e.tag);
      if (!it->second.empty()) tag_name = &it->second;
    }
    w.raw(",\n{\"name\":");
    if (tag_name) w.str(std::string(kind) + " " + *tag_name);
    else w.str(kind);
    w.raw(",\"cat\":").str(kind).raw(",\"pid\":").num(kPid).raw(",\"tid\":").num(tid);
    w.raw(",\"ts\":").micros(e.time_ns);
    if (is_span_kind(e.kind) || e.duration_ns > 0) {
      w.raw(",\"ph\":\"X\",\"dur\":").micros(e.duration_ns);
    } else {
      w.raw(",\"ph\":\"i\",\"s\":\"t\"");
    }
    w.raw(",\"args\":{\"kind\":").str(kind).raw(",\"addr\":").hex(e.address);
    w.raw(",\"bytes\":").num(e.bytes).raw(",\"stream\":").hex(e.stream);
    w.raw(",\"device\":").num(e.device).raw(",\"tag\":").num(e.tag);
    w.raw(",\"thread\":").num(e.thread).raw(",\"time_ns\":").num(e.time_ns);
    w.raw(",\"duration_ns\":").num(e.duration_ns).raw("}}");
    if (counters.apply(e)) {
      const MemoryCounters& c = counters.current();
      w.raw(",\n{\"ph\":\"C\",\"pid\":").num(kPid).raw(",\"name\":\"memory (bytes)\",\"ts\":");
      w.micros(e.time_ns + e.duration_ns).raw(",\"args\":{\"allocated\":").num(c.allocated);
      w.raw(",\"mapped\":").num(c.mapped).raw(",\"on_host\":").num(c.on_host);
      w.raw(",\"host_pinned\":").num(c.host_pinned).raw("}}");
    }
  }
  nlohmann::json tag_table = nlohmann::json::object();
  for (auto& [id, n] : used_tags) tag_table[std::to_string(id)] = n;
  nlohmann::json other = {{"format", "spill-trace"},
                          {"version", kTraceFormatVersion},
                          {"tags", tag_table},
                          {"metadata", metadata}};
  w.raw("\n],\"displayTimeUnit\":\"ns\",\"otherData\":").raw(other.dump()).raw("}\n");
  return text;
}

nlohmann::json to_chrome_trace(const std::vector<TraceEvent>& events, const TagNamer& tags,
                               const nlohmann::json& metadata) {
  return nlohmann::json::parse(chrome_trace_text(events, tags, metadata));
}

void write_chrome_trace(const std::string& path, const std::vector<TraceEvent>& events,
                        const TagNamer& tags, const nlohmann::json& metadata) {
  std::ofstream out(path, std::ios::binary);
  if (!out) throw Error("trace: cannot open '" + path + "' for writing");
  out << chrome_trace_text(events, tags, metadata);
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

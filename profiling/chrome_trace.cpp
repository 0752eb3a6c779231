#include "profiling/chrome_trace.hpp"

#include <charconv>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "core/json_read.hpp"
#include "profiling/counters.hpp"

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
                          {"clock", TraceRecorder::clock_name()},
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

EventKind kind_from(const JsonValue& v) {
  const std::string name = v.as_string(64);
  for (int k = 0; k < kEventKindCount; ++k) {
    if (name == to_string(static_cast<EventKind>(k))) return static_cast<EventKind>(k);
  }
  v.fail("unknown event kind");
}

// "0x" and 1 to 16 hex digits, as the writer puts addresses and streams.
std::uint64_t from_hex(const JsonValue& v) {
  const std::string s = v.as_string(64);
  std::uint64_t n = 0;
  const char* end = s.data() + s.size();
  if (s.size() < 3 || s.size() > 18 || s[0] != '0' || (s[1] != 'x' && s[1] != 'X') ||
      std::from_chars(s.data() + 2, end, n, 16).ptr != end)
    v.fail("must be a hex number such as \"0x7f00\" (at most 16 digits)");
  return n;
}

// A tag table key: a decimal tag id in [1, 2^32 - 1].
std::uint32_t tag_id(const JsonValue& table, const std::string& key) {
  std::uint32_t id = 0;
  const char* end = key.data() + key.size();
  auto [ptr, ec] = std::from_chars(key.data(), end, id);
  if (key.empty() || ec != std::errc() || ptr != end || id == 0)
    table.fail_field(key, "a tag id must be a decimal integer in [1, 4294967295]");
  return id;
}

}  // namespace

ParsedTrace parse_chrome_trace(const std::string& text, const std::string& origin) {
  nlohmann::json j = parse_json(text, origin);
  const JsonValue top(j, origin);
  std::optional<JsonValue> other;
  if (top.is_object() && top.has("traceEvents")) other = top.find("otherData");
  auto format = other && other->is_object() ? other->find("format") : std::nullopt;
  SPILL_EXPECTS(format && format->raw() == "spill-trace",
                origin + ": not a spill trace (no otherData.format = \"spill-trace\")");
  const std::uint64_t version = other->uint_field("version", 0, UINT64_MAX, 0);
  SPILL_EXPECTS(version == kTraceFormatVersion,
                origin + ": trace format version " + std::to_string(version) +
                    " is not supported (this spill reads version " +
                    std::to_string(kTraceFormatVersion) + ")");
  ParsedTrace t;
  t.clock = other->string_field("clock", std::string(), 256);
  if (auto meta = other->find("metadata")) t.metadata = meta->expect_object().raw();
  else t.metadata = nlohmann::json::object();
  if (auto tags = other->find("tags")) {
    tags->expect_object();
    for (auto& [key, name] : tags->raw().items()) {
      std::uint32_t id = tag_id(*tags, key);
      t.tag_names[id] = tags->at(key).as_string(kMaxTagName);
    }
  }
  const JsonValue evs = top.at("traceEvents");
  const std::size_t n = evs.size();
  std::vector<std::size_t> index;  // traceEvents index of each event kept
  CounterReplay replay;            // checks that the memory counters stay in range
  for (std::size_t i = 0; i < n; ++i) {
    const JsonValue ev = evs.at(i);
    // Chrome's own records (thread names, counters) carry no spill kind.
    if (!ev.is_object() || !ev.has("args") || !ev.at("args").is_object() ||
        !ev.at("args").has("kind"))
      continue;
    const JsonValue a = ev.at("args");
    TraceEvent e;
    e.kind = kind_from(a.at("kind"));
    e.address = from_hex(a.at("addr"));
    e.stream = from_hex(a.at("stream"));
    e.bytes = a.uint_field("bytes", 0, kMaxBytes);
    e.device = static_cast<std::int32_t>(a.int_field("device", -(1 << 23), (1 << 23) - 1, 0));
    e.tag = static_cast<std::uint32_t>(a.uint_field("tag", 0, UINT32_MAX, 0));
    e.thread = static_cast<std::uint32_t>(a.uint_field("thread", 0, UINT32_MAX, 0));
    e.time_ns = a.uint_field("time_ns", 0, kMaxBytes);
    e.duration_ns = a.uint_field("duration_ns", 0, kMaxBytes, 0);
    if (!add_within(e.time_ns, e.duration_ns))
      a.fail_field("duration_ns", "time_ns + duration_ns passes 2^63 - 1 ns");
    try {
      replay.apply(e);
    } catch (const InvalidArgument& ex) {
      throw InvalidArgument(ev.where() + ": " + ex.what());
    }
    t.events.push_back(e);
  }
  return t;
}

ParsedTrace read_chrome_trace(const std::string& path) {
  std::string origin = "trace '" + path + "'";
  return parse_chrome_trace(read_file_text(path, origin), origin);
}

}  // namespace spill::profiling

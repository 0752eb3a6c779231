// Writing a trace (chrome_trace_text, write_chrome_trace); reading one back is trace_read.cpp.
#include "profiling/chrome_trace.hpp"

#include <charconv>
#include <cstdio>
#include <map>

#include "core/errors.hpp"
#include "core/output_file.hpp"
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
         k == EventKind::FreeOnHost || k == EventKind::Oom;
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
  // The counter track starts from the baseline a mid-run export gives (metadata.baseline).
  MemoryCounters start;
  if (metadata.is_object() && metadata.contains("baseline") && metadata["baseline"].is_object()) {
    const nlohmann::json& b = metadata["baseline"];
    auto get = [&b](const char* k) {
      return b.contains(k) && b[k].is_number_integer() ? b[k].get<std::int64_t>() : 0;
    };
    start = {get("allocated"), get("mapped"), get("on_host"), get("host_pinned")};
  }
  CounterReplay counters(start);
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

nlohmann::json zero_baseline() {
  return {{"allocated", 0}, {"mapped", 0}, {"on_host", 0}, {"host_pinned", 0}};
}

void write_chrome_trace(const std::string& path, const std::vector<TraceEvent>& events,
                        const TagNamer& tags, const nlohmann::json& metadata,
                        std::string_view what) {
  // The text first: a trace that cannot be built leaves no file.
  write_file(path, chrome_trace_text(events, tags, metadata), what);
}

}  // namespace spill::profiling

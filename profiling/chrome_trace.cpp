#include "profiling/chrome_trace.hpp"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "core/json_read.hpp"
#include "profiling/counters.hpp"

namespace spill::profiling {
namespace {

constexpr int kPid = 1;

std::string hex_address(std::uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}
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

// metadata.baseline, dropped_events and budget_bytes, checked (named by their JSON paths).
void read_metadata(const JsonValue& meta, ParsedTrace& t) {
  if (auto b = meta.find("baseline")) {
    b->expect_object();
    t.has_baseline = true;
    auto counter = [&](const char* key) {
      return static_cast<std::int64_t>(b->uint_field(key, 0, kMaxBytes, 0));
    };
    t.baseline = {counter("allocated"), counter("mapped"), counter("on_host"),
                  counter("host_pinned")};
  }
  t.dropped_events = meta.uint_field("dropped_events", 0, UINT64_MAX, 0);
  if (meta.has("budget_bytes")) t.budget_bytes = meta.uint_field("budget_bytes", 0, kMaxBytes);
}

// Events by time, stably: the file's order is not trusted (a writer from elsewhere, or edits).
void order_by_time(ParsedTrace& t) {
  std::vector<std::size_t> order(t.events.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return t.events[a].time_ns < t.events[b].time_ns;
  });
  std::vector<TraceEvent> events(order.size());
  std::vector<std::size_t> index(order.size());
  for (std::size_t i = 0; i < order.size(); ++i) {
    events[i] = t.events[order[i]];
    index[i] = t.source_index[order[i]];
  }
  t.events = std::move(events);
  t.source_index = std::move(index);
}

// What the events mean: times within kMaxTraceSpanNs of the first, counters that stay within
// range and, from the baseline, non-negative (without one: the least baseline that keeps them
// so, inferred), and in a complete trace frees and swaps of blocks it allocated.
void check_meaning(ParsedTrace& t, const std::string& origin) {
  auto name = [&](std::size_t i) {
    return origin + ": traceEvents[" + std::to_string(t.source_index[i]) + "] (" +
           to_string(t.events[i].kind) + " at " + std::to_string(t.events[i].time_ns) + " ns)";
  };
  if (t.events.empty()) return;
  const std::uint64_t first = t.events.front().time_ns;
  for (std::size_t i = 0; i < t.events.size(); ++i) {
    const TraceEvent& e = t.events[i];
    if (e.time_ns + e.duration_ns - first > kMaxTraceSpanNs)
      throw InvalidArgument(name(i) + ": ends more than 30 days after the trace's first event (" +
                            std::to_string(first) + " ns): not a time this trace can hold");
  }
  const bool complete = t.complete();
  CounterReplay replay(t.baseline);
  MemoryCounters low = t.baseline;  // each counter's lowest value
  std::unordered_map<std::uint64_t, std::uint64_t> live;  // complete traces: address -> bytes
  std::unordered_set<std::uint64_t> freed;
  for (std::size_t i = 0; i < t.events.size(); ++i) {
    const TraceEvent& e = t.events[i];
    if (complete) {
      const bool is_live = live.count(e.address) != 0;
      switch (e.kind) {
        case EventKind::Alloc:
          live[e.address] = e.bytes;
          freed.erase(e.address);
          break;
        case EventKind::Free:
          if (!is_live)
            throw InvalidArgument(
                name(i) + ": frees " + (freed.count(e.address) ? "again a block already freed"
                                                               : "a block the trace never allocated") +
                " at " + hex_address(e.address) +
                " (the trace is complete: its baseline has nothing allocated and it dropped "
                "no events)");
          live.erase(e.address);
          freed.insert(e.address);
          break;
        case EventKind::SwapOut:
        case EventKind::Evict:
        case EventKind::SwapIn:
          // A copy's slice may sort after its block's free (the simulated clock): freed is fine.
          if (!is_live && !freed.count(e.address))
            throw InvalidArgument(name(i) + ": moves a block the trace never allocated at " +
                                  hex_address(e.address) +
                                  " (the trace is complete: its baseline has nothing allocated "
                                  "and it dropped no events)");
          break;
        default: break;
      }
    }
    try {
      replay.apply(e);
    } catch (const InvalidArgument& ex) {
      throw InvalidArgument(name(i) + ": " + ex.what());
    }
    const MemoryCounters& c = replay.current();
    const std::pair<const char*, std::int64_t> now[] = {{"allocated bytes", c.allocated},
                                                        {"mapped bytes", c.mapped},
                                                        {"bytes on host", c.on_host},
                                                        {"pinned host bytes", c.host_pinned}};
    if (t.has_baseline) {
      for (auto& [what, v] : now)
        if (v < 0)
          throw InvalidArgument(name(i) + ": " + what + " go below zero (" + std::to_string(v) +
                                ") from the trace's baseline: the trace contradicts itself");
    }
    low.allocated = std::min(low.allocated, c.allocated);
    low.mapped = std::min(low.mapped, c.mapped);
    low.on_host = std::min(low.on_host, c.on_host);
    low.host_pinned = std::min(low.host_pinned, c.host_pinned);
  }
  if (!t.has_baseline) {
    // Without a baseline (an older trace, or another tool's), events that free what the trace
    // never saw mean it began mid-run: start from the least baseline that keeps every counter
    // non-negative, and say the figures are lower bounds.
    auto neg = [&](std::int64_t v) {
      SPILL_EXPECTS(v > std::numeric_limits<std::int64_t>::min(),
                    origin + ": a memory counter goes down by 2^63 bytes");
      return -v;
    };
    MemoryCounters b{neg(low.allocated), neg(low.mapped), neg(low.on_host), neg(low.host_pinned)};
    if (b == MemoryCounters{}) return;
    t.baseline = b;
    t.baseline_inferred = true;
    CounterReplay from(b);  // the counters from there must stay within range too
    for (std::size_t i = 0; i < t.events.size(); ++i) {
      try {
        from.apply(t.events[i]);
      } catch (const InvalidArgument& ex) {
        throw InvalidArgument(name(i) + ": " + ex.what());
      }
    }
  }
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
  if (auto m = other->find("metadata")) t.metadata = m->expect_object().raw();
  else t.metadata = nlohmann::json::object();
  if (auto tags = other->find("tags")) {
    tags->expect_object();
    for (auto& [key, name] : tags->raw().items()) {
      std::uint32_t id = tag_id(*tags, key);
      t.tag_names[id] = tags->at(key).as_string(kMaxTagName);
    }
  }
  std::optional<JsonValue> meta = other->find("metadata");
  if (meta) read_metadata(*meta, t);
  const JsonValue evs = top.at("traceEvents");
  const std::size_t n = evs.size();
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
    t.events.push_back(e);
    t.source_index.push_back(i);
  }
  order_by_time(t);
  check_meaning(t, origin);
  return t;
}

ParsedTrace read_chrome_trace(const std::string& path) {
  std::string origin = "trace '" + path + "'";
  return parse_chrome_trace(read_file_text(path, origin), origin);
}

}  // namespace spill::profiling

// Reading a spill trace back (read_chrome_trace, parse_chrome_trace) as a stream: the document
// is parsed through a SAX handler that keeps everything but the traceEvents items, and builds
// each item alone and turns it into a TraceEvent at once, so memory follows the events kept
// (about 64 bytes each), not the text or a document of it. The checks are those of a whole
// document, in the same order: syntax, then otherData, then the events by index, then what the
// events mean.
#include <algorithm>
#include <charconv>
#include <cstdio>
#include <exception>
#include <limits>
#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "core/json_read.hpp"
#include "core/json_sax.hpp"
#include "profiling/chrome_trace.hpp"
#include "profiling/counters.hpp"

namespace spill::profiling {
namespace {

std::string hex_address(std::uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

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
  // The largest block ever allocated at each address: a move copies its block, and a slice may
  // sort after its block's free, even after another block's alloc at that address.
  std::unordered_map<std::uint64_t, std::uint64_t> largest;
  // The blocks allocated at the time of the events being checked, and where that time's events
  // end: events of one time from different threads sort in no causal order (the simulated
  // clock gives a copy's slice the time of its block's allocation), so a swap may come before
  // its block's alloc at the same time.
  std::unordered_map<std::uint64_t, std::uint64_t> allocated_then;  // address -> largest bytes
  std::size_t group_end = 0;
  auto block_bytes = [&](std::uint64_t address) {
    std::uint64_t bytes = 0;
    for (const auto* m : {&largest, &allocated_then})
      if (auto it = m->find(address); it != m->end()) bytes = std::max(bytes, it->second);
    return bytes;
  };
  for (std::size_t i = 0; i < t.events.size(); ++i) {
    const TraceEvent& e = t.events[i];
    if (complete && i >= group_end) {
      allocated_then.clear();
      for (group_end = i; group_end < t.events.size() &&
                          t.events[group_end].time_ns == e.time_ns;
           ++group_end)
        if (const TraceEvent& a = t.events[group_end]; a.kind == EventKind::Alloc)
          allocated_then[a.address] = std::max(allocated_then[a.address], a.bytes);
    }
    if (complete) {
      const bool is_live = live.count(e.address) != 0;
      switch (e.kind) {
        case EventKind::Alloc:
          live[e.address] = e.bytes;
          largest[e.address] = std::max(largest[e.address], e.bytes);
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
        case EventKind::FreeOnHost:
          // A copy's slice may sort after its block's free, or before its alloc at the same
          // time (the simulated clock): either is fine.
          if (!is_live && !freed.count(e.address) && !allocated_then.count(e.address))
            throw InvalidArgument(name(i) + ": moves a block the trace never allocated at " +
                                  hex_address(e.address) +
                                  " (the trace is complete: its baseline has nothing allocated "
                                  "and it dropped no events)");
          // A move larger than its block: a 1000x swap-out gave "1.34 TiB copied to the host"
          // with 866 MiB allocated (audit 41b #11).
          if (e.bytes > block_bytes(e.address))
            throw InvalidArgument(name(i) + ": moves " + std::to_string(e.bytes) +
                                  " bytes of the block at " + hex_address(e.address) +
                                  ", which has " + std::to_string(block_bytes(e.address)) +
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


// A spill event from the args of a traceEvents item (one with a kind: Chrome's own records,
// thread names and counters, carry none).
TraceEvent event_from(const JsonValue& a) {
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
  return e;
}

// The SAX handler. Outside the top-level traceEvents array every value goes to `skeleton` (that
// array itself stays there, empty). Its items are read one at a time: an object item's keys are
// checked for duplicates as they come, its args value is built as a document and its other
// values (Chrome's names and times) are checked and dropped; then the item is an event or
// nothing, at once. An item that is not an object is built, checked and dropped. Nesting is
// bounded as in the whole document (an item sits two levels down). The first item that does
// not read is kept and thrown after the parse by finish(), so a syntax error later in the file,
// or a file that is not a spill trace, is still what is said first, as when the document was
// read whole.
class TraceSax final : public JsonSaxHandler {
 public:
  TraceSax(const std::string& origin, int max_depth)
      : origin_(std::make_shared<const std::string>(origin)),
        max_depth_(max_depth),
        top_(skeleton, max_depth),
        value_(value_root_, max_depth - 3),
        other_(other_root_, max_depth - 2) {}

  nlohmann::json skeleton;
  bool streamed = false;  // traceEvents was an array, read item by item
  std::vector<TraceEvent> events;
  std::vector<std::size_t> index;  // traceEvents index of each event
  std::exception_ptr item_error;   // the first item that did not read

  bool null() override { return scalar([](JsonDomBuilder& b) { return b.null(); }); }
  bool boolean(bool v) override { return scalar([v](JsonDomBuilder& b) { return b.boolean(v); }); }
  bool number_integer(number_integer_t v) override {
    return scalar([v](JsonDomBuilder& b) { return b.number_integer(v); });
  }
  bool number_unsigned(number_unsigned_t v) override {
    return scalar([v](JsonDomBuilder& b) { return b.number_unsigned(v); });
  }
  bool number_float(number_float_t v, const string_t& s) override {
    return scalar([&](JsonDomBuilder& b) { return b.number_float(v, s); });
  }
  bool string(string_t& v) override {
    return scalar([&](JsonDomBuilder& b) { return b.string(v); });
  }
  bool binary(binary_t& v) override {
    return scalar([&](JsonDomBuilder& b) { return b.binary(v); });
  }
  bool start_object(std::size_t n) override { return open(false, n); }
  bool start_array(std::size_t n) override { return open(true, n); }
  bool end_object() override { return close(false); }
  bool end_array() override { return close(true); }

  bool key(string_t& k) override {
    if (!in_items_) {
      events_next_ = top_.depth() == 1 && k == "traceEvents";
      return check(top_, top_.key(k));
    }
    if (other_on_) return check(other_, other_.key(k));
    if (value_on_) return check(value_, value_.key(k));
    if (seen_before(k)) {  // a key of the item itself
      stop.duplicate = k.substr(0, 64);
      return false;
    }
    key_is_args_ = k == "args";
    return true;
  }

 private:
  template <class F>
  bool scalar(F put) {
    if (!in_items_) {
      events_next_ = false;
      return check(top_, put(top_));
    }
    if (other_on_) return check(other_, put(other_));
    if (value_on_) return check(value_, put(value_));
    if (item_on_) {
      if (key_is_args_) has_args_ = true, args_ = nullptr;  // args that are not an object
      return true;
    }
    ++item_count_;  // an item that is a number or a string: not an event
    return true;
  }

  bool open(bool array, std::size_t n) {
    auto start = [&](JsonDomBuilder& b) {
      return check(b, array ? b.start_array(n) : b.start_object(n));
    };
    if (!in_items_) {
      const bool items_begin = array && events_next_;
      events_next_ = false;
      if (!start(top_)) return false;
      in_items_ = items_begin;
      return true;
    }
    if (other_on_) return start(other_);
    if (value_on_) return start(value_);
    if (item_on_) {  // a value of the item
      value_.reset();
      value_on_ = true;
      return start(value_);
    }
    if (array) {  // an item that is an array: not an event
      other_.reset();
      other_on_ = true;
      return start(other_);
    }
    if (max_depth_ <= 2) {
      stop.too_deep = true;
      return false;
    }
    item_on_ = true;
    keys_.clear();
    key_set_.clear();
    has_args_ = key_is_args_ = false;
    args_ = nullptr;
    return true;
  }

  bool close(bool array) {
    auto end = [&](JsonDomBuilder& b) { return check(b, array ? b.end_array() : b.end_object()); };
    if (!in_items_) return end(top_);
    if (other_on_) {
      end(other_);
      if (other_.depth() == 0) other_on_ = false, ++item_count_;
      return true;
    }
    if (value_on_) {
      end(value_);
      if (value_.depth() == 0) {
        value_on_ = false;
        if (key_is_args_) has_args_ = true, args_ = std::move(value_root_);
      }
      return true;
    }
    if (item_on_) {
      item_on_ = false;
      read_item();
      return true;
    }
    in_items_ = false;  // the end of traceEvents
    streamed = true;
    return end(top_);
  }

  // A builder refused something: say why, for the message.
  bool check(const JsonDomBuilder& b, bool ok) {
    if (!ok) {
      stop.too_deep = b.stop.too_deep;
      stop.duplicate = b.stop.duplicate;
    }
    return ok;
  }

  // Whether the item already has key `k` (and notes it): a short list, a set past 16 keys.
  bool seen_before(const std::string& k) {
    if (keys_.size() < 16) {
      if (std::find(keys_.begin(), keys_.end(), k) != keys_.end()) return true;
      keys_.push_back(k);
      if (keys_.size() == 16) key_set_.insert(keys_.begin(), keys_.end());
      return false;
    }
    return !key_set_.insert(k).second;
  }

  void read_item() {
    const std::size_t i = item_count_++;
    if (item_error) return;  // the parse goes on for its own errors; nothing more is read
    if (!has_args_ || !args_.is_object() || !args_.contains("kind")) return;
    try {
      events.push_back(
          event_from(JsonValue(args_, origin_, "traceEvents[" + std::to_string(i) + "].args")));
      index.push_back(i);
    } catch (...) {
      item_error = std::current_exception();
    }
  }

  std::shared_ptr<const std::string> origin_;
  int max_depth_;
  JsonDomBuilder top_;
  bool events_next_ = false;  // the key just read is the top level's traceEvents
  bool in_items_ = false;     // inside the top-level traceEvents array
  std::size_t item_count_ = 0;
  // An object item: its keys so far, and its args.
  bool item_on_ = false;
  std::vector<std::string> keys_;
  std::unordered_set<std::string> key_set_;
  bool key_is_args_ = false, has_args_ = false;
  nlohmann::json args_;
  // A value of an object item that is an array or an object (args among them).
  nlohmann::json value_root_;
  JsonDomBuilder value_;
  bool value_on_ = false;
  // An item that is an array.
  nlohmann::json other_root_;
  JsonDomBuilder other_;
  bool other_on_ = false;
};

// The document read, checked as a whole one was: the format and version, otherData, the
// events by index, then what they mean.
ParsedTrace finish(TraceSax& sax, const std::string& origin) {
  const nlohmann::json& j = sax.skeleton;
  const JsonValue top(j, origin);
  std::optional<JsonValue> other;
  if (top.is_object() && top.has("traceEvents")) other = top.find("otherData");
  const std::string kind = which_spill_file(j);
  expect_format(other, "spill-trace", kTraceFormatVersion, origin,
                origin + ": not a spill trace" +
                    (kind.empty() || (top.has("traceEvents") && !is_plan_timeline(j))
                         ? std::string(" (no otherData.format = \"spill-trace\")")
                         : kind),
                "trace format version");
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
  if (!sax.streamed) top.at("traceEvents").size();  // not an array: says so
  SPILL_EXPECTS(sax.streamed, origin + ": traceEvents was not read");
  if (sax.item_error) std::rethrow_exception(sax.item_error);
  t.events = std::move(sax.events);
  t.source_index = std::move(sax.index);
  order_by_time(t);
  check_meaning(t, origin);
  return t;
}

}  // namespace

ParsedTrace parse_chrome_trace(const std::string& text, const std::string& origin) {
  TraceSax sax(origin, kMaxJsonDepth);
  sax_parse_text(text, origin, sax);
  return finish(sax, origin);
}

ParsedTrace read_chrome_trace(const std::string& path) {
  const std::string origin = "trace '" + path + "'";
  TraceSax sax(origin, kMaxJsonDepth);
  sax_parse_file(path, origin, sax);
  return finish(sax, origin);
}

}  // namespace spill::profiling

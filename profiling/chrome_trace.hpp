// Chrome/Perfetto trace JSON from spill's trace events, and back. Layout: one process; a track
// per stream (pins, unpins, evictions, stalls as slices), one per copy engine (swap-out on
// D2H, swap-in and prefetch on H2D, as slices with their durations), one for the allocator
// (alloc, free, map, unmap, host memory, OOM as instants); a "memory" counter with allocated,
// mapped, on_host and host_pinned bytes after every change. Every event keeps spill's own
// fields in its args, so a written trace reads back into the same events.
#pragma once

#include <nlohmann/json.hpp>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "profiling/counters.hpp"
#include "profiling/events.hpp"

namespace spill::profiling {

inline constexpr int kTraceFormatVersion = 1;

// Maps a tag id to its name (TraceRecorder::tag_name); may be empty for "no names".
using TagNamer = std::function<std::string(std::uint32_t)>;

// The trace as JSON text (fast path: written directly, not through nlohmann objects).
// otherData.clock names the time base: TraceRecorder::clock_name() when the trace is written
// (events collected while a TraceClock was set carry its simulated time).
std::string chrome_trace_text(const std::vector<TraceEvent>& events, const TagNamer& tags = {},
                              const nlohmann::json& metadata = nlohmann::json::object());

// The same, parsed (convenient for tests and small traces).
nlohmann::json to_chrome_trace(const std::vector<TraceEvent>& events, const TagNamer& tags = {},
                               const nlohmann::json& metadata = nlohmann::json::object());

// The metadata "baseline" of a trace begun before anything was allocated (counters all zero):
// with no dropped events, readers check it as complete.
nlohmann::json zero_baseline();

// Writes the trace through write_file (core/output_file.hpp: whole or not at all, streams as
// streams); throws InvalidArgument naming `what` (the option or call) and the path when it
// cannot be written. The text is built first: a trace that cannot be built leaves no file.
void write_chrome_trace(const std::string& path, const std::vector<TraceEvent>& events,
                        const TagNamer& tags = {},
                        const nlohmann::json& metadata = nlohmann::json::object(),
                        std::string_view what = "trace");

struct ParsedTrace {
  std::vector<TraceEvent> events;
  std::map<std::uint32_t, std::string> tag_names;  // TraceEvent::tag -> name
  nlohmann::json metadata;                         // an object
  std::string clock;  // otherData.clock: the time base ("simulated (...)" or the host's), or ""
  // traceEvents index of each event (events are ordered by time, stably, when read).
  std::vector<std::size_t> source_index;
  // The counters when the first event happened: metadata.baseline when the trace has it (an
  // export taken mid-run), else the least one that keeps every counter non-negative
  // (`baseline_inferred`, lower bounds: zero for a trace that starts at the process's start).
  MemoryCounters baseline;
  bool has_baseline = false;      // metadata.baseline was there
  bool baseline_inferred = false;  // no metadata.baseline, and events freed what came before
  std::uint64_t dropped_events = 0;  // metadata.dropped_events: lost to full rings
  std::optional<std::uint64_t> budget_bytes;  // metadata.budget_bytes
  // A complete trace (baseline with nothing allocated, nothing dropped): every free and swap
  // must name a block the trace allocated.
  bool complete() const { return has_baseline && baseline.allocated == 0 && dropped_events == 0; }
};

// The longest span a trace may cover, from its first event to its last: 30 days of
// nanoseconds (a wrapped or garbage time is refused rather than drawn).
inline constexpr std::uint64_t kMaxTraceSpanNs = 30ull * 24 * 3600 * 1000000000ull;

// The longest tag name a trace may hold.
inline constexpr std::size_t kMaxTagName = 4096;

// Reads a trace written by write_chrome_trace. Throws InvalidArgument naming the file and
// saying what is wrong: missing, not JSON (with the byte position), truncated, nested too deep,
// not a spill trace, of another version, or a field out of its range (named by its JSON path):
// sizes and times up to 2^63 - 1 (time_ns + duration_ns too), tags and threads 32-bit, tag
// ids decimal in [1, 2^32 - 1], addresses and streams "0x" hex; the memory counters replayed
// over the events must stay within 64-bit signed totals. Then what the events mean (events
// ordered by time, stably): no event more than kMaxTraceSpanNs after the first; from the
// baseline (metadata.baseline, non-negative integers) no counter goes below zero; in a
// complete trace no free, double free or swap of a block it did not allocate;
// metadata.budget_bytes and dropped_events non-negative integers. Errors name the event by its
// traceEvents index and kind, and the counter.
ParsedTrace read_chrome_trace(const std::string& path);
ParsedTrace parse_chrome_trace(const std::string& text, const std::string& origin);

}  // namespace spill::profiling

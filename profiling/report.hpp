// `spill report`: one self-contained HTML page (inline CSS and SVG, no scripts, nothing fetched
// at view time) from a spill trace: a summary, the memory timeline by kind (with the steps'
// beginnings when the trace has step marks), per-step figures, the largest live allocations at
// the allocation peak, swap bandwidth over time, stall totals and the allocator's
// fragmentation. An empty trace gives a page that says so.
#pragma once

#include <string>

#include "profiling/chrome_trace.hpp"
#include "profiling/counters.hpp"

namespace spill::profiling {

struct ReportSummary : SwapTally {
  std::size_t events = 0;
  double duration_ms = 0;
  MemoryCounters peak;
  // SwapTally: every copy in the trace (swap_out, swap_in events), in a training step or not:
  // a trace of `spill train` also holds its set-up before step 1 and --check's read-back.
  std::size_t ooms = 0;
  // Evictions (evict events): those copied out and those without a copy (a block whose host
  // copy is current is unmapped without one). Traces written before 2026-12-06 (audit 31b #3)
  // lack the evict events of clean evictions and of two planned paths.
  std::size_t evictions = 0;
  std::uint64_t evicted_bytes = 0;
  double fragmentation = 0;  // peak mapped / peak allocated; 0 when nothing was allocated
  MemoryCounters baseline;   // the counters when the trace began (ParsedTrace::baseline)
};

ReportSummary summarize(const ParsedTrace& trace);

// Renders the page; `source` names the trace in the title.
std::string render_report(const ParsedTrace& trace, const std::string& source);

}  // namespace spill::profiling

// Training steps in a trace, from Swapper::begin_step's marks (a Mark tagged "step begins";
// address: the step's scope, bytes: its number in that scope), and what happened in each: a
// step of a scope runs from its mark to that scope's next mark (the last one to the trace's
// end), and holds the events ordered between them. Scopes run side by side; each is followed
// on its own. A mark repeating the number of its scope's step in progress (another device's
// swapper beginning the same step: one model over two devices) continues that step; the marks
// carry their device, which the steps do not separate.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "profiling/chrome_trace.hpp"
#include "profiling/counters.hpp"

namespace spill::profiling {

// The tag of Swapper::begin_step's marks.
inline constexpr const char* kStepMarkTag = "step begins";

// The swap copies and stalls (SwapTally) are those that begin in the step.
struct StepFigures : SwapTally {
  std::uint64_t number = 0;              // the mark's bytes: the step's number in its scope
  std::uint64_t begin_ns = 0, end_ns = 0;  // its mark; the scope's next mark or the trace's end
  bool to_trace_end = false;             // the scope's last step: no mark ends it
  // The highest counters from its mark (the counters then included) to its end.
  MemoryCounters peak;
};

struct ScopeSteps {
  std::uint64_t scope = 0;
  std::string name;                // its latest scope_name event's ("" for none)
  std::vector<StepFigures> steps;  // in time order
  // "name (scope N)", or "scope N" for a scope without a name.
  std::string label() const;
};

struct TraceSteps {
  // The `max_scopes` scopes with the most marks (ties: the lower scope), by scope.
  std::vector<ScopeSteps> scopes;
  std::size_t other_scopes = 0, other_marks = 0;  // the scopes left out, and their marks
  bool empty() const { return scopes.empty(); }
};

// Steps of the trace's scopes, in one pass over its events (a replay of its counters from the
// trace's baseline). A trace without step marks gives none.
TraceSteps trace_steps(const ParsedTrace& trace, std::size_t max_scopes = 4);

}  // namespace spill::profiling

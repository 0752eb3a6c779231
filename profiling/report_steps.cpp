// The report's "Steps" section (profiling/report_html.hpp).
#include <algorithm>
#include <sstream>

#include "core/checked.hpp"
#include "core/units.hpp"
#include "profiling/report_html.hpp"

namespace spill::profiling::report_html {
namespace {

// The steps of a scope shown one by one at each end of its table (those between: one row).
constexpr std::size_t kStepRowsAtEachEnd = 10;

// One row of the steps table: a step, or several gathered (mean duration with the shortest and
// longest, highest peaks, totals of swaps and stalls).
std::string step_row(const std::vector<StepFigures>& steps, std::size_t from, std::size_t to,
                     const std::string& what, const std::function<double(std::uint64_t)>& ms,
                     bool scope_column, const ScopeSteps& scope) {
  std::ostringstream o;
  const bool one = to - from == 1;
  MemoryCounters peak = steps[from].peak;
  std::uint64_t out = 0, in = 0;
  std::size_t outs = 0, ins = 0, stalls = 0;
  double stall_ms = 0, total_ms = 0, shortest = 0, longest = 0;
  for (std::size_t i = from; i < to; ++i) {
    const StepFigures& f = steps[i];
    peak.allocated = std::max(peak.allocated, f.peak.allocated);
    peak.mapped = std::max(peak.mapped, f.peak.mapped);
    out = saturating_add(out, f.swapped_out_bytes), in = saturating_add(in, f.swapped_in_bytes);
    outs += f.swap_outs, ins += f.swap_ins, stalls += f.stalls, stall_ms += f.stall_ms;
    const double d = static_cast<double>(f.end_ns - f.begin_ns) / 1e6;
    total_ms += d;
    shortest = i == from ? d : std::min(shortest, d);
    longest = i == from ? d : std::max(longest, d);
  }
  if (one)
    o << "<tr class='step' data-scope='" << scope.scope << "' data-step='" << steps[from].number
      << "'>";
  else
    o << "<tr class='steps-gathered' data-scope='" << scope.scope << "' data-steps='"
      << to - from << "'>";
  if (scope_column) o << "<td>" << esc(scope.label()) << "</td>";
  o << "<td class='l'>" << what << "</td><td>" << fmt("%.3f", ms(steps[from].begin_ns))
    << "</td><td>";
  if (one)
    o << fmt("%.3f", total_ms) << (steps[from].to_trace_end ? "*" : "");
  else
    o << "mean " << fmt("%.3f", total_ms / static_cast<double>(to - from)) << " ("
      << fmt("%.3f", shortest) << "&ndash;" << fmt("%.3f", longest) << ")";
  o << "</td><td>" << format_bytes(peak.allocated) << "</td><td>" << format_bytes(peak.mapped)
    << "</td><td>" << format_bytes(out) << " (" << outs << ")</td><td>" << format_bytes(in)
    << " (" << ins << ")</td><td>" << stalls << "</td><td>" << fmt("%.3f", stall_ms)
    << "</td></tr>";
  return o.str();
}

// The steps table: per scope, its first and last steps one by one, the ones between gathered,
// and all of them gathered.
}  // namespace

std::string steps_section(const TraceSteps& steps,
                          const std::function<double(std::uint64_t)>& ms) {
  const bool several = steps.scopes.size() > 1;
  std::ostringstream o;
  o << "<h2>Steps</h2><p class='note'>A step begins at its mark (spill's begin_step) and ends "
    << "at its scope's next one; the last one (*) runs to the trace's end. Peaks are the "
    << "highest counters within the step, from what was there when it began; swaps (bytes, "
    << "copies) and stalls are those that begin in it, a stall's time counted once where stalls of "
    << "several rows overlap. A row of several steps gives their mean "
    << "duration (shortest&ndash;longest), highest peaks and totals.";
  if (several)
    o << " The memory counters are the process's: a step's peaks hold the other scopes' "
      << "memory too.";
  if (steps.other_scopes > 0)
    o << " " << steps.other_scopes << " other scopes (" << steps.other_marks
      << " step marks) are not shown.";
  o << "</p><table id='steps'><tr>" << (several ? "<th>scope</th>" : "")
    << "<th class='l'>step</th><th>begins (ms)</th><th>duration (ms)</th>"
    << "<th>peak allocated</th><th>peak mapped</th><th>swapped out</th><th>swapped in</th>"
    << "<th>stalls</th><th>stall (ms)</th></tr>";
  for (const ScopeSteps& scope : steps.scopes) {
    const std::vector<StepFigures>& v = scope.steps;
    auto row = [&](std::size_t from, std::size_t to, const std::string& what) {
      o << step_row(v, from, to, what, ms, several, scope);
    };
    auto one = [&](std::size_t i) { row(i, i + 1, std::to_string(v[i].number)); };
    const std::size_t n = v.size(), ends = kStepRowsAtEachEnd;
    if (n <= 2 * ends) {
      for (std::size_t i = 0; i < n; ++i) one(i);
    } else {
      for (std::size_t i = 0; i < ends; ++i) one(i);
      row(ends, n - ends,
          std::to_string(n - 2 * ends) + " steps (" + std::to_string(v[ends].number) +
              "&ndash;" + std::to_string(v[n - ends - 1].number) + ")");
      for (std::size_t i = n - ends; i < n; ++i) one(i);
    }
    if (n > 1) row(0, n, "all " + std::to_string(n));
  }
  o << "</table>";
  return o.str();
}

}  // namespace spill::profiling::report_html

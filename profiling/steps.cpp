#include "profiling/steps.hpp"

#include <algorithm>
#include <unordered_map>
#include <unordered_set>

#include "core/checked.hpp"

namespace spill::profiling {

std::string ScopeSteps::label() const {
  const std::string number = "scope " + std::to_string(scope);
  return name.empty() ? number : name + " (" + number + ")";
}

TraceSteps trace_steps(const ParsedTrace& trace, std::size_t max_scopes) {
  TraceSteps out;
  std::unordered_set<std::uint32_t> step_tags;
  for (auto& [id, name] : trace.tag_names)
    if (name == kStepMarkTag) step_tags.insert(id);
  if (step_tags.empty()) return out;
  auto is_mark = [&](const TraceEvent& e) {
    return e.kind == EventKind::Mark && step_tags.count(e.tag) != 0;
  };
  // The scopes with the most marks; a hostile trace may hold a scope per mark. Their names:
  // each scope's latest (tag 0 clears it).
  std::unordered_map<std::uint64_t, std::size_t> marks;
  std::unordered_map<std::uint64_t, std::uint32_t> name_tags;
  for (const TraceEvent& e : trace.events) {
    if (is_mark(e)) ++marks[e.address];
    else if (e.kind == EventKind::ScopeName) name_tags[e.address] = e.tag;
  }
  if (marks.empty()) return out;
  std::vector<std::pair<std::uint64_t, std::size_t>> by_count(marks.begin(), marks.end());
  const std::size_t kept = std::min(max_scopes, by_count.size());
  std::partial_sort(by_count.begin(), by_count.begin() + static_cast<std::ptrdiff_t>(kept),
                    by_count.end(), [](auto& a, auto& b) {
                      return a.second != b.second ? a.second > b.second : a.first < b.first;
                    });
  for (std::size_t i = kept; i < by_count.size(); ++i)
    ++out.other_scopes, out.other_marks += by_count[i].second;
  by_count.resize(kept);
  std::sort(by_count.begin(), by_count.end());
  std::unordered_map<std::uint64_t, std::size_t> slot;  // scope -> its place in out.scopes
  for (auto& [scope, count] : by_count) {
    slot[scope] = out.scopes.size();
    out.scopes.push_back({scope, {}, {}});
    if (auto tag = name_tags.find(scope); tag != name_tags.end() && tag->second != 0) {
      auto name = trace.tag_names.find(tag->second);
      if (name != trace.tag_names.end()) out.scopes.back().name = name->second;
    }
    out.scopes.back().steps.reserve(count);
  }

  std::uint64_t end_ns = 0;
  CounterReplay replay(trace.baseline);
  for (const TraceEvent& e : trace.events) {
    end_ns = std::max(end_ns, e.time_ns + e.duration_ns);
    if (is_mark(e)) {
      auto it = slot.find(e.address);
      if (it == slot.end()) continue;
      std::vector<StepFigures>& steps = out.scopes[it->second].steps;
      if (!steps.empty() && steps.back().number == e.bytes) continue;  // the same step
      if (!steps.empty()) steps.back().end_ns = e.time_ns;
      StepFigures s;
      s.number = e.bytes;
      s.begin_ns = e.time_ns;
      s.peak = replay.current();
      steps.push_back(s);
      continue;
    }
    replay.apply(e);
    const MemoryCounters& c = replay.current();
    for (ScopeSteps& scope : out.scopes) {
      if (scope.steps.empty()) continue;
      StepFigures& s = scope.steps.back();
      s.peak.allocated = std::max(s.peak.allocated, c.allocated);
      s.peak.mapped = std::max(s.peak.mapped, c.mapped);
      s.peak.on_host = std::max(s.peak.on_host, c.on_host);
      s.peak.host_pinned = std::max(s.peak.host_pinned, c.host_pinned);
      s.count(e, "trace: bytes swapped in a step");
    }
  }
  for (ScopeSteps& scope : out.scopes) {
    scope.steps.back().end_ns = end_ns;
    scope.steps.back().to_trace_end = true;
  }
  return out;
}

}  // namespace spill::profiling

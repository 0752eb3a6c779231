#include "profiling/counters.hpp"

#include <algorithm>

namespace spill::profiling {

bool CounterReplay::apply(const TraceEvent& e) {
  const auto bytes = static_cast<std::int64_t>(e.bytes);
  MemoryCounters before = current_;
  switch (e.kind) {
    case EventKind::Alloc: current_.allocated += bytes; break;
    case EventKind::Free: {
      current_.allocated -= bytes;
      auto it = on_host_.find(e.address);
      if (it != on_host_.end()) {
        current_.on_host -= static_cast<std::int64_t>(it->second);
        on_host_.erase(it);
      }
      break;
    }
    case EventKind::Map: current_.mapped += bytes; break;
    case EventKind::Unmap: current_.mapped -= bytes; break;
    case EventKind::SwapOut:
      if (on_host_.emplace(e.address, e.bytes).second) current_.on_host += bytes;
      break;
    case EventKind::SwapIn: {
      auto it = on_host_.find(e.address);
      if (it != on_host_.end()) {
        current_.on_host -= static_cast<std::int64_t>(it->second);
        on_host_.erase(it);
      }
      break;
    }
    case EventKind::HostAlloc: current_.host_pinned += bytes; break;
    case EventKind::HostFree: current_.host_pinned -= bytes; break;
    default: break;
  }
  peak_.allocated = std::max(peak_.allocated, current_.allocated);
  peak_.mapped = std::max(peak_.mapped, current_.mapped);
  peak_.on_host = std::max(peak_.on_host, current_.on_host);
  peak_.host_pinned = std::max(peak_.host_pinned, current_.host_pinned);
  return !(before == current_);
}

}  // namespace spill::profiling

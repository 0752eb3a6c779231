#include "profiling/counters.hpp"

#include <algorithm>

#include "core/checked.hpp"
#include "core/errors.hpp"

namespace spill::profiling {

bool CounterReplay::apply(const TraceEvent& e) {
  SPILL_EXPECTS(e.bytes <= kMaxBytes, std::string(to_string(e.kind)) + " of " +
                                          std::to_string(e.bytes) + " bytes: above 2^63 - 1");
  const auto bytes = static_cast<std::int64_t>(e.bytes);
  MemoryCounters next = current_;
  auto add = [](std::int64_t& counter, std::int64_t v, const char* what) {
    counter = checked_add_signed(counter, v, what);
  };
  // Whether the block left the host (true) or was not there.
  auto leave_host = [&] {
    auto it = on_host_.find(e.address);
    if (it == on_host_.end()) return false;
    add(next.on_host, -static_cast<std::int64_t>(it->second.bytes), "bytes on host");
    on_host_.erase(it);
    return true;
  };
  switch (e.kind) {
    case EventKind::Alloc:
      add(next.allocated, bytes, "allocated bytes");
      freed_.erase(e.address);
      back_.erase(e.address);
      break;
    case EventKind::Free:
      add(next.allocated, -bytes, "allocated bytes");
      if (!leave_host()) freed_.insert(e.address);
      if (auto it = back_.find(e.address); it != back_.end()) {
        if (it->second) pending_in_.insert(e.address);
        back_.erase(it);
      }
      break;
    case EventKind::Map:
      add(next.mapped, bytes, "mapped bytes");
      mapped_.insert(e.address);
      // Mapped back at its address: the bytes are on the device again (an untouched block's
      // swap-in copies nothing, so no swap_in follows).
      if (leave_host()) back_[e.address] = true;
      break;
    case EventKind::Unmap:
      add(next.mapped, -bytes, "mapped bytes");
      mapped_.erase(e.address);
      if (auto it = on_host_.find(e.address); it != on_host_.end()) it->second.while_mapped = false;
      break;
    case EventKind::Pin:  // a pin of a block still swapping out cancels its eviction
      if (leave_host()) back_[e.address] = false;
      break;
    case EventKind::Evict:  // every eviction (a clean one copies nothing)
      back_.erase(e.address);
      [[fallthrough]];
    case EventKind::SwapOut:  // a copy to the host (a cancelled one's late slice adds nothing)
      if (!on_host_.count(e.address) && !freed_.count(e.address) && !back_.count(e.address)) {
        add(next.on_host, bytes, "bytes on host");
        on_host_.emplace(e.address, OnHost{e.bytes, mapped_.count(e.address) != 0});
      }
      break;
    case EventKind::FreeOnHost:  // freed on the host, maybe since before the trace began
      if (!leave_host() && !freed_.count(e.address) && !back_.count(e.address))
        add(next.on_host, -bytes, "bytes on host");
      break;
    case EventKind::SwapIn:
      if (auto it = on_host_.find(e.address); it != on_host_.end() && it->second.while_mapped)
        break;  // the late slice of the copy its map before the eviction counted
      if (pending_in_.erase(e.address)) break;  // a freed block's copy, counted at its map
      if (leave_host() || back_.erase(e.address) || freed_.count(e.address)) break;
      // Never seen leaving: it was on the host before the trace began.
      add(next.on_host, -bytes, "bytes on host");
      break;
    case EventKind::HostAlloc: add(next.host_pinned, bytes, "pinned host bytes"); break;
    case EventKind::HostFree: add(next.host_pinned, -bytes, "pinned host bytes"); break;
    default: break;
  }
  const MemoryCounters before = current_;
  current_ = next;
  peak_.allocated = std::max(peak_.allocated, current_.allocated);
  peak_.mapped = std::max(peak_.mapped, current_.mapped);
  peak_.on_host = std::max(peak_.on_host, current_.on_host);
  peak_.host_pinned = std::max(peak_.host_pinned, current_.host_pinned);
  return !(before == current_);
}

void SwapTally::count(const TraceEvent& e, const char* what) {
  if (e.kind == EventKind::SwapOut)
    ++swap_outs, swapped_out_bytes = checked_add(swapped_out_bytes, e.bytes, what);
  if (e.kind == EventKind::SwapIn)
    ++swap_ins, swapped_in_bytes = checked_add(swapped_in_bytes, e.bytes, what);
  if (e.kind == EventKind::Stall) {
    ++stalls;
    const std::uint64_t end = e.time_ns + e.duration_ns;
    const std::uint64_t from = std::max(e.time_ns, stalled_until_ns_);
    if (end > from) stall_ms += static_cast<double>(end - from) / 1e6;
    stalled_until_ns_ = std::max(stalled_until_ns_, end);
  }
}

}  // namespace spill::profiling

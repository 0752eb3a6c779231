#include "allocator/stats.hpp"

#include "core/units.hpp"

namespace spill {

namespace {
std::string line(const char* name, const Stat& s) {
  auto b = [](std::int64_t n) { return format_bytes(static_cast<std::size_t>(n < 0 ? 0 : n)); };
  return std::string(name) + ": current " + b(s.current) + ", peak " + b(s.peak) +
         ", allocated " + format_bytes(s.allocated) + ", freed " + format_bytes(s.freed) + "\n";
}
}  // namespace

std::string AllocatorStats::to_string() const {
  std::string out = line("allocated", allocated) + line("requested", requested) +
                    line("reserved", reserved) + line("cached", cached) +
                    line("host pinned", host_pinned);
  out += "swapped out: " + format_bytes(swapped_out_bytes) + "\n";
  out += "allocations " + std::to_string(allocations) + ", frees " + std::to_string(frees) +
         ", segment maps " + std::to_string(segment_maps) + ", unmaps " +
         std::to_string(segment_unmaps) + " (" + std::to_string(plain_frees) +
         " small-pool segments freed)\n";
  out += "ladder: cache hits " + std::to_string(cache_hits) + ", gathers " +
         std::to_string(gathers) + ", splits " + std::to_string(splits) + " (" +
         std::to_string(views_reused) + " on ranges still mapped), cache releases " +
         std::to_string(cache_releases) + ", eviction requests " +
         std::to_string(eviction_requests) + ", OOMs " + std::to_string(ooms) + "\n";
  out += "swap-ins onto cached memory: " + std::to_string(cache_takeovers) +
         ", segments in kept address ranges: " + std::to_string(ranges_reused) + "\n";
  out += "host waits for freed blocks: " + std::to_string(host_waits) + " (" +
         std::to_string(host_wait_s * 1e3) + " ms)\n";
  return out;
}

}  // namespace spill

#include "allocator/budget.hpp"

#include <algorithm>

#include "core/errors.hpp"
#include "core/units.hpp"

namespace spill {

Budget::Budget(Device& device, std::optional<std::size_t> requested, std::size_t small_segment)
    : total_(device.info().total_bytes), granule_(device.granularity()),
      small_segment_(small_segment) {
  const std::size_t total = total_;
  const std::size_t g = granule_;
  if (requested) {
    check_limit(*requested);
    limit_ = *requested;
  } else {
    const std::size_t free = device.mem_info().free;
    const std::size_t reserve = std::min<std::size_t>(std::size_t{1} << 30, total / 10);
    limit_ = std::max({free > reserve + g ? free - reserve : g, small_segment_});
  }
}

void Budget::check_limit(std::size_t limit) const {
  // A user's input, not a contract: said without a source location, with what to change.
  if (limit > total_) {
    throw InvalidArgument("budget " + format_bytes(limit) + " is larger than the device (" +
                          format_bytes(total_) +
                          "): lower the budget, or on the simulated device raise sim_capacity");
  }
  if (limit < granule_) {
    throw InvalidArgument("budget " + format_bytes(limit) + " is below one granule (" +
                          format_bytes(granule_) + ", the least the device maps): raise it");
  }
  if (limit < small_segment_) {
    // Small requests share segments of this size whatever the granule: none would ever fit.
    throw InvalidArgument("budget " + format_bytes(limit) + " is below one small-pool segment (" +
                          format_bytes(small_segment_) +
                          ": requests up to swap_threshold or 1 MiB share segments of that "
                          "size, whatever the granule): raise it to at least " +
                          format_bytes(small_segment_) + ", or set swap_threshold:0 (no small "
                          "pool)");
  }
}

void Budget::set_limit(std::size_t limit) {
  check_limit(limit);
  SPILL_ASSERT(claimed_ <= limit, "lowering the budget below the claimed bytes");
  limit_ = limit;
}

void Budget::claim(std::size_t bytes) {
  SPILL_ASSERT(fits(bytes), "claiming past the budget");
  claimed_ += bytes;
}

void Budget::release(std::size_t bytes) {
  SPILL_ASSERT(bytes <= claimed_, "releasing more budget than was claimed");
  claimed_ -= bytes;
}

}  // namespace spill

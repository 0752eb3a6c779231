#include "allocator/budget.hpp"

#include <algorithm>

#include "core/errors.hpp"
#include "core/units.hpp"

namespace spill {

Budget::Budget(Device& device, std::optional<std::size_t> requested) {
  const std::size_t total = device.info().total_bytes;
  const std::size_t g = device.granularity();
  if (requested) {
    SPILL_EXPECTS(*requested <= total, "budget " + format_bytes(*requested) +
                                           " is larger than the device (" + format_bytes(total) +
                                           ")");
    SPILL_EXPECTS(*requested >= g, "budget " + format_bytes(*requested) +
                                       " is below one granule (" + format_bytes(g) + ")");
    limit_ = *requested;
  } else {
    const std::size_t free = device.mem_info().free;
    const std::size_t reserve = std::min<std::size_t>(std::size_t{1} << 30, total / 10);
    limit_ = free > reserve + g ? free - reserve : g;
  }
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

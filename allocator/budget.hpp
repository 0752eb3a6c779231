// Budget: the hard limit on mapped physical device bytes and the count held against it (small
// segments, mapped large blocks, and mappings in progress). Bytes are claimed before a mapping
// is made, so threads mapping at once can never pass the limit together, and given back when a
// mapping is undone or fails. Invariant: claimed() <= limit(). Not thread-safe: the owner's
// mutex guards it.
#pragma once

#include <cstddef>
#include <optional>

#include "device/device.hpp"

namespace spill {

class Budget {
 public:
  // `requested`: the configured budget, checked against the device (no more than its total, no
  // less than one granule, nor than `small_segment` when a small pool maps segments of that
  // size: 0 when there is none; InvalidArgument otherwise); nullopt: free memory less a reserve
  // of min(1 GiB, 10% of the device).
  Budget(Device& device, std::optional<std::size_t> requested, std::size_t small_segment = 0);

  std::size_t limit() const { return limit_; }
  std::size_t claimed() const { return claimed_; }
  std::size_t room() const { return limit_ - claimed_; }
  bool fits(std::size_t bytes) const { return bytes <= room(); }
  // Bytes that must be freed before `bytes` more fit (0 if they fit).
  std::size_t shortfall(std::size_t bytes) const { return fits(bytes) ? 0 : bytes - room(); }

  void claim(std::size_t bytes);    // asserts that the bytes fit
  void release(std::size_t bytes);  // asserts that they were claimed

  // Throws InvalidArgument when `limit` is above the device, below one granule, or below one
  // small-pool segment (a budget no small request could ever fit in).
  void check_limit(std::size_t limit) const;
  // A new limit at run time (checked as above); asserts that the claimed bytes fit under it.
  void set_limit(std::size_t limit);

 private:
  std::size_t total_ = 0, granule_ = 0, small_segment_ = 0;
  std::size_t limit_ = 0;
  std::size_t claimed_ = 0;
};

}  // namespace spill

// The out-of-memory message: where every byte is, and a hint that fits the case.
#pragma once

#include <cstddef>
#include <string>

namespace spill {

struct OomFacts {
  std::size_t requested = 0;      // rounded request
  std::size_t budget = 0;
  std::size_t device_total = 0;
  std::size_t allocated = 0;      // handed out and mapped
  std::size_t cached = 0;         // mapped, free
  std::size_t swapped_out = 0;    // allocated, bytes on the host
  std::size_t host_pinned = 0;
  std::size_t largest_free = 0;   // largest cached block
  std::size_t free_total = 0;     // all cached bytes
  bool device_full = false;       // the device itself refused, within the budget
  std::string dump_note;          // where an OOM dump was written, if any
};

std::string oom_message(const OomFacts& f);

}  // namespace spill

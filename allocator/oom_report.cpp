#include "allocator/oom_report.hpp"

#include "device/sim_device.hpp"

#include <algorithm>
#include <cstdio>

#include "core/units.hpp"

namespace spill {

double fragmentation(const OomFacts& f) {
  if (f.free_total == 0) return 0.0;
  return 1.0 - static_cast<double>(f.largest_free) / static_cast<double>(f.free_total);
}

std::string oom_message(const OomFacts& f) {
  std::string m = "out of memory: cannot allocate " + format_bytes(f.requested);
  if (f.requested > f.budget) {
    // Rounded, a request just over the budget reads as the budget itself: bytes then.
    const bool same = format_bytes(f.requested) == format_bytes(f.budget);
    return m + (same ? " (" + std::to_string(f.requested) + " bytes)" : "") +
           ": the request alone is larger than the whole budget of " + format_bytes(f.budget) +
           (same ? " (" + std::to_string(f.budget) + " bytes)" : "") + " (device " +
           format_bytes(f.device_total) +
           "). Split the tensor, or raise budget: if the device has room." + f.dump_note;
  }
  if (f.needed > f.requested) m += " (needs " + format_bytes(f.needed) + " mapped)";
  const double frag = fragmentation(f);
  char frag_text[32];
  std::snprintf(frag_text, sizeof frag_text, "%.2f", frag);
  if (f.device_full) {
    m += f.device_error.empty()
             ? " (the device itself is full, within the budget)"
             : " (the device refused, within the budget: " + f.device_error + ")";
  }
  // "resident", not "allocated": spill_stats' allocated_bytes also counts the swapped-out
  // blocks, which are named apart below.
  m += ". Budget " + format_bytes(f.budget) + ": resident " + format_bytes(f.allocated);
  if (f.small_allocated > 0) {
    m += " (" + format_bytes(f.small_allocated) + " of it in small blocks, requests up to " +
         format_bytes(f.small_limit) + ", which never move)";
  }
  m += ", cached " + format_bytes(f.cached) + "; swapped out " + format_bytes(f.swapped_out) +
       ", pinned host " + format_bytes(f.host_pinned) + " (" + format_bytes(f.host_in_use) +
       " in use); largest free block " + format_bytes(f.largest_free) + ", fragmentation " +
       frag_text;
  if (f.other_free > 0) {
    m += f.small_request
             ? " (of the " + format_bytes(f.free_total) + " cached in small-pool segments; " +
                   format_bytes(f.other_free) + " more is cached in large blocks, which serve "
                   "only requests over " + format_bytes(f.small_limit) + ")"
             : " (of the " + format_bytes(f.free_total) + " cached in large blocks; " +
                   format_bytes(f.other_free) + " more is cached in small-pool segments, which "
                   "serve only requests up to " + format_bytes(f.small_limit) +
                   " and go back to the device only when all of their blocks are freed)";
  }
  if (f.pinned && f.unswappable) {
    m += "; the swapper cannot evict " + format_bytes(*f.pinned) + " pinned and " +
         format_bytes(*f.unswappable) + " more never declared swappable";
  }
  if (!f.host_refusal.empty()) m += "; swapping a block out failed: " + f.host_refusal;
  if (!f.named.empty()) {
    m += "; largest named resident blocks:";
    for (std::size_t i = 0; i < f.named.size(); ++i) {
      m += (i ? ", \"" : " \"") + f.named[i].name + "\" " + format_bytes(f.named[i].size);
    }
    if (f.named_count > f.named.size()) {
      m += " (" + std::to_string(f.named.size()) + " of " + std::to_string(f.named_count) +
           " named, " + format_bytes(f.named_bytes) + " in all)";
    }
    // What the list leaves out: the largest blocks may be unnamed (activations).
    if (f.unnamed_count > 0) {
      m += ", and " + format_bytes(f.unnamed_bytes) + " in " + std::to_string(f.unnamed_count) +
           " unnamed";
    }
  }
  m += ". ";
  if (f.device_full && f.simulated &&
      f.device_error.find(kSimOutOfDescriptors) != std::string::npos) {
    // Not memory at all: the process's descriptor limit (one descriptor per physical chunk).
    m += "Hint: the simulated device holds one file descriptor per physical allocation and the "
         "process has no more: raise the limit (ulimit -n; spill raises the soft limit to the "
         "hard one at start), or choose a larger sim_granularity: (fewer, larger allocations).";
  } else if (f.device_full && f.simulated) {
    // Its memory is the host's (files in RAM): sim_capacity or the host ran out, not a GPU.
    m += "Hint: the simulated device's memory is the host's: its sim_capacity: (" +
         format_bytes(f.device_total) + ") or the host's memory (RAM, ulimit -v) ran out; "
         "lower budget:, or raise sim_capacity: where the host has room.";
  } else if (f.device_full) {
    m += "Hint: other processes or allocations outside spill use the device; lower budget:.";
  } else if (f.free_total >= f.needed && frag > 0.5) {
    m += "Hint: enough is cached but fragmented across partly used segments, which go back "
         "to the device only when all of their blocks are freed.";
  } else if (!f.small_request && f.other_free >= f.needed && f.other_free > f.budget / 3) {
    // Free, but in the other pool: small-pool segments with a few live blocks each (a test
    // squeezing guard's budget in a checkpoint's recomputation was told "the pinned working
    // set is too large" with nothing pinned and the budget in such segments).
    m += "Hint: enough is cached, but in small-pool segments (requests up to " +
         format_bytes(f.small_limit) + "), which go back to the device only when all of their "
         "blocks are freed: raise budget:, or lower swap_threshold: so fewer tensors share "
         "small segments.";
  } else if (f.host_cap && *f.host_cap - std::min(*f.host_cap, f.host_in_use) < f.needed) {
    m += "Hint: the host cap (host_cap: " + format_bytes(*f.host_cap) + ", " +
         format_bytes(f.host_in_use) + " of it in use) leaves no room to swap a block out: "
         "raise host_cap:.";
  } else if (!f.host_refusal.empty()) {
    // Blocks could move, but the host had no memory to pin for them: not the swapper's setup
    // nor pins (audit 42b #3: it asked whether the swapper was enabled).
    m += "Hint: blocks could not be swapped out because the host refused pinned memory for "
         "them (above): free host memory (RAM, ulimit -v), or lower the budget's pressure (a "
         "larger budget or smaller batches).";
  } else if (f.small_allocated > f.budget / 3 &&
             f.small_allocated > std::max(f.pinned.value_or(0), f.unswappable.value_or(0))) {
    m += "Hint: most of what cannot move is in small blocks (requests up to " +
         format_bytes(f.small_limit) + " share segments that never move): lower "
         "swap_threshold: below the size of those tensors, or raise budget:.";
  } else if (f.pinned && f.unswappable && *f.unswappable > *f.pinned) {
    m += "Hint: most of what stays resident was never declared swappable (only blocks a hook "
         "declared can move: spill.torch.offload's or guard's, spill_set_swappable): declare "
         "them, or raise budget:.";
  } else if (f.swapped_out == 0 && f.allocated > f.budget / 2) {
    m += "Hint: nothing is swapped out: is the swapper enabled (policy:plan or lru), and are "
         "tensors unpinned after use?";
  } else {
    m += "Hint: the pinned working set is too large for the budget: raise budget: or use "
         "smaller batches.";
  }
  return m + f.dump_note;
}

}  // namespace spill

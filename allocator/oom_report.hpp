// The out-of-memory message: where every byte is, and a hint that fits the case. Pure text from
// plain facts, so it can be tested and reused (the host pool, the C API) without an allocator.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

namespace spill {

struct OomFacts {
  std::size_t requested = 0;      // bytes the caller asked for
  std::size_t needed = 0;         // mapped bytes the request needed (block or new segment)
  std::size_t budget = 0;
  std::size_t device_total = 0;
  std::size_t allocated = 0;      // handed out and mapped: "resident" in the message
  std::size_t small_allocated = 0;  // of which in small-pool blocks (these never move)
  std::size_t cached = 0;         // mapped, free
  std::size_t swapped_out = 0;    // allocated, bytes on the host
  std::size_t host_pinned = 0;    // pinned host memory held (registered chunks)
  std::size_t host_in_use = 0;    // of which holding swapped-out bytes
  std::optional<std::size_t> host_cap;  // the host pool's cap (host_cap:), when it has one
  // The pool the request is served from (small or large): only its cached blocks can serve it.
  std::size_t largest_free = 0;   // that pool's largest cached block
  std::size_t free_total = 0;     // that pool's cached bytes
  std::size_t other_free = 0;     // cached bytes in the other pool, which cannot serve it
  bool small_request = false;     // served by the small pool (up to small_limit)
  std::size_t small_limit = 0;    // the largest request the small pool serves
  bool simulated = false;         // the device is SimDevice: its memory is the host's
  bool device_full = false;       // the device itself refused, within the budget
  std::string device_error;       // the device's own reason for refusing, when it gave one
  // Resident bytes the swapper cannot evict (a block may count in both), when it was asked.
  std::optional<std::size_t> pinned;       // pinned now
  std::optional<std::size_t> unswappable;  // never declared swappable and not pinned
  // Why the swapper's eviction could not get host memory to swap a block out to, if it could
  // not (Unevictable::host_refusal).
  std::string host_refusal;
  std::string dump_note;          // where an OOM dump was written, if any
  // Resident blocks the caller named (set_block_name): the largest (at most kNamedListed, by
  // size, largest first) and how many and how much there are in all.
  static constexpr std::size_t kNamedListed = 5;
  struct Named {
    std::string name;
    std::size_t size = 0;
  };
  std::vector<Named> named;
  std::size_t named_count = 0, named_bytes = 0;
  // Resident blocks without a name, when some block has one (under spill.torch: activations).
  std::size_t unnamed_count = 0, unnamed_bytes = 0;
};

// 1 - largest free block / the pool's free bytes: 0 when they are one block (or none).
double fragmentation(const OomFacts& f);

std::string oom_message(const OomFacts& f);

}  // namespace spill

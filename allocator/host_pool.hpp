// HostPool: pinned host memory for swapped-out blocks. Exact sizes (rounded to 512 B, never to
// a power of two) carved from large chunks that are page-locked with the device's
// register_host, under a host cap (host_cap:). Exhaustion is an OutOfMemory that names the cap
// and the use, never a crash. Thread-safe (its own mutex; it never calls back into anyone, so it
// is last in the lock order).
//
// Stream semantics: none of its own. A buffer may be freed only once every copy touching it has
// completed (the swapper synchronises its copy events first); it is reused at once.
#pragma once

#include <cstddef>
#include <mutex>
#include <optional>

#include "allocator/block_pool.hpp"
#include "allocator/residency.hpp"
#include "allocator/stats.hpp"

namespace spill {

class HostPool final : public HostMemory {
 public:
  // `cap`: the most pinned host memory the pool may hold (nullopt: unlimited).
  // `chunk_bytes`: the size of each registered chunk (bigger requests get a chunk of their own).
  HostPool(Device& device, std::optional<std::size_t> cap, std::size_t chunk_bytes = 64u << 20);
  ~HostPool() override;
  HostPool(const HostPool&) = delete;
  HostPool& operator=(const HostPool&) = delete;

  // Throws InvalidArgument for 0 or absurd sizes, OutOfMemory past the cap or the host.
  void* allocate(std::size_t bytes) override;
  // Throws InvalidArgument for a pointer this pool did not hand out (or a double free).
  void deallocate(void* ptr, std::size_t bytes) override;
  std::size_t in_use() const override;   // bytes handed out
  std::size_t reserved() const;          // bytes of registered chunks
  std::optional<std::size_t> cap() const { return cap_; }  // host_cap: (nullopt: unlimited)
  Stat stat() const;                     // registered chunk bytes over time
  void reset_peak();
  // Unregisters and returns the chunks that hold no buffer.
  void release_free_chunks();

 private:
  void release_free_chunks_locked();
  // A new chunk of `chunk` bytes mapped and registered, or smaller ones down to `least` when
  // the host refuses (`chunk` is set to what was mapped); HostCapExceeded saying that the host
  // refused, when even `least` is refused.
  void* map_chunk_locked(std::size_t& chunk, std::size_t least, std::size_t bytes);

  Device& dev_;
  std::optional<std::size_t> cap_;
  std::size_t chunk_bytes_;
  mutable std::mutex mu_;
  BlockPool pool_;
  AddressSet used_;
  SegmentList chunks_;
  std::size_t in_use_ = 0, reserved_ = 0;
  Stat stat_;
};

}  // namespace spill

// What the swapper needs from the memory below it, as two small interfaces, so the swapper can
// be tested against a simple backend and run over the caching allocator unchanged.
//
// ResidencyBackend (implemented by the allocator's large pool): find the swappable block that
// contains a pointer, and take its physical memory away (unback) or give it fresh physical
// memory at the same addresses (reback), keeping the budget's books. reback may run the
// allocator's eviction ladder, which calls back into Swapper::evict_bytes: so the swapper never
// calls reback while holding its own lock.
//
// HostMemory (implemented by the allocator's HostPool): pinned host buffers for swapped-out
// bytes, under a host cap; allocate throws OutOfMemory when the cap would be passed.
#pragma once

#include <cstddef>
#include <optional>

namespace spill {

struct SwappableBlock {
  void* base = nullptr;
  std::size_t size = 0;  // granule multiple
};

class ResidencyBackend {
 public:
  virtual ~ResidencyBackend() = default;
  // The allocated swappable block containing `ptr`, or nullopt.
  virtual std::optional<SwappableBlock> find_block(const void* ptr) = 0;
  // Unmaps and releases the block's physical memory; the caller has synchronised every use.
  virtual void unback(void* base, std::size_t size) = 0;
  // Maps fresh physical memory at the block's addresses; throws OutOfMemory when the budget
  // cannot be met even after the eviction ladder.
  virtual void reback(void* base, std::size_t size) = 0;
  // Like reback, but only if the budget has room now (cached memory nobody uses may be
  // released for it): never evicts live blocks (a prefetch must not push out blocks needed
  // sooner). Returns false when there is no room.
  virtual bool try_reback(void* base, std::size_t size) = 0;
};

class HostMemory {
 public:
  virtual ~HostMemory() = default;
  virtual void* allocate(std::size_t bytes) = 0;  // pinned; throws OutOfMemory at the cap
  virtual void deallocate(void* ptr, std::size_t bytes) = 0;
  virtual std::size_t in_use() const = 0;
};

}  // namespace spill

// What the swapper needs from the allocator below it, as small interfaces, so the swapper can be
// tested against a simple backend and run over the caching allocator unchanged. They live here,
// in allocator/, because dependencies point one way: device <- allocator <- swapper.
//
// ResidencyBackend (implemented by CachingAllocator's large pool): find the swappable block that
// contains a pointer, take its physical memory away (unback) or give it fresh physical memory at
// the same addresses (reback), keeping the budget's books: unback lowers the mapped bytes and
// raises the swapped-out bytes; reback claims budget first and may run the allocator's ladder.
//
// LargeBlockObserver (implemented by the swapper): hears of large blocks coming and going and
// serves the ladder's eviction hook ("free at least N bytes now"). No observer installed is the
// no-op hook: the ladder skips that rung.
//
// Lock rule: the allocator never calls an observer method while holding its own mutex, so the
// observer may call back into the allocator (unback, find_block, stats, ...). The other way
// round, the swapper may hold its own lock while calling the allocator. Lock order: swapper,
// then allocator, then the host pool. An observer must not call reback/allocate from evict()
// (that would re-enter the ladder it is serving).
//
// One block is never in two residency calls at once: while an unback or reback of a block runs
// (device calls, without the allocator's lock), another unback, reback or free of it is refused
// with InvalidArgument, and block_info still reports its old state.
//
// HostMemory (implemented by HostPool): pinned host buffers for swapped-out bytes, under a host
// cap; allocate throws OutOfMemory when the cap would be passed.
#pragma once

#include <cstddef>
#include <optional>
#include <string>

#include "device/device.hpp"

namespace spill {

struct SwappableBlock {
  void* base = nullptr;
  std::size_t size = 0;  // granule multiple
};

class ResidencyBackend {
 public:
  virtual ~ResidencyBackend() = default;
  // The allocated swappable (large) block containing `ptr`, or nullopt.
  virtual std::optional<SwappableBlock> find_block(const void* ptr) = 0;
  // Unmaps and releases the block's physical memory; its addresses stay reserved and allocated.
  // The caller has synchronised every use of the block.
  virtual void unback(void* base, std::size_t size) = 0;
  // Maps fresh physical memory at the block's addresses (contents undefined: the caller copies
  // them back); throws OutOfMemory when the budget cannot be met even after the ladder.
  virtual void reback(void* base, std::size_t size) = 0;
  // Like reback, but only if the budget has room now (cached memory nobody uses may be
  // released for it): never evicts live blocks (a prefetch must not push out blocks needed
  // sooner). Returns false when there is no room.
  virtual bool try_reback(void* base, std::size_t size) = 0;
  // Maps, at the block's addresses, the memory of cached free blocks (with fresh memory for
  // what they leave, if the budget has room for it now) instead of releasing them first,
  // without waiting for the work still queued on them: `stream` (the one that will write the
  // block) is made to wait for that work instead. Returns false (nothing done) when no cached
  // block can be taken. The cached blocks' bytes become the block's.
  virtual bool reback_from_cache(void* /*base*/, std::size_t /*size*/, Stream /*stream*/) {
    return false;
  }
  // Whether reback_from_cache can back a block of `size` bytes now.
  virtual bool cache_can_back(std::size_t /*size*/) { return false; }
  // True when an allocated block of any pool contains `ptr` (a small block never moves: the
  // swapper treats pins of it as no-ops, and an unknown pointer as an error).
  virtual bool owns(const void* /*ptr*/) { return false; }
  // Budget bytes free for a mapping now (0 when unknown): what a planned prefetch finds before
  // the swapper evicts blocks needed later to make room for it.
  virtual std::size_t room() { return 0; }
  // Bytes mapped now against the budget (small segments, large blocks, cached memory; 0 when
  // unknown): the swapper plans around what its recorded steps do not show.
  virtual std::size_t mapped_bytes() { return 0; }
  // Of those, the cache (0 when unknown): free large blocks kept mapped and small-pool segments
  // with nothing allocated in them, what release_cache can return; a mapping can have them
  // back by releasing them, once the work queued on them has finished.
  virtual std::size_t cached_bytes() { return 0; }
  // Releases up to `bytes` of that cache, waiting for the work queued on it if it must (never
  // evicts a live block). Returns the bytes released.
  virtual std::size_t release_cache(std::size_t /*bytes*/) { return 0; }
  // The name the caller gave the allocated block starting at `base` ("" for none), for
  // out-of-memory messages that list blocks.
  virtual std::string block_name(const void* /*base*/) { return {}; }
};

class LargeBlockObserver {
 public:
  virtual ~LargeBlockObserver() = default;
  // A large block was handed out on `stream` (after the allocator's lock is released). The
  // allocation counts as a use by that stream: work the caller enqueues there may write it.
  // `request` is the request rounded to the granule: a reused cached block's `size` may be up
  // to a quarter larger, depending on what the cache held, so only `request` tells the same
  // allocation in two runs of the same code.
  virtual void on_large_alloc(void* base, std::size_t size, std::size_t request,
                              Stream stream) = 0;
  // A large block is being freed on `stream`, before it is cached: the observer drops its
  // copies and makes `stream` wait for any copy still touching the block.
  virtual void on_large_free(void* base, Stream stream) = 0;
  // The eviction hook: free at least `bytes` of mapped memory now (by unbacking blocks);
  // returns the bytes freed (0: nothing could go).
  virtual std::size_t evict(std::size_t bytes) = 0;
  // The stream is about to be destroyed (forward of CachingAllocator::forget_stream).
  virtual void on_forget_stream(Stream) {}
  // For out-of-memory messages: the resident bytes the eviction hook cannot free, by reason
  // (pinned; not pinned and never declared swappable: each block counts once), and why its
  // last eviction could not swap a block out for want of host memory ("" if it could: the
  // host pool's message, a full host_cap or the host refusing to pin). nullopt: not known.
  struct Unevictable {
    std::size_t pinned = 0, unswappable = 0;
    std::string host_refusal;
  };
  virtual std::optional<Unevictable> unevictable() { return std::nullopt; }
};

class HostMemory {
 public:
  virtual ~HostMemory() = default;
  virtual void* allocate(std::size_t bytes) = 0;  // pinned; throws OutOfMemory at the cap
  virtual void deallocate(void* ptr, std::size_t bytes) = 0;
  virtual std::size_t in_use() const = 0;
};

}  // namespace spill

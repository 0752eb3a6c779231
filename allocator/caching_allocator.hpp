// CachingAllocator: what frameworks call instead of cudaMalloc.
//   small pool  requests up to 1 MiB, rounded to 512 B, carved (split, coalesced) from 2 MiB
//               plain device segments;
//   large pool  bigger requests rounded to the VMM granularity, each block its own reserved
//               range with its own physical chunk, so the swapper can unmap one block alone;
//               freed blocks stay mapped (cached) and are reused for requests at most 1/4
//               smaller.
// The budget limits mapped physical bytes (small segments + mapped large blocks). A request
// that would pass it goes down the ladder: reuse a cached block; release cached memory (dead
// bytes go before live tensors); ask the eviction hook (the swapper) for bytes; fail with an
// OutOfMemory that says where every byte is.
//
// Stream semantics: a block freed on stream S is reusable on S at once and on another stream
// only after every stream that used it (S, record_stream streams) has passed the free
// (events, never a host wait). The caller must not touch a block after freeing it.
// Thread-safe: one mutex; it is never held across the eviction hook, the swapper's
// notifications, or VMM calls.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "allocator/stats.hpp"
#include "device/device.hpp"
#include "profiling/snapshot.hpp"
#include "swapper/residency.hpp"

namespace spill {

struct Config;

struct AllocatorOptions {
  std::optional<std::size_t> budget;   // default: free device memory less a reserve
  std::size_t small_limit = 1u << 20;  // requests up to this go to the small pool
  std::string oom_dump;                // directory for a snapshot + trace on OOM

  static AllocatorOptions from_config(const Config& config);
};

// The swapper's side of the allocator: notifications for large blocks and the eviction hook.
// Called without the allocator's lock held.
class LargeBlockObserver {
 public:
  virtual ~LargeBlockObserver() = default;
  virtual void on_large_alloc(void* base, std::size_t size) = 0;
  virtual void on_large_free(void* base, Stream stream) = 0;
  // Free at least `bytes` of mapped memory now; returns what was freed.
  virtual std::size_t evict(std::size_t bytes) = 0;
  // The stream is about to be destroyed (forward of CachingAllocator::forget_stream).
  virtual void on_forget_stream(Stream) {}
};

class CachingAllocator final : public ResidencyBackend {
 public:
  CachingAllocator(Device& device, AllocatorOptions options = {});
  ~CachingAllocator() override;
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // Returns nullptr for 0 bytes. Throws OutOfMemory (the message says where every byte is).
  void* allocate(std::size_t bytes, Stream stream = nullptr);
  // Frees on the allocation stream, or on `stream`. Throws InvalidArgument for a pointer this
  // allocator does not own or a double free, leaving everything else intact.
  void deallocate(void* ptr);
  void deallocate(void* ptr, Stream stream);
  // The block is also used on `stream`: it is reused only when that use is done.
  void record_stream(void* ptr, Stream stream);
  // Call before destroying a stream that used the allocator's blocks: waits for it, then
  // forgets it here and in the observer (cached blocks and swap-outs would otherwise record
  // events on a dead stream).
  void forget_stream(Stream stream);
  // Returns every cached (free) segment and block to the device.
  void empty_cache();

  AllocatorStats stats() const;
  void reset_peak();
  std::size_t budget() const { return budget_; }
  Device& device() { return dev_; }
  void set_observer(LargeBlockObserver* observer);
  void set_host_pinned_source(std::function<std::size_t()> in_use);

  // ResidencyBackend, for the swapper.
  std::optional<SwappableBlock> find_block(const void* ptr) override;
  void unback(void* base, std::size_t size) override;
  void reback(void* base, std::size_t size) override;
  bool try_reback(void* base, std::size_t size) override;

  // Segments and blocks as they are now, for memory_viz snapshots.
  profiling::MemoryState snapshot() const;
  // Checks internal invariants (tests): throws Error describing the first violation.
  void check_invariants() const;

  struct Impl;

 private:
  void* allocate_small(std::size_t bytes, Stream stream);
  void* allocate_large(std::size_t bytes, Stream stream);
  void deallocate_impl(void* ptr, Stream stream, bool explicit_stream);
  void account_alloc_locked(struct Block* b, std::size_t bytes, Stream stream);
  // The ladder: makes room for `bytes` more mapped bytes and claims them (or throws).
  void make_room(std::unique_lock<std::mutex>& lock, std::size_t bytes);
  std::size_t release_cached_locked(std::unique_lock<std::mutex>& lock, std::size_t want);
  std::size_t release_idle_locked(std::size_t want, std::vector<Event>* pending);
  void forget_segment_locked(struct Segment* s);
  [[noreturn]] void throw_oom_locked(std::size_t bytes, bool device_full);
  std::string write_oom_dump_locked();
  void map_back(std::unique_lock<std::mutex>& lock, void* base, std::size_t size);
  profiling::MemoryState snapshot_locked() const;

  Device& dev_;
  std::size_t budget_ = 0;
  std::size_t small_limit_ = 1u << 20;
  std::string oom_dump_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace spill

// HostPool: pinned host memory for swapped-out blocks. Exact sizes (rounded to 512 B, never to
// a power of two) carved from large chunks that are page-locked with the device's
// register_host, under a host cap. Exhaustion is an OutOfMemory that says how much is in use,
// never a crash. Thread-safe (its own mutex).
#pragma once

#include <cstddef>
#include <mutex>
#include <optional>
#include <vector>

#include "allocator/block_pool.hpp"
#include "allocator/stats.hpp"
#include "swapper/residency.hpp"

namespace spill {

class HostPool final : public HostMemory {
 public:
  // `cap`: the most pinned host memory the pool may hold (nullopt: unlimited).
  HostPool(Device& device, std::optional<std::size_t> cap, std::size_t chunk_bytes = 64u << 20);
  ~HostPool() override;

  void* allocate(std::size_t bytes) override;
  void deallocate(void* ptr, std::size_t bytes) override;
  std::size_t in_use() const override;   // bytes handed out
  std::size_t reserved() const;          // bytes of registered chunks
  Stat stat() const;                     // pinned chunk bytes over time
  void release_free_chunks();

 private:
  void release_free_chunks_locked();

  Device& dev_;
  std::optional<std::size_t> cap_;
  std::size_t chunk_bytes_;
  mutable std::mutex mu_;
  BlockPool pool_;
  AddressSet used_;
  std::vector<Segment*> chunks_;
  std::size_t in_use_ = 0, reserved_ = 0;
  Stat stat_;
};

}  // namespace spill

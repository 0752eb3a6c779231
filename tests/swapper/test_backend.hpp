// A minimal residency backend for swapper tests: every block is its own reserved range with its
// own physical chunk, under a budget on mapped bytes that calls the swapper's eviction hook
// (without holding its lock) when it would be passed. Pinned host memory comes from the
// device under a cap. It checks the invariants the swapper must keep: never unback a block
// twice, never map past the budget.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "device/device.hpp"
#include "swapper/residency.hpp"

namespace spill::test {

class TestBackend final : public ResidencyBackend {
 public:
  TestBackend(Device& d, std::size_t budget) : dev_(d), budget_(budget) {}
  ~TestBackend() override {
    for (auto& [base, b] : blocks_) {
      if (b.backed) {
        dev_.unmap(reinterpret_cast<void*>(base), b.size);
        dev_.release_physical(b.handle, b.size);
      }
      dev_.unreserve(reinterpret_cast<void*>(base), b.size);
    }
  }

  std::function<std::size_t(std::size_t)> evict_hook;

  void* allocate(std::size_t bytes) {
    std::size_t g = dev_.granularity();
    std::size_t size = (bytes + g - 1) / g * g;
    void* base = dev_.reserve(size);
    try {
      back(base, size);
    } catch (...) {
      dev_.unreserve(base, size);
      throw;
    }
    std::lock_guard lock(mu_);
    blocks_[key(base)].size = size;
    return base;
  }

  void free(void* base) {
    std::lock_guard lock(mu_);
    auto it = blocks_.find(key(base));
    SPILL_EXPECTS(it != blocks_.end(), "test backend: free of an unknown block");
    if (it->second.backed) {
      dev_.unmap(base, it->second.size);
      dev_.release_physical(it->second.handle, it->second.size);
      mapped_ -= it->second.size;
    }
    dev_.unreserve(base, it->second.size);
    blocks_.erase(it);
  }

  std::optional<SwappableBlock> find_block(const void* ptr) override {
    std::lock_guard lock(mu_);
    auto it = blocks_.upper_bound(key(ptr));
    if (it == blocks_.begin()) return std::nullopt;
    --it;
    if (key(ptr) >= it->first + it->second.size) return std::nullopt;
    return SwappableBlock{reinterpret_cast<void*>(it->first), it->second.size};
  }

  void unback(void* base, std::size_t size) override {
    std::lock_guard lock(mu_);
    Block& b = blocks_.at(key(base));
    SPILL_EXPECTS(b.backed && b.size == size, "test backend: unback of an unbacked block");
    dev_.unmap(base, size);
    dev_.release_physical(b.handle, size);
    b.backed = false;
    mapped_ -= size;
    unbacks_++;
  }

  void reback(void* base, std::size_t size) override {
    {
      std::lock_guard lock(mu_);
      SPILL_EXPECTS(!blocks_.at(key(base)).backed, "test backend: reback of a backed block");
    }
    back(base, size);
  }

  bool try_reback(void* base, std::size_t size) override {
    std::lock_guard lock(mu_);
    Block& b = blocks_.at(key(base));
    SPILL_EXPECTS(!b.backed, "test backend: reback of a backed block");
    if (mapped_ + size > budget_) return false;
    PhysicalHandle h = dev_.create_physical(size);
    dev_.map(base, size, h);
    b.handle = h;
    b.backed = true;
    mapped_ += size;
    peak_ = std::max(peak_, mapped_);
    return true;
  }

  std::size_t mapped() const {
    std::lock_guard lock(mu_);
    return mapped_;
  }
  std::size_t room() override {
    std::lock_guard lock(mu_);
    return budget_ > mapped_ ? budget_ - mapped_ : 0;
  }
  std::size_t mapped_bytes() override { return mapped(); }
  std::size_t peak_mapped() const {
    std::lock_guard lock(mu_);
    return peak_;
  }
  std::size_t budget() const { return budget_; }

 private:
  struct Block {
    std::size_t size = 0;
    PhysicalHandle handle = 0;
    bool backed = false;
  };
  static std::uintptr_t key(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

  // Maps physical memory for [base, base+size), asking the hook for room first. Other threads
  // evict and map concurrently, so it gives up only after several rounds without progress.
  void back(void* base, std::size_t size) {
    for (int strikes = 0;;) {
      std::size_t over = 0, before = 0;
      {
        std::lock_guard lock(mu_);
        if (mapped_ + size <= budget_) {
          PhysicalHandle h = dev_.create_physical(size);
          dev_.map(base, size, h);
          Block& b = blocks_[key(base)];
          b.size = size;
          b.handle = h;
          b.backed = true;
          mapped_ += size;
          peak_ = std::max(peak_, mapped_);
          return;
        }
        over = mapped_ + size - budget_;
        before = mapped_;
      }
      std::size_t freed = evict_hook ? evict_hook(over) : 0;
      bool progress = freed > 0 || mapped() < before;
      if (progress) {
        strikes = 0;
      } else if (++strikes >= 64) {
        SPILL_FAIL_OOM("test backend: " + format_bytes(size) + " does not fit the budget of " +
                       format_bytes(budget_) + " (" + format_bytes(mapped()) + " mapped)");
      } else {
        // Other threads may be finishing evictions or have just taken the room.
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
    }
  }

  Device& dev_;
  std::size_t budget_;
  mutable std::mutex mu_;
  std::map<std::uintptr_t, Block> blocks_;
  std::size_t mapped_ = 0, peak_ = 0;

 public:
  std::size_t unbacks_ = 0;
};

class TestHost final : public HostMemory {
 public:
  TestHost(Device& d, std::size_t cap) : dev_(d), cap_(cap) {}
  void* allocate(std::size_t bytes) override {
    std::lock_guard lock(mu_);
    if (in_use_ + bytes > cap_) {
      SPILL_FAIL_OOM("test host: cap " + format_bytes(cap_) + " reached (" +
                     format_bytes(in_use_) + " in use, " + format_bytes(bytes) + " asked)");
    }
    in_use_ += bytes;
    return dev_.allocate_host(bytes);
  }
  void deallocate(void* ptr, std::size_t bytes) override {
    dev_.free_host(ptr);
    std::lock_guard lock(mu_);
    in_use_ -= bytes;
  }
  std::size_t in_use() const override {
    std::lock_guard lock(mu_);
    return in_use_;
  }

 private:
  Device& dev_;
  std::size_t cap_;
  mutable std::mutex mu_;
  std::size_t in_use_ = 0;
};

}  // namespace spill::test

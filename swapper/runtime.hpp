// The assembled stack for one device, from one Config: device (auto/cuda/sim), caching
// allocator with its budget, pinned host pool under host_cap, and the swapper wired into the
// allocator (new large blocks are tracked, frees release them, the ladder's eviction hook
// evicts). This is what `spill demo`, the trainer and the C API stand on. On the simulated
// device, trace events are stamped with simulated time while the runtime lives
// (profiling::TraceRecorder::set_clock), so traces agree with the times the run reports.
#pragma once

#include <memory>
#include <string>

#include "allocator/caching_allocator.hpp"
#include "allocator/host_pool.hpp"
#include "core/config.hpp"
#include "device/select.hpp"
#include "swapper/swapper.hpp"
#include "swapper/synthetic_step.hpp"

namespace spill {

struct RuntimeOptions {
  // Blocks are swappable only once declared (Swapper::set_swappable): the C API's mode. Off:
  // every large block is swappable (C++ callers that pin every use: spill demo, the trainer).
  bool opt_in_swappable = false;
};

class Runtime {
 public:
  explicit Runtime(const Config& config, RuntimeOptions options = {});
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  Device& device() { return *device_; }
  CachingAllocator& allocator() { return *allocator_; }
  HostPool& host() { return *host_; }
  Swapper* swapper() { return swapper_.get(); }  // null with policy:none
  const std::string& device_reason() const { return reason_; }
  const Config& config() const { return config_; }

  // The allocator as the synthetic step's memory.
  StepMemory& step_memory();

  // Changes the budget at run time (CachingAllocator::set_budget); the swapper plans for the
  // new one from its next step. A failure to lower it names what holds the memory, the
  // swapper's unevictable blocks included, and keeps the old budget.
  void set_budget(std::size_t bytes);
  // Returns cached device memory (CachingAllocator::empty_cache) and the pinned host memory
  // that holds no swapped-out bytes, the host buffers of blocks freed while a copy touched
  // them included (Swapper::reap_freed waits for those copies first).
  void empty_cache();

 private:
  class Hooks;
  class AllocatorMemory;
  void build(const Config& config, RuntimeOptions options);  // everything above the device
  Config config_;
  std::string reason_;
  std::unique_ptr<Device> device_;
  std::unique_ptr<HostPool> host_;
  std::unique_ptr<CachingAllocator> allocator_;
  std::unique_ptr<Swapper> swapper_;
  std::unique_ptr<Hooks> hooks_;
  std::unique_ptr<AllocatorMemory> memory_;
};

}  // namespace spill

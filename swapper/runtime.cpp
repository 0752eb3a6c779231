#include "swapper/runtime.hpp"

#include <algorithm>

#include "core/errors.hpp"
#include "device/sim_device.hpp"
#include "profiling/events.hpp"

namespace spill {

// The swapper as the allocator's observer.
class Runtime::Hooks final : public LargeBlockObserver {
 public:
  explicit Hooks(Swapper& s) : s_(s) {}
  void on_large_alloc(void* base, std::size_t size, std::size_t request,
                      Stream stream) override {
    s_.track(base, size, stream, request);
  }
  void on_large_free(void* base, Stream stream) override { s_.release(base, stream); }
  std::size_t evict(std::size_t bytes) override { return s_.evict_bytes(bytes); }
  void on_forget_stream(Stream stream) override { s_.forget_stream(stream); }
  std::optional<Unevictable> unevictable() override { return s_.unevictable(); }

 private:
  Swapper& s_;
};

class Runtime::AllocatorMemory final : public StepMemory {
 public:
  explicit AllocatorMemory(CachingAllocator& a) : a_(a) {}
  void* allocate(std::size_t bytes, Stream stream) override { return a_.allocate(bytes, stream); }
  void free(void* ptr, Stream stream) override { a_.deallocate(ptr, stream); }
  std::size_t mapped_bytes() const override {
    return static_cast<std::size_t>(a_.stats().reserved.current);
  }
  std::size_t peak_mapped_bytes() const override {
    return static_cast<std::size_t>(a_.stats().reserved.peak);
  }
  void reset_peak() override { a_.reset_peak(); }
  void forget_stream(Stream s) override { a_.forget_stream(s); }

 private:
  CachingAllocator& a_;
};

Runtime::Runtime(const Config& config, RuntimeOptions options) : config_(config) {
  DeviceSelection sel = make_device(config);
  device_ = std::move(sel.device);
  reason_ = sel.reason;
  // On the simulated device, trace events carry simulated time, the time the run reports.
  if (auto* sim = dynamic_cast<SimDevice*>(device_.get())) {
    profiling::TraceRecorder::set_clock(
        {[](const void* d) { return static_cast<const SimDevice*>(d)->trace_now_ns(); }, sim,
         "simulated (" + sim->info().name + ", link model " + sim->info().link_name + ")"});
  }
  try {
    build(config, options);
  } catch (...) {
    profiling::TraceRecorder::clear_clock(device_.get());
    throw;
  }
}

void Runtime::build(const Config& config, RuntimeOptions options) {
  host_ = std::make_unique<HostPool>(*device_, config.host_cap);
  AllocatorOptions ao = AllocatorOptions::from_config(config);
  allocator_ = std::make_unique<CachingAllocator>(*device_, ao);
  allocator_->set_host_pool(host_.get());
  if (config.policy != SwapPolicy::None) {
    SwapperOptions so;
    so.policy = config.policy;
    so.budget = allocator_->budget();
    so.min_swap_bytes = std::max<std::size_t>(config.swap_threshold, 1);
    so.opt_in = options.opt_in_swappable;
    try {
      so.link = link_preset(device_->info().link_name);
    } catch (const InvalidArgument&) {
      // Keep the default preset: the device reported a link we have no model for.
    }
    // Plan with the bandwidths the device reports (the simulated device's may be overridden).
    if (device_->info().h2d_gbps > 0) so.link.h2d_gbps = device_->info().h2d_gbps;
    if (device_->info().d2h_gbps > 0) so.link.d2h_gbps = device_->info().d2h_gbps;
    swapper_ = std::make_unique<Swapper>(*device_, *allocator_, *host_, so);
    hooks_ = std::make_unique<Hooks>(*swapper_);
    allocator_->set_observer(hooks_.get());
  }
  memory_ = std::make_unique<AllocatorMemory>(*allocator_);
}

Runtime::~Runtime() {
  if (allocator_) allocator_->set_observer(nullptr);
  // Order: the swapper frees its host buffers before the host pool goes; blocks still
  // allocated are returned by the allocator's destructor.
  swapper_.reset();
  allocator_.reset();
  host_.reset();
  profiling::TraceRecorder::clear_clock(device_.get());
}

StepMemory& Runtime::step_memory() { return *memory_; }

void Runtime::empty_cache() {
  if (swapper_) swapper_->reap_freed();  // before the pool gives back its empty chunks
  allocator_->empty_cache();
}

void Runtime::set_budget(std::size_t bytes) {
  try {
    allocator_->set_budget(bytes);
  } catch (const OutOfMemory& e) {
    if (!swapper_) throw;
    throw OutOfMemory(with_more(e.what(), "; " + swapper_->residency_report()));
  }
  if (swapper_) swapper_->set_budget(bytes);
}

}  // namespace spill

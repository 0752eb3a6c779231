#include "swapper/synthetic_step.hpp"

#include <algorithm>
#include <array>
#include <deque>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "device/sim_device.hpp"

namespace spill {
namespace {

std::uint8_t weight_value(int layer) { return static_cast<std::uint8_t>(layer * 13 + 5); }
std::uint8_t activation_value(int step, int layer) {
  return static_cast<std::uint8_t>(step * 31 + layer * 7 + 1);
}

// Samples a block at its start, middle and end into host memory; checked after the step.
struct Sample {
  const void* block;
  std::size_t bytes;
  std::uint8_t expected;
  std::string what;
  std::array<unsigned char, 3 * 4096> data;
};

class Runner {
 public:
  Runner(Device& d, StepMemory& m, Swapper& s, const SyntheticStepConfig& c)
      : dev_(d), mem_(m), swp_(s), c_(c), sim_(dynamic_cast<SimDevice*>(&d)) {
    stream_ = dev_.create_stream();
    t0_ = dev_.create_event(true);
    t1_ = dev_.create_event(true);
  }
  ~Runner() {
    try {
      dev_.synchronize(stream_);
      dev_.destroy_event(t0_);
      dev_.destroy_event(t1_);
      mem_.forget_stream(stream_);
      dev_.destroy_stream(stream_);
    } catch (const std::exception&) {
      // A device error is already on its way out as the run's exception.
    }
  }

  std::vector<StepResult> run() {
    for (int l = 0; l < c_.layers; ++l) {
      void* w = mem_.allocate(c_.weight_bytes, stream_);
      weights_.push_back(w);
      swp_.pin(w, stream_);
      dev_.fill_async(w, weight_value(l), c_.weight_bytes, stream_);
      swp_.unpin(w, stream_, true);
    }
    grad_ = mem_.allocate(c_.activation_bytes, stream_);
    std::vector<StepResult> results;
    for (int step = 0; step < c_.steps; ++step) {
      results.push_back(run_step(step));
      if (c_.after_step) c_.after_step(step);
    }
    mem_.free(grad_, stream_);
    for (void* w : weights_) mem_.free(w, stream_);
    dev_.synchronize(stream_);
    return results;
  }

 private:
  void compute(double seconds) {
    if (sim_ != nullptr) sim_->enqueue_compute(stream_, seconds);
    compute_s_ += sim_ != nullptr ? seconds : 0.0;
  }

  void sample(const void* block, std::size_t bytes, std::uint8_t expected, std::string what) {
    samples_.push_back({block, bytes, expected, std::move(what), {}});
    Sample& s = samples_.back();
    const std::size_t n = std::min<std::size_t>(4096, bytes);
    const std::size_t offsets[3] = {0, bytes / 2 - std::min(bytes / 2, n / 2), bytes - n};
    for (int i = 0; i < 3; ++i) {
      dev_.copy_async(s.data.data() + i * 4096, static_cast<const char*>(block) + offsets[i], n,
                      CopyKind::DeviceToHost, stream_);
    }
  }

  StepResult run_step(int step) {
    StepResult r;
    compute_s_ = 0;
    samples_.clear();
    SwapStats before = swp_.stats();
    mem_.reset_peak();
    swp_.begin_step();
    dev_.record(t0_, stream_);
    std::vector<void*> acts(c_.layers, nullptr);
    for (int l = 0; l < c_.layers; ++l) {  // forward
      swp_.begin_op();
      if (l > 0) swp_.pin(acts[l - 1], stream_);
      swp_.pin(weights_[l], stream_);
      acts[l] = mem_.allocate(c_.activation_bytes, stream_);
      swp_.pin(acts[l], stream_);
      compute(c_.forward_s);
      dev_.fill_async(acts[l], activation_value(step, l), c_.activation_bytes, stream_);
      swp_.unpin(acts[l], stream_, true);
      swp_.unpin(weights_[l], stream_, false);
      if (l > 0) swp_.unpin(acts[l - 1], stream_, false);
    }
    for (int l = c_.layers - 1; l >= 0; --l) {  // backward
      swp_.begin_op();
      swp_.pin(acts[l], stream_);
      swp_.pin(weights_[l], stream_);
      swp_.pin(grad_, stream_);
      sample(acts[l], c_.activation_bytes, activation_value(step, l),
             "activation " + std::to_string(l));
      sample(weights_[l], c_.weight_bytes, weight_value(l), "weight " + std::to_string(l));
      compute(c_.backward_s);
      dev_.fill_async(grad_, static_cast<std::uint8_t>(l), c_.activation_bytes, stream_);
      swp_.unpin(grad_, stream_, true);
      swp_.unpin(weights_[l], stream_, false);
      swp_.unpin(acts[l], stream_, false);
      mem_.free(acts[l], stream_);
    }
    dev_.record(t1_, stream_);
    swp_.end_step();
    dev_.synchronize(stream_);
    r.step_time_s = dev_.elapsed_ms(t0_, t1_) * 1e-3;
    r.compute_s = compute_s_;
    r.stall_s = std::max(0.0, r.step_time_s - r.compute_s);
    r.peak_mapped = mem_.peak_mapped_bytes();
    r.swaps = swaps_since(swp_.stats(), before);
    for (const Sample& s : samples_) {
      for (unsigned char byte : s.data) {
        if (byte != s.expected && r.data_ok) {
          r.data_ok = false;
          r.first_error = "step " + std::to_string(step) + ": " + s.what + " at " +
                          format_address(s.block) + " holds " + std::to_string(byte) +
                          ", expected " + std::to_string(s.expected);
        }
      }
    }
    return r;
  }

  Device& dev_;
  StepMemory& mem_;
  Swapper& swp_;
  const SyntheticStepConfig& c_;
  SimDevice* sim_;
  Stream stream_ = nullptr;
  Event t0_ = nullptr, t1_ = nullptr;
  std::vector<void*> weights_;
  void* grad_ = nullptr;
  double compute_s_ = 0;
  std::deque<Sample> samples_;  // stable addresses: copies land in them asynchronously
};

}  // namespace

std::size_t SyntheticStepConfig::footprint() const {
  return static_cast<std::size_t>(layers) * (weight_bytes + activation_bytes) + activation_bytes;
}

std::vector<StepResult> run_synthetic_steps(Device& device, StepMemory& memory, Swapper& swapper,
                                            const SyntheticStepConfig& config) {
  SPILL_EXPECTS(config.layers >= 1 && config.steps >= 1,
                "synthetic step: layers and steps must be at least 1");
  SPILL_EXPECTS(config.weight_bytes >= 4096 && config.activation_bytes >= 4096,
                "synthetic step: blocks must be at least 4 KiB");
  return Runner(device, memory, swapper, config).run();
}

}  // namespace spill

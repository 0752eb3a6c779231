// A synthetic training step for `spill demo` and the swapper's tests: a chain of layers run
// forward (each op reads the previous activation and its weight, writes its activation) then
// backward in reverse (each op reads its activation and weight, writes a gradient), with the
// activations kept from forward to backward: the footprint grows with the depth while each op
// needs little. Every access goes through the pin/unpin protocol. Data are checked: each block
// holds a byte value known per (step, layer), sampled while running and checked in full at the
// end of each step. On SimDevice ops take simulated compute time; on a GPU they are fills.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "device/device.hpp"
#include "swapper/swapper.hpp"

namespace spill {

// Where the step's blocks come from: the caching allocator, or a test backend. It is also
// responsible for telling the swapper about new blocks (track) and freed ones (release), as
// the allocator does through its observer.
class StepMemory {
 public:
  virtual ~StepMemory() = default;
  virtual void* allocate(std::size_t bytes, Stream stream) = 0;
  virtual void free(void* ptr, Stream stream) = 0;
  virtual std::size_t mapped_bytes() const = 0;
  virtual std::size_t peak_mapped_bytes() const = 0;
  virtual void reset_peak() = 0;
  // The stream is about to be destroyed (the caching allocator must forget it).
  virtual void forget_stream(Stream) {}
};

struct SyntheticStepConfig {
  int layers = 16;
  std::size_t weight_bytes = 16u << 20;
  std::size_t activation_bytes = 32u << 20;
  double forward_s = 2e-3;   // simulated compute per forward op
  double backward_s = 4e-3;  // per backward op
  int steps = 3;
  // Called after each step has ended, with its index from 0 (spill demo takes the trace's events
  // there, so that a long run loses none to the recorder's rings).
  std::function<void(int step)> after_step;

  std::size_t footprint() const;  // bytes of all blocks if nothing were ever freed or moved
};

struct StepResult {
  double step_time_s = 0;   // device time of the step on the compute stream
  double compute_s = 0;     // of which compute
  double stall_s = 0;       // step time not spent computing: waiting for swaps
  std::size_t peak_mapped = 0;
  SwapStats swaps;          // this step's swap counts (differences)
  bool data_ok = true;
  std::string first_error;
};

// Runs `config.steps` steps (begin_step/end_step around each) and returns one result per step.
std::vector<StepResult> run_synthetic_steps(Device& device, StepMemory& memory, Swapper& swapper,
                                            const SyntheticStepConfig& config);

}  // namespace spill

// GPU presets for the planner and simulator (peak FLOP/s per dtype, memory bandwidth and size),
// the roofline that turns an op's FLOPs and bytes into a duration, and reading a link model from
// `spill bench link --json`. Links themselves are core/link_model.hpp's presets, so the simulated
// device and the planner agree on them.
// Preset figures are vendor datasheet numbers (dense, no sparsity) unless a comment says
// "assumption"; achieved fractions of peak are assumptions of this model, not measurements.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/link_model.hpp"
#include "graph/ir.hpp"

namespace spill::graph {

struct GpuModel {
  std::string name;         // preset key, e.g. "a100-40gb"
  std::string description;
  std::uint64_t memory_bytes = 0;
  double mem_bw_gbps = 0;   // device memory bandwidth, GB/s
  double f32_tflops = 0;    // peak without tensor cores
  double tf32_tflops = 0;   // tensor-core TF32 (0: not supported, falls back to f32)
  double f16_tflops = 0;    // tensor-core FP16
  double bf16_tflops = 0;   // tensor-core BF16 (0: not supported, falls back to f32)
  double f64_tflops = 0;
  // Roofline assumptions: fraction of peak reached by large kernels, and a per-op fixed cost.
  double compute_efficiency = 0.6;
  double memory_efficiency = 0.8;
  double op_overhead_us = 5.0;

  // Peak FLOP/s for ops whose data type is `d`.
  double peak_flops(DType d) const;
};

// Presets: titanx-12gb, v100-16gb, a10-24gb, a100-40gb, a100-80gb, h100-pcie, h100-sxm, h200, gh200.
const std::vector<GpuModel>& gpu_presets();
// Throws InvalidArgument listing the known names.
const GpuModel& gpu_preset(std::string_view name);

// The op's duration: its measured time when the graph gives one, else the roofline
// max(flops / (peak * compute_efficiency), bytes / (bandwidth * memory_efficiency)) + overhead.
// The op's dtype is that of its first written tensor (else first read, else f32).
double op_time_s(const Graph& g, const Op& op, const GpuModel& gpu);
std::vector<double> op_times_s(const Graph& g, const GpuModel& gpu);

// Copy time for `bytes` over `link` in one direction, with the other direction busy or not.
double copy_time_s(const LinkModel& link, std::uint64_t bytes, bool to_device, bool duplex);

// Reads the JSON written by `spill bench link --json` ({"device", "simulated", "results":
// [{"direction", "host_memory", "bytes", "gbps"}]}) into a link model: pinned h2d/d2h bandwidth
// at the largest size, latency fitted from the smallest size, duplex efficiency from "bidir".
// `source` names the input in errors.
LinkModel link_from_bench_json(std::string_view json_text, std::string_view source);

// A link preset name, or a path to a `spill bench link` JSON file.
LinkModel resolve_link(std::string_view name_or_path);

}  // namespace spill::graph

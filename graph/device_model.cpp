#include "graph/device_model.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "core/errors.hpp"
#include "core/json_read.hpp"
#include "core/units.hpp"

namespace spill::graph {

double GpuModel::peak_flops(DType d) const {
  auto or_f32 = [&](double v) { return (v > 0 ? v : f32_tflops) * 1e12; };
  switch (d) {
    case DType::TF32: return or_f32(tf32_tflops);
    case DType::F16: return or_f32(f16_tflops);
    case DType::BF16: return or_f32(bf16_tflops);
    case DType::F64: return or_f32(f64_tflops);
    default: return f32_tflops * 1e12;
  }
}

const std::vector<GpuModel>& gpu_presets() {
  // Datasheet figures, dense (no structured sparsity), boost clocks. Memory sizes marketed as
  // "N GB" are taken as N GiB, which is what the HBM stacks hold (assumption for H200's "141GB").
  // compute_efficiency / memory_efficiency / op_overhead_us keep their defaults (assumptions).
  static const std::vector<GpuModel> presets{
      // GeForce GTX TITAN X (Maxwell GM200): 6.6 TFLOPS FP32, 336.5 GB/s GDDR5, 12 GB. No fast
      // FP16 or tensor cores, so FP16 runs at the FP32 rate (assumption: promoted math).
      {"titanx-12gb", "GeForce GTX TITAN X (Maxwell), 12 GB", 12 * GiB, 336.5, 6.6, 0, 0, 0,
       0.21},
      // Tesla V100 SXM2 16 GB: 15.7 TFLOPS FP32, 125 TFLOPS tensor FP16, 7.8 FP64, 900 GB/s.
      // No BF16/TF32: those fall back to FP32.
      {"v100-16gb", "Tesla V100 SXM2, 16 GB", 16 * GiB, 900.0, 15.7, 0, 125.0, 0, 7.8},
      // A10 (Ampere GA102, PCIe 4.0 x16): 31.2 TFLOPS FP32, 62.5 TF32, 125 FP16/BF16 tensor,
      // 600 GB/s GDDR6, 24 GB. FP64 is not on the datasheet: 1/64 of FP32 as on GA102
      // (assumption).
      {"a10-24gb", "A10 (PCIe), 24 GB", 24 * GiB, 600.0, 31.2, 62.5, 125.0, 125.0, 0.49},
      // A100 SXM4 40 GB: 19.5 FP32, 156 TF32, 312 FP16/BF16, 9.7 FP64, 1,555 GB/s.
      {"a100-40gb", "A100 SXM4, 40 GB", 40 * GiB, 1555.0, 19.5, 156.0, 312.0, 312.0, 9.7},
      // A100 SXM4 80 GB: same compute, 2,039 GB/s.
      {"a100-80gb", "A100 SXM4, 80 GB", 80 * GiB, 2039.0, 19.5, 156.0, 312.0, 312.0, 9.7},
      // H100 PCIe 80 GB: 51 FP32, 378 TF32, 756 FP16/BF16 (dense), 26 FP64, 2,000 GB/s.
      {"h100-pcie", "H100 PCIe, 80 GB", 80 * GiB, 2000.0, 51.0, 378.0, 756.0, 756.0, 26.0},
      // H100 SXM5 80 GB: 67 FP32, 494.7 TF32, 989.4 FP16/BF16 (dense), 34 FP64, 3,350 GB/s.
      {"h100-sxm", "H100 SXM5, 80 GB", 80 * GiB, 3350.0, 67.0, 494.7, 989.4, 989.4, 34.0},
      // H200 SXM 141 GB: H100 SXM compute, 4,800 GB/s HBM3e.
      {"h200", "H200 SXM, 141 GB", 141 * GiB, 4800.0, 67.0, 494.7, 989.4, 989.4, 34.0},
      // GH200 (96 GB HBM3 version): H100 SXM compute, 4,000 GB/s; host over NVLink-C2C.
      {"gh200", "GH200 Grace Hopper, 96 GB HBM3", 96 * GiB, 4000.0, 67.0, 494.7, 989.4, 989.4,
       34.0},
  };
  return presets;
}

const GpuModel& gpu_preset(std::string_view name) {
  std::string known;
  for (const GpuModel& m : gpu_presets()) {
    if (m.name == name) return m;
    known += (known.empty() ? "" : ", ") + m.name;
  }
  throw InvalidArgument("unknown device preset '" + std::string(name) + "' (known: " + known +
                        ")");
}

double op_time_s(const Graph& g, const Op& op, const GpuModel& gpu) {
  if (op.time_s) return *op.time_s;
  DType d = DType::F32;
  if (!op.writes.empty()) d = g.tensors[op.writes.front()].dtype;
  else if (!op.reads.empty()) d = g.tensors[op.reads.front()].dtype;
  double compute = op.flops / (gpu.peak_flops(d) * gpu.compute_efficiency);
  double memory = op_traffic_bytes(g, op) / (gpu.mem_bw_gbps * 1e9 * gpu.memory_efficiency);
  return std::max(compute, memory) + gpu.op_overhead_us * 1e-6;
}

std::vector<double> op_times_s(const Graph& g, const GpuModel& gpu) {
  std::vector<double> t(g.ops.size());
  for (std::size_t i = 0; i < g.ops.size(); ++i) t[i] = op_time_s(g, g.ops[i], gpu);
  return t;
}

double copy_time_s(const LinkModel& link, std::uint64_t bytes, bool to_device, bool duplex) {
  double gbps = to_device ? link.h2d_gbps : link.d2h_gbps;
  if (duplex) gbps *= link.duplex_efficiency;
  return link.latency_us * 1e-6 + static_cast<double>(bytes) / (gbps * 1e9);
}

LinkModel link_from_bench_json(std::string_view json_text, std::string_view source) {
  const std::string src = "link file '" + std::string(source) + "'";
  return link_model_from_bench_json(parse_json(json_text, src), src);
}

LinkModel resolve_link(std::string_view name_or_path) {
  for (const LinkModel& m : link_presets())
    if (m.name == name_or_path) return m;
  const std::string path(name_or_path);
  // A name that looks like a path is a file (read_file_text says why it cannot be read);
  // anything else not a preset is an unknown preset (the error lists them).
  const bool looks_like_path = path.find('/') != std::string::npos || path.ends_with(".json");
  if (!looks_like_path && !std::ifstream(path)) return link_preset(name_or_path);
  return link_from_bench_json(read_file_text(path, "link file '" + path + "'"), path);
}

}  // namespace spill::graph

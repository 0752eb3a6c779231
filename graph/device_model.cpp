#include "graph/device_model.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/errors.hpp"
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
  const std::string src(source);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(json_text);
  } catch (const nlohmann::json::parse_error& e) {
    throw InvalidArgument("link file '" + src + "': not JSON at byte " +
                          std::to_string(e.byte) + ": " + e.what());
  }
  SPILL_EXPECTS(j.is_object() && j.contains("results") && j["results"].is_array(),
                "link file '" + src + "': expected an object with a 'results' array");
  struct Point {
    double bytes = 0, gbps = 0;
  };
  // Per direction: the smallest and the largest pinned transfer.
  std::vector<std::pair<std::string, std::pair<Point, Point>>> dirs;
  double pageable_sum = 0, pinned_sum = 0;
  for (std::size_t k = 0; k < j["results"].size(); ++k) {
    const auto& r = j["results"][k];
    const std::string at = "link file '" + src + "': results[" + std::to_string(k) + "]";
    SPILL_EXPECTS(r.is_object(), at + " is not an object");
    for (const char* f : {"direction", "bytes", "gbps"})
      SPILL_EXPECTS(r.contains(f), at + " has no field '" + f + "'");
    SPILL_EXPECTS(r["direction"].is_string(), at + ".direction must be a string");
    SPILL_EXPECTS(r["bytes"].is_number() && r["bytes"].get<double>() > 0,
                  at + ".bytes must be a positive number");
    SPILL_EXPECTS(r["gbps"].is_number() && r["gbps"].get<double>() > 0,
                  at + ".gbps must be a positive number");
    Point p{r["bytes"].get<double>(), r["gbps"].get<double>()};
    std::string mem = r.value("host_memory", std::string("pinned"));
    if (mem == "pageable") {
      pageable_sum += p.gbps;
      continue;
    }
    if (mem != "pinned") continue;
    pinned_sum += p.gbps;
    std::string dir = r["direction"].get<std::string>();
    auto it = std::find_if(dirs.begin(), dirs.end(), [&](auto& d) { return d.first == dir; });
    if (it == dirs.end()) {
      dirs.push_back({dir, {p, p}});
      continue;
    }
    if (p.bytes < it->second.first.bytes) it->second.first = p;
    if (p.bytes >= it->second.second.bytes) it->second.second = p;
  }
  auto find = [&](const char* dir) -> const std::pair<Point, Point>* {
    for (auto& d : dirs)
      if (d.first == dir) return &d.second;
    return nullptr;
  };
  const auto* h2d = find("h2d");
  const auto* d2h = find("d2h");
  SPILL_EXPECTS(h2d && d2h, "link file '" + src + "': needs pinned 'h2d' and 'd2h' results");
  LinkModel m;
  m.name = "measured";
  m.description = "from " + src + (j.value("simulated", false) ? " (simulated device)" : "");
  if (j.contains("device") && j["device"].is_string())
    m.description += ", " + j["device"].get<std::string>();
  m.kind = "measured";
  m.h2d_gbps = h2d->second.gbps;
  m.d2h_gbps = d2h->second.gbps;
  m.nominal_gbps = std::max(m.h2d_gbps, m.d2h_gbps);
  // Latency: what the smallest copy took beyond what the large-copy bandwidth explains.
  auto latency = [](const std::pair<Point, Point>& d) {
    double t_small = d.first.bytes / (d.first.gbps * 1e9);
    return std::max(0.0, t_small - d.first.bytes / (d.second.gbps * 1e9));
  };
  m.latency_us = 0.5 * (latency(*h2d) + latency(*d2h)) * 1e6;
  // "bidir" is read as the per-direction bandwidth while both directions run.
  if (const auto* both = find("bidir"))
    m.duplex_efficiency =
        std::clamp(both->second.gbps / (0.5 * (m.h2d_gbps + m.d2h_gbps)), 0.05, 1.0);
  if (pageable_sum > 0 && pinned_sum > 0)
    m.pageable_factor = std::clamp(pageable_sum / pinned_sum, 0.01, 1.0);
  return m;
}

LinkModel resolve_link(std::string_view name_or_path) {
  for (const LinkModel& m : link_presets())
    if (m.name == name_or_path) return m;
  std::ifstream in{std::string(name_or_path)};
  if (!in) return link_preset(name_or_path);  // throws, listing the presets
  std::stringstream ss;
  ss << in.rdbuf();
  return link_from_bench_json(ss.str(), name_or_path);
}

}  // namespace spill::graph

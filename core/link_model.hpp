// Host<->device interconnect models: nominal (spec) figures and the sustained figures the
// simulated device and the planner assume. These are model assumptions, not measurements;
// `spill bench link` measures the real thing.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace spill {

struct LinkModel {
  std::string name;          // preset key, e.g. "pcie4"
  std::string description;   // e.g. "PCIe 4.0 x16"
  std::string kind;          // "pcie", "nvlink", "c2c"
  double nominal_gbps = 0;   // spec bandwidth per direction, GB/s (1e9 B/s)
  double h2d_gbps = 0;       // sustained host-to-device GB/s assumed by the model
  double d2h_gbps = 0;       // sustained device-to-host GB/s assumed by the model
  double latency_us = 0;     // fixed cost per copy
  double duplex_efficiency = 1.0;  // fraction of each direction kept when both run at once
  double pageable_factor = 0.5;    // pageable host memory reaches this fraction of pinned
};

// The rates a link report may state, GB/s: from 1 KB/s to far above any interconnect.
inline constexpr double kMinLinkGbps = 1e-6;
inline constexpr double kMaxLinkGbps = 1e6;

// The presets: pcie3, pcie4, pcie5, nvlink2-p9, nvlink-c2c.
const std::vector<LinkModel>& link_presets();

// Looks a preset up by name; throws InvalidArgument listing the known names.
const LinkModel& link_preset(std::string_view name);

// A link model from the JSON that `spill bench link --json` writes: sustained bandwidths from
// the largest pinned copies, per-copy latency from the smallest, duplex efficiency from the
// bidirectional run and the pageable factor from pageable copies. Throws InvalidArgument
// naming `source`, the JSON path and the rule (core/json_read.hpp): sizes are integers in
// [1, 2^63 - 1], rates numbers in [kMinLinkGbps, kMaxLinkGbps].
LinkModel link_model_from_bench_json(const nlohmann::json& report,
                                     std::string_view source = "link report");

}  // namespace spill

#include "core/link_model.hpp"

#include "core/errors.hpp"

namespace spill {

const std::vector<LinkModel>& link_presets() {
  // Sustained figures are round numbers typical of published copy benchmarks for each link
  // generation (roughly 80% of spec for PCIe, more for NVLink); they are assumptions.
  static const std::vector<LinkModel> presets{
      {"pcie3", "PCIe 3.0 x16", "pcie", 15.75, 12.0, 12.5, 10.0, 0.85, 0.5},
      {"pcie4", "PCIe 4.0 x16", "pcie", 31.5, 25.0, 25.0, 8.0, 0.85, 0.5},
      {"pcie5", "PCIe 5.0 x16", "pcie", 63.0, 52.0, 52.0, 8.0, 0.85, 0.4},
      {"nvlink2-p9", "NVLink 2.0 to a POWER9 host (3 bricks)", "nvlink", 75.0, 68.0, 68.0, 5.0,
       0.9, 0.3},
      {"nvlink-c2c", "NVLink-C2C (Grace Hopper)", "c2c", 450.0, 380.0, 380.0, 3.0, 0.9, 0.3},
  };
  return presets;
}

const LinkModel& link_preset(std::string_view name) {
  std::string known;
  for (const LinkModel& m : link_presets()) {
    if (m.name == name) return m;
    known += (known.empty() ? "" : ", ") + m.name;
  }
  throw InvalidArgument("unknown link preset '" + std::string(name) + "' (known: " + known + ")");
}

}  // namespace spill

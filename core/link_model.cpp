#include "core/link_model.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "core/json_read.hpp"

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
  throw InvalidArgument("unknown link preset '" + excerpt(name) + "' (known: " + known + ")");
}

namespace {

struct Point {
  double bytes = 0, gbps = 0;
};

struct Row {
  std::string direction, host_memory;
  Point p;
};

// The smallest and largest measured sizes for one direction and host memory.
std::pair<Point, Point> extremes(const std::vector<Row>& rows, const char* dir, const char* mem) {
  Point lo, hi;
  for (const Row& r : rows) {
    if (r.direction != dir || r.host_memory != mem) continue;
    if (lo.bytes == 0 || r.p.bytes < lo.bytes) lo = r.p;
    if (r.p.bytes > hi.bytes) hi = r.p;
  }
  return {lo, hi};
}

}  // namespace

LinkModel link_model_from_bench_json(const nlohmann::json& report, std::string_view source) {
  const JsonValue top(report, std::string(source));
  const std::string kind = which_spill_file(report);
  if (!top.has("format") && !kind.empty())
    top.fail_field("format", "missing: not a `spill bench link --json` file" + kind);
  const std::string format = top.string_field("format", std::nullopt, 64);
  if (format != "spill-link-bench")
    top.fail_field("format", "expected \"spill-link-bench\" (a `spill bench link --json` file), "
                             "found \"" + format + "\"" + kind);
  const JsonValue results = top.at("results");
  std::vector<Row> rows;
  for (std::size_t k = 0; k < results.size(); ++k) {
    const JsonValue r = results.at(k);
    // A size whose copies came back wrong measured no bandwidth worth planning with.
    if (!r.bool_field("verified", true))
      r.fail_field("verified", "false: this size's copies did not verify (data corrupted on "
                               "the link); measure again before planning with it");
    Row row;
    row.direction = r.string_field("direction", std::nullopt, 64);
    row.host_memory = r.string_field("host_memory", std::string("pinned"), 64);
    row.p.bytes = double(r.uint_field("bytes", 1, kMaxBytes));
    row.p.gbps = r.number_field("gbps", kMinLinkGbps, kMaxLinkGbps);
    rows.push_back(std::move(row));
  }
  auto [h2d_lo, h2d_hi] = extremes(rows, "h2d", "pinned");
  auto [d2h_lo, d2h_hi] = extremes(rows, "d2h", "pinned");
  SPILL_EXPECTS(h2d_hi.gbps > 0 && d2h_hi.gbps > 0,
                top.origin() + ": needs pinned 'h2d' and 'd2h' results");
  // Each copy takes latency + bytes / bandwidth: fit both from the smallest and largest sizes.
  // A fit that is not physical (times that barely differ) falls back to the largest size's rate.
  auto fit = [](Point lo, Point hi, double* latency_s) {
    double t_lo = lo.bytes / (lo.gbps * 1e9), t_hi = hi.bytes / (hi.gbps * 1e9);
    *latency_s = 0;
    if (hi.bytes <= lo.bytes || t_hi <= t_lo) return hi.gbps;
    double bw = (hi.bytes - lo.bytes) / (t_hi - t_lo);
    if (!std::isfinite(bw) || bw / 1e9 > kMaxLinkGbps) return hi.gbps;
    *latency_s = std::max(0.0, t_hi - hi.bytes / bw);
    return bw / 1e9;
  };
  const std::string src(source);
  LinkModel m;
  // A sweep made on the simulated device reproduces the link model it ran under: its figures
  // are simulated ones, never called measured (audit 38b #2).
  const std::string device = top.string_field("device", std::string("?"), 256);
  if (top.bool_field("simulated", false)) {
    const std::string model = top.string_field("link", std::string(), 256);
    m.name = "simulated";
    m.description = "simulated by spill bench link on " + device + " (link model " +
                    (model.empty() ? std::string("not named") : model) + "), from " + src;
    m.kind = "simulated";
  } else {
    m.name = "measured";
    m.description = "measured by spill bench link on " + device + ", from " + src;
    m.kind = "measured";
  }
  double lat_h2d = 0, lat_d2h = 0;
  m.h2d_gbps = fit(h2d_lo, h2d_hi, &lat_h2d);
  m.d2h_gbps = fit(d2h_lo, d2h_hi, &lat_d2h);
  m.nominal_gbps = std::max(m.h2d_gbps, m.d2h_gbps);
  m.latency_us = 0.5 * (lat_h2d + lat_d2h) * 1e6;
  auto [bi_lo, bi_hi] = extremes(rows, "bidir", "pinned");
  // Compare like with like: the bidirectional (total of both directions) and pageable figures
  // at the largest size against the pinned one-way figures at that size.
  m.duplex_efficiency =
      bi_hi.gbps > 0 ? std::clamp(bi_hi.gbps / (h2d_hi.gbps + d2h_hi.gbps), 0.05, 1.0) : 1.0;
  auto [pg_lo, pg_hi] = extremes(rows, "h2d", "pageable");
  m.pageable_factor = pg_hi.gbps > 0 ? std::clamp(pg_hi.gbps / h2d_hi.gbps, 0.01, 1.0) : 0.5;
  return m;
}

}  // namespace spill

// Link reports (`spill bench link --json`, read by `spill plan --link FILE`) from elsewhere: both
// readers take every field with its range and name file, path and rule; the fitted model is
// always finite and positive; `bench link` refuses sizes it cannot run before it starts
// (issue 11). The fuzz test feeds mutated reports to both readers and the fitted model to the
// copy-time formula.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "core/json_read.hpp"
#include "core/link_model.hpp"
#include "core/units.hpp"
#include "device/sim_device.hpp"
#include "graph/device_model.hpp"
#include "profiling/link_bench.hpp"
#include "tests/hostile_helpers.hpp"

namespace spill::profiling {
namespace {

using spill::test::error_of;
using spill::test::expect_mentions;

const char* kReport = R"({"format": "spill-link-bench", "version": 1, "device": "sim",
  "simulated": true, "link": "pcie4", "date": "2026-01-01T00:00:00Z", "results": [
  {"direction": "h2d", "host_memory": "pinned", "bytes": 4096, "copies": 1000, "gbps": 0.4096,
   "min_gbps": 0.4, "max_gbps": 0.41, "verified": true},
  {"direction": "h2d", "host_memory": "pinned", "bytes": 1073741824, "copies": 2, "gbps": 20.0,
   "min_gbps": 19.9, "max_gbps": 20.1, "verified": true},
  {"direction": "d2h", "host_memory": "pinned", "bytes": 4096, "copies": 1000, "gbps": 0.4096,
   "verified": true},
  {"direction": "d2h", "host_memory": "pinned", "bytes": 1073741824, "copies": 2, "gbps": 22.0,
   "verified": true},
  {"direction": "bidir", "host_memory": "pinned", "bytes": 1073741824, "copies": 2,
   "gbps": 33.6, "verified": true},
  {"direction": "h2d", "host_memory": "pageable", "bytes": 1073741824, "copies": 2,
   "gbps": 10.0, "verified": true}]})";

TEST(HostileLink, FieldsOutOfRangeNameFilePathAndRule) {
  struct Case {
    const char* from;
    const char* to;
    const char* expect;
  };
  const Case cases[] = {
      {"\"bytes\": 4096", "\"bytes\": -4096", "results[0].bytes: must be an integer in [1, "},
      {"\"bytes\": 4096", "\"bytes\": 0", "results[0].bytes"},
      {"\"gbps\": 20.0", "\"gbps\": 1e300", "results[1].gbps: must be a number in [1e-06, 1e+06]"},
      {"\"gbps\": 20.0", "\"gbps\": 0", "results[1].gbps"},
      {"\"gbps\": 20.0", "\"gbps\": 1e400", "out of range"},
      {"\"direction\": \"h2d\"", "\"direction\": 7", "results[0].direction: must be a string"},
      {"\"host_memory\": \"pinned\"", "\"host_memory\": []", "results[0].host_memory"},
      {"\"device\": \"sim\"", "\"device\": {}", "device: must be a string"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.to);
    const std::string text = spill::test::replaced(kReport, c.from, c.to);
    std::string msg = error_of([&] { graph::link_from_bench_json(text, "link.json"); });
    EXPECT_NE(msg.find("link file 'link.json'"), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.expect), std::string::npos) << msg;
    // The report reader takes a measured 0 GB/s (a sample too short to time); the model's does
    // not. A syntax-level error has no JSON path to check twice.
    if (std::string(c.to) == "\"gbps\": 0" || msg.find("out of range") != std::string::npos)
      continue;
    msg = error_of([&] { LinkReport::from_json(parse_json(text, "l"), "report 'l'"); });
    EXPECT_NE(msg.find("report 'l'"), std::string::npos) << msg;
  }
  // Nesting past the limit is refused while parsing.
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  std::string msg = error_of([&] {
    graph::link_from_bench_json(spill::test::replaced(kReport, "\"sim\"", deep), "l.json");
  });
  EXPECT_NE(msg.find("nested deeper than 64"), std::string::npos) << msg;
}

TEST(HostileLink, ANonPhysicalFitFallsBackToTheMeasuredRate) {
  // Two sizes whose times barely differ would fit an absurd bandwidth: the model keeps the
  // largest copy's rate and no latency instead.
  // 4 KiB in 10 us and 1 GiB in a hair over 10 us: 6e11 GB/s by the fit.
  std::string text = spill::test::replaced(kReport, "\"gbps\": 20.0", "\"gbps\": 107374");
  LinkModel m = graph::link_from_bench_json(text, "l.json");
  EXPECT_DOUBLE_EQ(m.h2d_gbps, 107374);
  EXPECT_TRUE(std::isfinite(m.latency_us) && m.latency_us >= 0);
  EXPECT_TRUE(std::isfinite(graph::copy_time_s(m, 1 << 30, true, true)));
}

TEST(HostileLink, BenchRefusesSizesTheDeviceCannotHoldBeforeCopying) {
  SimDevice dev(SimOptions{.capacity = 64 * MiB});
  LinkBenchOptions o;
  o.sizes = {1 * MiB, 40 * MiB};  // 40 MiB fits once, not twice (d2d, bidir)
  std::string msg = error_of([&] { run_link_bench(dev, o); });
  EXPECT_NE(msg.find("a copy of 40.00 MiB needs 80.00 MiB of device memory"), std::string::npos)
      << msg;
  o.directions = {"h2d", "d2h"};
  o.pageable = false;
  o.samples = 1;
  o.bytes_per_sample = 1 * MiB;
  EXPECT_EQ(run_link_bench(dev, o).results.size(), 4u) << "one buffer each: it fits";
  // The default sweep stops below any maximum, however large, and never wraps.
  EXPECT_EQ(default_link_sizes(kMaxBytes).back(), 1ull << 62);
  EXPECT_EQ(default_link_sizes(~0ull).back(), 1ull << 62);
  EXPECT_TRUE(default_link_sizes(4095).empty());
  EXPECT_EQ(default_link_sizes(1ull << 30).back(), 1ull << 30);
}

TEST(HostileLink, FuzzedReportsReadCleanlyIntoFiniteModels) {
  test::FuzzCounts n = test::fuzz_reader({kReport}, 99, 4000, 3.0, [](const std::string& text) {
    nlohmann::json j = parse_json(text, "fuzz.json");
    LinkModel m = link_model_from_bench_json(j, "fuzz.json");
    EXPECT_TRUE(std::isfinite(m.h2d_gbps) && m.h2d_gbps > 0);
    EXPECT_TRUE(std::isfinite(m.d2h_gbps) && m.d2h_gbps > 0);
    EXPECT_TRUE(std::isfinite(m.latency_us) && m.latency_us >= 0);
    EXPECT_TRUE(m.duplex_efficiency > 0 && m.duplex_efficiency <= 1);
    EXPECT_TRUE(std::isfinite(graph::copy_time_s(m, 1ull << 40, false, true)));
    LinkReport r = LinkReport::from_json(j, "fuzz.json");
    EXPECT_FALSE(r.results.empty());
  });
  EXPECT_GT(n.accepted, 0);
  EXPECT_GT(n.rejected, 0);
}

}  // namespace
}  // namespace spill::profiling

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <string_view>

#include "core/config.hpp"
#include "core/checked.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"
#include "tests/hostile_helpers.hpp"

namespace spill {
namespace {

TEST(Config, DefaultsFromAnEmptyString) {
  Config c = Config::parse("");
  EXPECT_EQ(c, Config{});
  EXPECT_EQ(c.device, DeviceChoice::Auto);
  EXPECT_FALSE(c.budget.has_value());
  EXPECT_EQ(c.swap_threshold, 1u << 20);
  EXPECT_EQ(c.policy, SwapPolicy::Plan);
  EXPECT_EQ(c.peak_guard, PeakGuard::Wait);
  EXPECT_TRUE(c.cache_takeover);
}

TEST(Config, ParsesEveryKey) {
  Config c = Config::parse(
      "device:sim, gpu:1, budget:8GiB, host_cap:64GiB, swap_threshold:2MiB, policy:lru,"
      "peak_guard:idle, cache_takeover:off, sim_capacity:16GiB, sim_granularity:64KiB,"
      "link:nvlink2-p9, link_gbps:2.5,"
      "time_scale:0.01, sim_queries:simulated,"
      "chaos:42, trace:off,"
      "oom_dump:/tmp/dumps");
  EXPECT_EQ(c.device, DeviceChoice::Sim);
  EXPECT_EQ(c.gpu, 1);
  EXPECT_EQ(c.budget, 8ull << 30);
  EXPECT_EQ(c.host_cap, 64ull << 30);
  EXPECT_EQ(c.swap_threshold, 2u << 20);
  EXPECT_EQ(c.policy, SwapPolicy::Lru);
  EXPECT_EQ(c.peak_guard, PeakGuard::Idle);
  EXPECT_FALSE(c.cache_takeover);
  EXPECT_EQ(c.sim_capacity, 16ull << 30);
  EXPECT_EQ(c.sim_granularity, 64u << 10);
  EXPECT_EQ(c.link, "nvlink2-p9");
  EXPECT_EQ(c.link_gbps, 2.5);
  EXPECT_DOUBLE_EQ(c.time_scale, 0.01);
  EXPECT_EQ(c.sim_queries, SimQueries::Simulated);
  EXPECT_EQ(c.chaos_seed, 42u);
  EXPECT_FALSE(c.trace);
  EXPECT_EQ(c.oom_dump, "/tmp/dumps");
}

// The yes/no keys take the same spellings: cache_takeover took only on and off while trace
// also took true, false, 1 and 0 (audit 40b #8).
TEST(Config, EveryOnOffKeyTakesTheSameSpellings) {
  for (const char* key : {"cache_takeover", "trace"}) {
    for (const char* on : {"on", "true", "1", "ON", "True"}) {
      SCOPED_TRACE(std::string(key) + ":" + on);
      const Config c = Config::parse(std::string(key) + ":" + on);
      EXPECT_TRUE(std::string_view(key) == "trace" ? c.trace : c.cache_takeover);
    }
    for (const char* off : {"off", "false", "0", "OFF", "FALSE"}) {
      SCOPED_TRACE(std::string(key) + ":" + off);
      const Config c = Config::parse(std::string(key) + ":" + off);
      EXPECT_FALSE(std::string_view(key) == "trace" ? c.trace : c.cache_takeover);
    }
    // Any case, and the message names every spelling (audit 41a #7: FALSE was refused, and
    // the message said only "on or off").
    try {
      (void)Config::parse(std::string(key) + ":yes");
      ADD_FAILURE() << key << ":yes was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("(expected on or off; also true or false, 1 or 0)"),
                std::string::npos)
          << e.what();
    }
  }
}

TEST(Config, RoundTripsThroughItsStringForm) {
  Config c = Config::parse("device:cuda,budget:3GB,chaos:on,time_scale:0.125,policy:none,"
                            "peak_guard:off,cache_takeover:off,link_gbps:0.75,sim_queries:wall");
  EXPECT_EQ(Config::parse(c.to_string()), c);
  Config d;
  EXPECT_EQ(Config::parse(d.to_string()), d);
}

TEST(Config, MergeLetsLaterSourcesWin) {
  Config c = Config::parse("budget:1GiB,device:sim");
  c.merge("budget:2GiB", "--conf");
  EXPECT_EQ(c.budget, 2ull << 30);
  EXPECT_EQ(c.device, DeviceChoice::Sim);
}

struct BadCase {
  const char* text;
  const char* must_mention;
};

TEST(Config, RejectsBadInputNamingTheKeyOrItem) {
  const BadCase cases[] = {
      {"bugdet:8GiB", "bugdet"},         {"budget", "budget"},
      {"budget:8XiB", "budget"},         {"budget:-1GiB", "budget"},
      {"budget:0", "budget"},            {"device:tpu", "device"},
      {"policy:random", "policy"},       {"link:pcie9", "pcie9"},
      {"time_scale:fast", "time_scale"}, {"chaos:maybe", "(expected off, on or a seed"},
      {"sim_queries:sometimes", "sim_queries"},
      {"trace:yes", "trace"},            {"budget:1GiB,budget:2GiB", "more than once"},
      {"sim_capacity:1KiB", "sim_capacity"}, {"gpu:-1", "gpu"},
      {"peak_guard:always", "peak_guard"}, {":5", "unknown key"},
      {"cache_takeover:maybe", "cache_takeover"},
      {"gpu:1024", "below 1024"},        {"gpu:4294967297", "gpu"},
      {"budget:9000000.5TiB", "budget"}, {"host_cap:18446744073709551615", "host_cap"},
      {"sim_capacity:8388608TiB", "sim_capacity"}, {"time_scale:1e400", "time_scale"},
      {"link_gbps:0", "link_gbps"},      {"link_gbps:fast", "link_gbps"},
      {"sim_granularity:3KiB", "sim_granularity"}, {"sim_granularity:96KiB", "power of two"},
  };
  for (const BadCase& bc : cases) {
    SCOPED_TRACE(bc.text);
    try {
      Config::parse(bc.text, "SPILL_CONF");
      FAIL() << "accepted '" << bc.text << "'";
    } catch (const InvalidArgument& e) {
      std::string msg = e.what();
      EXPECT_NE(msg.find(bc.must_mention), std::string::npos) << msg;
      EXPECT_NE(msg.find("SPILL_CONF"), std::string::npos) << msg;
    }
  }
}

TEST(Config, TheLargestValuesInRangeAreAccepted) {
  Config c = Config::parse("gpu:1023,budget:9223372036854775807B,host_cap:8388607TiB");
  EXPECT_EQ(c.gpu, 1023);
  EXPECT_EQ(*c.budget, kMaxBytes);
  EXPECT_EQ(Config::parse(c.to_string()), c);
}

TEST(Config, FuzzedStringsParseOrFailCleanly) {
  const std::vector<std::string> seeds{
      "device:sim, gpu:1, budget:8GiB, host_cap:64GiB, swap_threshold:2MiB, policy:lru, "
      "peak_guard:idle, cache_takeover:off, sim_capacity:16GiB, link:nvlink2-p9, "
      "time_scale:0.01, chaos:42, "
      "trace:off, oom_dump:/tmp/x",
      "budget:1.5GiB,sim_capacity:4096MiB,chaos:on", "gpu:7,time_scale:1000,link:pcie3"};
  test::FuzzCounts n = test::fuzz_reader(seeds, 11, 20000, 3.0, [](const std::string& text) {
    Config c = Config::parse(text, "SPILL_CONF");
    // A configuration that parses round-trips through its canonical form.
    EXPECT_EQ(Config::parse(c.to_string()), c) << text;
    EXPECT_LT(c.gpu, 1024);
    if (c.budget) {
      EXPECT_LE(*c.budget, kMaxBytes);
    }
  });
  EXPECT_GT(n.accepted, 0);
  EXPECT_GT(n.rejected, 0);
}

TEST(ParseSize, FuzzedSizesParseOrFailCleanly) {
  const std::vector<std::string> seeds{"8GiB", "1.5 MB", "4096", "9223372036854775807B",
                                       "8388607.99TiB", "0.5KiB", "12TB"};
  test::FuzzCounts n = test::fuzz_reader(seeds, 12, 20000, 2.0, [](const std::string& text) {
    EXPECT_LE(parse_size(text, "size"), kMaxBytes) << text;
  });
  EXPECT_GT(n.accepted, 0);
  EXPECT_GT(n.rejected, 0);
}

TEST(Config, ReadsTheEnvironment) {
  ::setenv("SPILL_CONF", "device:sim,budget:1GiB", 1);
  Config c = Config::from_env();
  EXPECT_EQ(c.device, DeviceChoice::Sim);
  EXPECT_EQ(c.budget, 1ull << 30);
  ::setenv("SPILL_CONF", "nonsense", 1);
  EXPECT_THROW(Config::from_env(), InvalidArgument);
  ::unsetenv("SPILL_CONF");
  EXPECT_EQ(Config::from_env(), Config{});
}

}  // namespace
}  // namespace spill

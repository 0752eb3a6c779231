// The host memory a simulated device may promise: RAM and swap, bounded by the process's cgroup
// limit (v2 and v1, along the cgroup's path), read from a made-up tree here so that no real
// cgroup is needed; and the simulated devices open in the process counted together.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "device/host_memory.hpp"
#include "device/sim_device.hpp"

namespace spill::test {
namespace {

namespace fs = std::filesystem;

// A made-up /proc and /sys/fs/cgroup: a 16 GiB host without swap, 12 GiB available.
class FakeHost : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("spill_host_memory_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "cgroup");
    write("meminfo", "MemTotal:       16777216 kB\nSwapTotal:             0 kB\n"
                     "MemAvailable:   12582912 kB\n");
    src_.meminfo = (dir_ / "meminfo").string();
    src_.self_cgroup = (dir_ / "self_cgroup").string();
    src_.cgroup_root = (dir_ / "cgroup").string();
  }
  void TearDown() override { fs::remove_all(dir_); }
  void write(const std::string& path, const std::string& text) {
    fs::create_directories((dir_ / path).parent_path());
    std::ofstream(dir_ / path) << text;
  }
  fs::path dir_;
  HostMemorySources src_;
};

TEST_F(FakeHost, NoCgroupFileMeansRamAndSwap) {
  HostMemoryInfo m = read_host_memory(src_);  // no self_cgroup file at all
  EXPECT_EQ(m.total, 16 * GiB);
  EXPECT_EQ(m.available, 12 * GiB);
  EXPECT_EQ(m.cgroup_limit, 0u);
  EXPECT_EQ(m.describe(), "16.00 GiB of RAM and swap");
  write("self_cgroup", "0::/a/b\n");  // a cgroup whose files are missing
  m = read_host_memory(src_);
  EXPECT_EQ(m.total, 16 * GiB);
}

TEST_F(FakeHost, TheLowestV2LimitAlongThePathBounds) {
  write("self_cgroup", "0::/a/b\n");
  write("cgroup/a/b/memory.max", "max\n");
  write("cgroup/a/memory.max", "4294967296\n");
  write("cgroup/a/memory.current", "1073741824\n");
  write("cgroup/memory.max", "8589934592\n");
  HostMemoryInfo m = read_host_memory(src_);
  EXPECT_EQ(m.total, 4 * GiB);
  EXPECT_EQ(m.cgroup_limit, 4 * GiB);
  EXPECT_EQ(m.available, 3 * GiB);  // the room under the limit, less than MemAvailable
  EXPECT_NE(m.describe().find("the cgroup memory limit of 4.00 GiB (" + src_.cgroup_root +
                              "/a/memory.max)"),
            std::string::npos)
      << m.describe();
  write("cgroup/a/memory.max", "max\n");  // "max" everywhere but the root's 8 GiB
  EXPECT_EQ(read_host_memory(src_).total, 8 * GiB);
  write("cgroup/memory.max", "junk\n");  // unreadable: no limit from it
  EXPECT_EQ(read_host_memory(src_).total, 16 * GiB);
}

TEST_F(FakeHost, AV1LimitBoundsAndItsNoLimitValueDoesNot) {
  write("self_cgroup", "5:cpu,cpuacct:/x\n4:memory:/x\n0::/\n");
  write("cgroup/memory/x/memory.limit_in_bytes", "2147483648\n");
  write("cgroup/memory/x/memory.usage_in_bytes", "0\n");
  HostMemoryInfo m = read_host_memory(src_);
  EXPECT_EQ(m.total, 2 * GiB);
  EXPECT_EQ(m.available, 2 * GiB);
  write("cgroup/memory/x/memory.limit_in_bytes", "9223372036854771712\n");  // v1's "none"
  m = read_host_memory(src_);
  EXPECT_EQ(m.total, 16 * GiB);
  EXPECT_EQ(m.cgroup_limit, 0u);
}

// In a container limited to 4 GiB, an 8 GiB simulated device is refused naming the limit (it
// was checked against the host's RAM alone).
TEST_F(FakeHost, ASimulatedDevicePastTheCgroupLimitIsRefused) {
  write("self_cgroup", "0::/\n");
  write("cgroup/memory.max", "4294967296\n");
  try {
    SimDevice dev(SimOptions{.capacity = 8 * GiB, .host_memory = src_});
    FAIL() << "an 8 GiB simulated device in a 4 GiB cgroup";
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("8.00 GiB (sim_capacity) is more than this host's memory (the cgroup "
                     "memory limit of 4.00 GiB"),
              std::string::npos)
        << m;
  }
  SimDevice fits(SimOptions{.capacity = 4 * GiB, .host_memory = src_});
}

// The simulated devices open in the process share the host's memory: a second one gets what
// the first left (each was checked alone, so several promised more than existed).
TEST_F(FakeHost, SimulatedDevicesShareTheCgroupLimit) {
  write("self_cgroup", "0::/\n");
  write("cgroup/memory.max", "4294967296\n");
  std::optional<SimDevice> first(SimOptions{.capacity = 3 * GiB, .host_memory = src_});
  try {
    SimDevice second(SimOptions{.capacity = 3 * GiB, .ordinal = 1, .host_memory = src_});
    FAIL() << "two 3 GiB simulated devices in a 4 GiB cgroup";
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("SimDevice 1: capacity 3.00 GiB (sim_capacity) is more than this host's "
                     "memory left for it"),
              std::string::npos)
        << m;
    EXPECT_NE(m.find("the 1 simulated device already open in this process may use 3.00 GiB"),
              std::string::npos)
        << m;
    EXPECT_NE(m.find("choose a sim_capacity of at most 1.00 GiB"), std::string::npos) << m;
  }
  SimDevice fits(SimOptions{.capacity = 1 * GiB, .ordinal = 1, .host_memory = src_});
  first.reset();  // its capacity is free again
  SimDevice again(SimOptions{.capacity = 3 * GiB, .ordinal = 2, .host_memory = src_});
}

}  // namespace
}  // namespace spill::test

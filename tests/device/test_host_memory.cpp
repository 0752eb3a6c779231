// The host memory a simulated device may promise: RAM and swap, bounded by the process's cgroup
// limit (v2 and v1, along the cgroup's path), read from a made-up tree here so that no real
// cgroup is needed; and the simulated devices open in the process counted together.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

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

// Pinned host memory must stay resident: the simulated device refuses to pin more than the host
// has available less its reserve (here 12 GiB available, 1 GiB kept: 11 GiB), as CUDA's
// cudaHostAlloc and cudaHostRegister refuse what cannot be page-locked; it granted anything
// (overcommitted memory, ending in the kernel's OOM killer once the swapped bytes filled it).
TEST_F(FakeHost, PinningMoreThanTheHostHasIsRefusedWithTheHostMemoryError) {
  SimDevice dev(SimOptions{.capacity = 1 * GiB, .host_memory = src_});
  std::vector<char> buffer(1 << 20);
  auto expect_refused = [&](auto&& call, const std::string& what) {
    try {
      call();
      FAIL() << what << " was granted";
    } catch (const HostCapExceeded& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("SimDevice: " + what + " of pinned host memory refused: the host has "
                       "12.00 GiB available now (16.00 GiB of RAM and swap)"),
                std::string::npos)
          << m;
      EXPECT_NE(m.find("a reserve of 1.00 GiB"), std::string::npos) << m;
    }
  };
  expect_refused([&] { dev.register_host(buffer.data(), 12 * GiB); },
                 "register_host of 12.00 GiB");
  expect_refused([&] { (void)dev.allocate_host(11 * GiB + 4096); },
                 "allocate_host of 11.00 GiB");  // (11 GiB and a page, shown rounded)
  // Nothing was registered: the same buffer registers at a size that fits, and unregisters.
  dev.register_host(buffer.data(), buffer.size());
  dev.unregister_host(buffer.data());
  void* p = dev.allocate_host(1 << 20);
  dev.free_host(p);
  // A cgroup limit bounds it too: 2 GiB with 1.5 GiB used leaves 512 MiB, less 128 MiB kept.
  write("self_cgroup", "0::/\n");
  write("cgroup/memory.max", "2147483648\n");
  write("cgroup/memory.current", "1610612736\n");
  EXPECT_THROW(dev.register_host(buffer.data(), 400 * MiB), HostCapExceeded);
  dev.register_host(buffer.data(), buffer.size());
  dev.unregister_host(buffer.data());
}

}  // namespace
}  // namespace spill::test

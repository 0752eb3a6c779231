// The memory this process may use on the host, for the simulated device (whose memory lives in
// host RAM): RAM and swap from /proc/meminfo, bounded by the memory limit of the process's
// cgroup where one is set (v2 memory.max, v1 memory.limit_in_bytes; the lowest along the
// cgroup's path, as each level limits those below it). Missing or unreadable files mean no
// limit from them. The paths are parameters so that tests can point them at a made-up tree.
#pragma once

#include <cstdint>
#include <string>

namespace spill {

struct HostMemorySources {
  std::string meminfo = "/proc/meminfo";
  std::string self_cgroup = "/proc/self/cgroup";  // which cgroup the process is in
  std::string cgroup_root = "/sys/fs/cgroup";     // v2 files here, v1's under memory/
};

struct HostMemoryInfo {
  std::uint64_t total = 0;      // RAM and swap, or the cgroup's limit (and swap) when lower
  std::uint64_t available = 0;  // available now (MemAvailable, or the room under the limit)
  std::uint64_t ram_and_swap = 0;
  std::uint64_t cgroup_limit = 0;  // the lowest cgroup memory limit below RAM; 0: none
  std::string cgroup_file;         // the file it was read from
  // "23.54 GiB of RAM and swap", or "the cgroup memory limit of 4.00 GiB (<file>)".
  std::string describe() const;
};

HostMemoryInfo read_host_memory(const HostMemorySources& sources = {});

// Pinned memory must stay resident beside everything else the host runs: what may be pinned
// now is what is available less a reserve of 1/16 of the total, at most 1 GiB.
std::uint64_t pinning_reserve(const HostMemoryInfo& host);
std::uint64_t pinnable_room(const HostMemoryInfo& host);

}  // namespace spill

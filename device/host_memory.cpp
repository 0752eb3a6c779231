#include "device/host_memory.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>

#include "core/units.hpp"

namespace spill {
namespace {

// The first line of a cgroup file as a byte count; nullopt for "max", a missing file or junk.
std::optional<std::uint64_t> read_bytes(const std::string& file) {
  std::ifstream in(file);
  std::string text;
  if (!in || !std::getline(in, text) || text.empty() || text == "max") return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  if (errno != 0 || end == text.c_str() || (*end != '\0' && *end != '\n')) return std::nullopt;
  return static_cast<std::uint64_t>(v);
}

struct Limit {
  std::uint64_t bytes = 0;
  std::string dir, file;
};

// The lowest limit in `name` along `path` below `base`: the cgroup's own directory, then each
// parent up to `base` itself (a namespaced container sees its own cgroup there).
void lowest_along(const std::string& base, std::string path, const char* name,
                  std::optional<Limit>& best) {
  while (!path.empty() && path.back() == '/') path.pop_back();
  for (;;) {
    const std::string dir = base + path;
    const std::string file = dir + "/" + name;
    if (std::optional<std::uint64_t> v = read_bytes(file); v && (!best || *v < best->bytes))
      best = Limit{*v, dir, file};
    if (path.empty()) return;
    const std::size_t slash = path.rfind('/');
    path.erase(slash == std::string::npos ? 0 : slash);
  }
}

}  // namespace

std::uint64_t pinning_reserve(const HostMemoryInfo& host) {
  return std::min<std::uint64_t>(std::uint64_t{1} << 30, host.total / 16);
}

std::uint64_t pinnable_room(const HostMemoryInfo& host) {
  return host.available - std::min(host.available, pinning_reserve(host));
}

std::string HostMemoryInfo::describe() const {
  if (cgroup_limit != 0 && total < ram_and_swap) {
    return "the cgroup memory limit of " + format_bytes(cgroup_limit) + " (" + cgroup_file +
           ")" + (total > cgroup_limit ? " and " + format_bytes(total - cgroup_limit) + " of swap"
                                       : "");
  }
  return format_bytes(total) + " of RAM and swap";
}

HostMemoryInfo read_host_memory(const HostMemorySources& sources) {
  HostMemoryInfo m;
  std::uint64_t ram = 0, swap = 0, avail = 0;
  if (std::FILE* f = std::fopen(sources.meminfo.c_str(), "r")) {
    char key[64];
    unsigned long long kib = 0;
    while (std::fscanf(f, "%63s %llu kB\n", key, &kib) == 2) {
      if (std::strcmp(key, "MemTotal:") == 0) ram = kib * 1024;
      if (std::strcmp(key, "SwapTotal:") == 0) swap = kib * 1024;
      if (std::strcmp(key, "MemAvailable:") == 0) avail = kib * 1024;
    }
    std::fclose(f);
  }
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  if (ram == 0) ram = static_cast<std::uint64_t>(::sysconf(_SC_PHYS_PAGES)) * page;
  if (avail == 0) avail = static_cast<std::uint64_t>(::sysconf(_SC_AVPHYS_PAGES)) * page;
  m.ram_and_swap = m.total = ram + swap;
  m.available = avail;

  // Lines "id:controllers:path": "0::path" is the v2 cgroup, one naming memory the v1 one.
  std::optional<Limit> best;
  std::ifstream self(sources.self_cgroup);
  for (std::string line; std::getline(self, line);) {
    const std::size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (controllers.empty()) {
      lowest_along(sources.cgroup_root, path, "memory.max", best);
    } else if (("," + controllers + ",").find(",memory,") != std::string::npos) {
      lowest_along(sources.cgroup_root + "/memory", path, "memory.limit_in_bytes", best);
    }
  }
  if (best && best->bytes < ram) {  // (v1 says "no limit" with a huge number)
    m.cgroup_limit = best->bytes;
    m.cgroup_file = best->file;
    m.total = best->bytes + swap;
    std::optional<std::uint64_t> used = read_bytes(best->dir + "/memory.current");
    if (!used) used = read_bytes(best->dir + "/memory.usage_in_bytes");
    const std::uint64_t room = best->bytes - std::min(best->bytes, used.value_or(0));
    m.available = std::min(m.available, room);
  }
  return m;
}

}  // namespace spill

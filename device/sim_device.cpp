// SimDevice: address space, physical chunks and plain/host memory. Stream work is in
// sim_stream.cpp.
#include "device/sim_device.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "core/config.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"
#include "device/host_memory.hpp"
#include "device/sim_fault_note.hpp"
#include "device/sim_state.hpp"

namespace spill {
namespace {

std::uintptr_t u(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// The entry of `m` whose range [key, key + size) contains `p`, or m.end().
template <class Map>
auto containing(const Map& m, std::uintptr_t p) {
  auto it = m.upper_bound(p);
  if (it == m.begin()) return m.end();
  --it;
  std::size_t size;
  if constexpr (std::is_same_v<typename Map::mapped_type, std::size_t>) size = it->second;
  else size = it->second.bytes;
  return p < it->first + size ? it : m.end();
}

void* map_anonymous(std::size_t bytes, int prot) {
  void* p = ::mmap(nullptr, bytes, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

// Fills the page tables for the pages the chunk's file already holds (a chunk mapped again, or
// a released one reused), as cuMemMap leaves memory ready to use: otherwise each 4 KiB page of
// a remapped chunk faulted on its next touch, by a copy or by host code (the CPU bridge's CNN:
// about 3900 faults a step; swapping steps: about one per page moved), a host cost a GPU does
// not have. Pages never touched stay holes, allocated on first touch, so that a simulated
// device larger than the host costs only the memory that is used (MAP_POPULATE would fill the
// whole chunk). MADV_POPULATE_READ maps them writable (a shared memfd mapping needs no write
// fault) in batches. Best effort: a kernel without it (before 5.14) faults as before.
void populate_present(int fd, void* addr, std::size_t bytes) {
  const auto page = static_cast<off_t>(::sysconf(_SC_PAGESIZE));
  const auto end = static_cast<off_t>(bytes);
  off_t at = 0;
  while (at < end) {
    off_t data = ::lseek(fd, at, SEEK_DATA);
    if (data < 0 || data >= end) return;  // ENXIO: no data after `at`
    data = data / page * page;
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0 || hole > end) hole = end;
    if (hole <= data) return;
    if (::madvise(static_cast<char*>(addr) + data, static_cast<std::size_t>(hole - data),
                  MADV_POPULATE_READ) != 0 && errno == EINVAL) {
      return;
    }
    at = hole;
  }
}

// Linux's huge page size on x86-64 and arm64 (4 KiB base pages). MADV_COLLAPSE (Linux 6.1) is
// missing from glibc 2.36's headers.
constexpr std::size_t kHugePage = 2ull << 20;
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
// A chunk larger than this keeps the host's 4 KiB pages, allocated as they are touched.
constexpr std::size_t kBackLimit = 256ull << 20;

// Allocates the first `huge` bytes (a multiple of kHugePage) of memfd `fd` and collapses them
// into 2 MiB pages; whether the kernel collapsed them. MADV_COLLAPSE works on a mapping: a
// scratch one, 2 MiB-aligned, unmapped again at once.
bool allocate_collapsed(int fd, std::size_t huge) {
  if (::fallocate(fd, 0, 0, static_cast<off_t>(huge)) != 0) return false;
  void* raw = map_anonymous(huge + kHugePage, PROT_NONE);
  if (raw == nullptr) return false;
  const std::uintptr_t at = (u(raw) + kHugePage - 1) / kHugePage * kHugePage;
  void* p = ::mmap(reinterpret_cast<void*>(at), huge, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_FIXED, fd, 0);
  const bool collapsed = p != MAP_FAILED && ::madvise(p, huge, MADV_COLLAPSE) == 0;
  ::munmap(raw, huge + kHugePage);
  return collapsed;
}

// Whether this kernel collapses a memfd's pages into 2 MiB pages (MADV_COLLAPSE: Linux 6.1+,
// shmem huge pages not "deny"), asked once with a scratch file.
bool collapses_shmem() {
  static const bool yes = [] {
    const int fd = ::memfd_create("spill-sim-probe", MFD_CLOEXEC);
    if (fd < 0) return false;
    const bool ok = ::ftruncate(fd, kHugePage) == 0 && allocate_collapsed(fd, kHugePage);
    ::close(fd);
    return ok;
  }();
  return yes;
}

// Allocates a chunk's memory now, in 2 MiB pages where the kernel can. Mapped at a 2 MiB-aligned
// address (do_reserve aligns large reservations so), such a chunk is one page-table entry per
// 2 MiB, wherever and however often it is mapped again: with 4 KiB pages, the first touch of
// each page after every remap cost the host a fault (several microseconds each under a
// hypervisor, even with the page tables filled ahead by populate_present), so a swap-in's copy
// into a remapped chunk ran at under 1 GB/s and dominated the CPU bridge's steps. The chunk's
// bytes are unchanged. Best effort: where the kernel does not collapse (collapses_shmem), the
// chunk is left as it was (allocating it ahead would cost memory and gain nothing), as it is
// when fallocate is refused; a collapse refused (no free 2 MiB page) leaves it allocated, in
// 4 KiB pages.
void back_now(int fd, std::size_t bytes) {
  const std::size_t huge = bytes / kHugePage * kHugePage;
  if (huge == 0 || bytes > kBackLimit || !collapses_shmem()) return;
  allocate_collapsed(fd, huge);
}

// Pinned host memory in 2 MiB pages where the kernel can (anonymous mappings of 2 MiB or more:
// the host pool's chunks, which swap-outs write), for the same first-touch cost as back_now's.
void prefer_huge_pages(void* p, std::size_t bytes) {
  if (bytes >= kHugePage) ::madvise(p, bytes, MADV_HUGEPAGE);
}

// Pinned host memory is page-locked: on a GPU, cudaHostAlloc and cudaHostRegister refuse what
// the host cannot keep resident. The simulated device's pinned buffers are ordinary memory that
// the kernel would grant (overcommit) and later answer with its OOM killer, so pinning more than
// the host has available now, less a reserve for everything else (1/16 of its memory, at most
// 1 GiB), is refused here as the driver would refuse it, with spill's host-memory error.
void check_pinnable(const HostMemorySources& sources, std::size_t bytes, const char* call) {
  const HostMemoryInfo host = read_host_memory(sources);
  const std::uint64_t reserve = pinning_reserve(host);
  if (bytes <= pinnable_room(host)) return;
  SPILL_FAIL_HOST_CAP(std::string("SimDevice: ") + call + " of " + format_bytes(bytes) +
                      " of pinned host memory refused: the host has " +
                      format_bytes(host.available) + " available now (" + host.describe() +
                      "), and pinned memory must stay resident beside a reserve of " +
                      format_bytes(reserve) + " for everything else. Lower the budget's "
                      "pressure (a larger budget or a smaller model keeps less on the host) or "
                      "set a host_cap");
}

std::size_t page_round(std::size_t bytes) {
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  return (bytes + page - 1) / page * page;
}

// The capacity of the simulated devices open in this process: their memory is all the host's,
// so each new one is checked with the others' capacity counted.
struct OpenDevices {
  std::mutex mu;
  std::uint64_t capacity = 0;
  int count = 0;
};
OpenDevices& open_devices() {
  static OpenDevices* d = new OpenDevices;  // never destroyed: devices may outlive statics
  return *d;
}

void raise_fd_limit() {
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &lim);
  }
}

}  // namespace

SimOptions SimOptions::from_config(const Config& config) {
  SimOptions o;
  o.capacity = config.sim_capacity;
  o.granularity = config.sim_granularity;
  o.link = link_preset(config.link);
  if (config.link_gbps) {
    o.link.h2d_gbps = o.link.d2h_gbps = *config.link_gbps;
    char gbps[32];
    std::snprintf(gbps, sizeof gbps, "%g", *config.link_gbps);
    o.link.description += std::string(" at ") + gbps + " GB/s";
  }
  o.time_scale = config.time_scale;
  o.simulated_queries = config.sim_queries == SimQueries::Simulated;
  o.chaos_seed = config.chaos_seed;
  o.ordinal = config.gpu;
  return o;
}

// ---- State helpers

bool SimDevice::State::is_device_address(const void* p) const {
  return containing(reservations, u(p)) != reservations.end() ||
         containing(allocations, u(p)) != allocations.end();
}

bool SimDevice::State::accessible(const void* p, std::size_t n) const {
  std::uintptr_t begin = u(p), end = begin + n;
  if (auto a = containing(allocations, begin); a != allocations.end())
    return end <= a->first + a->second;
  auto it = containing(mappings, begin);
  while (it != mappings.end()) {
    std::uintptr_t stop = it->first + it->second.bytes;
    if (end <= stop) return true;
    auto next = std::next(it);
    if (next == mappings.end() || next->first != stop) return false;
    it = next;
  }
  return false;
}

bool SimDevice::State::is_pinned_host(const void* p) const {
  return containing(host_pinned, u(p)) != host_pinned.end() ||
         containing(host_registered, u(p)) != host_registered.end();
}

// A chunk is backed when a copy first writes it, not at creation: a block swapped in is
// written whole by its copy and then remapped with its chunk at every swap, while memory that is
// only reserved and mapped (the allocator's own benchmarks: gigabytes) costs nothing until used.
void SimDevice::State::back_written(void* p, std::size_t n) {
  const std::uintptr_t end = u(p) + n;
  for (auto m = containing(mappings, u(p)); m != mappings.end() && m->first < end; ++m) {
    Chunk& c = chunks.at(m->second.handle);
    std::lock_guard lock(backing);
    if (c.backed) continue;
    back_now(c.fd, c.bytes);
    c.backed = true;
  }
}

void SimDevice::State::set_sticky(const std::string& message) {
  std::lock_guard lock(err_mu);
  if (sticky.empty()) sticky = message;
}

bool SimDevice::State::has_sticky() const {
  std::lock_guard lock(err_mu);
  return !sticky.empty();
}

void SimDevice::State::throw_if_sticky() const {
  std::lock_guard lock(err_mu);
  if (!sticky.empty()) throw CudaError("cudaErrorIllegalAddress (simulated): " + sticky, 700);
}

// ---- Construction

SimDevice::SimDevice(SimOptions options) : s_(std::make_unique<State>()) {
  SPILL_EXPECTS(options.granularity > 0 && options.granularity % ::sysconf(_SC_PAGESIZE) == 0,
                "SimDevice: granularity " + std::to_string(options.granularity) +
                    " must be a multiple of the host page size");
  SPILL_EXPECTS(options.capacity >= options.granularity,
                "SimDevice: capacity " + format_bytes(options.capacity) +
                    " is below one granule (" + format_bytes(options.granularity) + ")");
  SPILL_EXPECTS(options.link.h2d_gbps > 0 && options.link.d2h_gbps > 0 && options.d2d_gbps > 0,
                "SimDevice: link bandwidths must be above zero");
  SPILL_EXPECTS(options.chaos_probability >= 0 && options.chaos_probability <= 1,
                "SimDevice: chaos_probability must lie in [0, 1]");
  // The simulated device's memory is host memory (memfd chunks): a capacity the host cannot
  // hold at all, with what the simulated devices already open here may use, would end in the
  // kernel's OOM killer once used, so it is refused here. The host's memory is bounded by the
  // process's cgroup limit where one is set.
  const HostMemoryInfo host = read_host_memory(options.host_memory);
  {
    OpenDevices& open = open_devices();
    std::lock_guard lock(open.mu);
    const std::uint64_t left = host.total - std::min(host.total, open.capacity);
    if (host.total > 0 && options.capacity > left) {
      if (open.count == 0) {
        throw InvalidArgument("SimDevice: capacity " + format_bytes(options.capacity) +
                              " (sim_capacity) is more than this host's memory (" +
                              host.describe() + ", " + format_bytes(host.available) +
                              " available now): the simulated device keeps its memory in host "
                              "RAM; choose a sim_capacity of at most " +
                              format_bytes(host.available));
      }
      throw InvalidArgument(
          "SimDevice " + std::to_string(options.ordinal) + ": capacity " +
          format_bytes(options.capacity) + " (sim_capacity) is more than this host's memory " +
          "left for it: " + host.describe() + ", of which the " + std::to_string(open.count) +
          " simulated device" + (open.count == 1 ? "" : "s") + " already open in this process " +
          "may use " + format_bytes(open.capacity) + " (each ordinal is its own simulated GPU, "
          "all in host RAM); choose a sim_capacity of at most " +
          format_bytes(std::min<std::uint64_t>(left, host.available)) + ", or open fewer devices");
    }
    open.capacity += options.capacity;
    open.count++;
  }
  raise_fd_limit();
  s_->opt = std::move(options);
  const SimOptions& o = s_->opt;
  info_.backend = Backend::Sim;
  info_.name = o.name;
  info_.ordinal = o.ordinal;
  info_.total_bytes = o.capacity;
  info_.granularity = o.granularity;
  info_.link_name = o.link.name;
  info_.link_description = o.link.description + " (modelled)";
  info_.link_nominal_gbps = o.link.nominal_gbps;
  info_.h2d_gbps = o.link.h2d_gbps;
  info_.d2h_gbps = o.link.d2h_gbps;
  info_.simulated = true;
  try {
    s_->default_stream = do_create_stream();
  } catch (...) {
    forget_capacity();
    throw;
  }
}

void SimDevice::forget_capacity() {
  OpenDevices& open = open_devices();
  std::lock_guard lock(open.mu);
  open.capacity -= s_->opt.capacity;
  open.count--;
}

SimDevice::~SimDevice() {
  {
    // Let go of forgotten holds so the workers can drain.
    std::lock_guard lock(s_->hold_mu);
    for (auto& [token, gate] : s_->holds) {
      std::lock_guard g(gate->m);
      gate->open = true;
      gate->cv.notify_all();
    }
    s_->holds.clear();
  }
  std::vector<std::shared_ptr<StreamImpl>> streams;
  {
    std::lock_guard lock(s_->reg_mu);
    for (auto& [raw, sp] : s_->streams) streams.push_back(sp);
    s_->streams.clear();
  }
  for (auto& sp : streams) s_->stop_worker(*sp);
  std::unique_lock lock(s_->vm);
  for (auto& [addr, size] : s_->reservations) ::munmap(reinterpret_cast<void*>(addr), size);
  for (auto& [h, c] : s_->chunks) ::close(c.fd);
  for (auto& [bytes, spares] : s_->spare)
    for (const State::Chunk& c : spares) ::close(c.fd);
  for (auto& [addr, size] : s_->allocations) ::munmap(reinterpret_cast<void*>(addr), size);
  for (auto& [addr, size] : s_->host_pinned) ::munmap(reinterpret_cast<void*>(addr), size);
  lock.unlock();
  forget_capacity();
}

const SimOptions& SimDevice::options() const { return s_->opt; }

std::size_t SimDevice::used_bytes() const {
  std::shared_lock lock(s_->vm);
  return s_->used;
}

std::size_t SimDevice::mapped_bytes() const {
  std::shared_lock lock(s_->vm);
  return s_->mapped;
}

SimDevice::Counts SimDevice::counts() const {
  Counts c{};
  {
    std::shared_lock lock(s_->vm);
    c.chunks = s_->chunks.size();
    c.reservations = s_->reservations.size();
    c.mappings = s_->mappings.size();
    c.allocations = s_->allocations.size();
    c.host_buffers = s_->host_pinned.size() + s_->host_registered.size();
  }
  std::lock_guard lock(s_->reg_mu);
  c.streams = s_->streams.size() - 1;  // not counting the default stream
  c.events = s_->events.size();
  return c;
}

MemInfo SimDevice::do_mem_info() {
  std::shared_lock lock(s_->vm);
  return {s_->opt.capacity, s_->opt.capacity - s_->used};
}

// ---- Virtual memory

void* SimDevice::do_reserve(std::size_t bytes) {
  // Large ranges start on a huge page (granules that divide one), so that a chunk mapped at
  // their start maps in 2 MiB pages (back_now).
  const std::size_t granule = s_->opt.granularity;
  const std::size_t g = bytes >= kHugePage && kHugePage % granule == 0 ? kHugePage : granule;
  void* raw = map_anonymous(bytes + g, PROT_NONE);
  if (raw == nullptr) {
    SPILL_FAIL_OOM("SimDevice: cannot reserve " + format_bytes(bytes) +
                   " of address space: " + std::strerror(errno));
  }
  std::uintptr_t start = (u(raw) + g - 1) / g * g;
  if (start > u(raw)) ::munmap(raw, start - u(raw));
  std::uintptr_t tail = start + bytes, raw_end = u(raw) + bytes + g;
  if (raw_end > tail) ::munmap(reinterpret_cast<void*>(tail), raw_end - tail);
  std::unique_lock lock(s_->vm);
  s_->reservations[start] = bytes;
  sim::note_reservation(reinterpret_cast<void*>(start), bytes);
  return reinterpret_cast<void*>(start);
}

void SimDevice::do_unreserve(void* addr, std::size_t bytes) {
  std::unique_lock lock(s_->vm);
  auto it = s_->reservations.find(u(addr));
  SPILL_EXPECTS(it != s_->reservations.end() && it->second == bytes,
                "unreserve: " + format_address(addr) + " (" + format_bytes(bytes) +
                    ") is not a reservation of this device");
  auto m = s_->mappings.lower_bound(u(addr));
  SPILL_EXPECTS(m == s_->mappings.end() || m->first >= u(addr) + bytes,
                "unreserve: " + format_address(addr) + " still has memory mapped at " +
                    format_address(reinterpret_cast<void*>(m->first)));
  sim::forget_reservation(addr);
  ::munmap(addr, bytes);
  s_->reservations.erase(it);
}

PhysicalHandle SimDevice::do_create_physical(std::size_t bytes) {
  std::unique_lock lock(s_->vm);
  if (bytes > s_->opt.capacity - s_->used) {
    SPILL_FAIL_OOM("SimDevice: cannot create " + format_bytes(bytes) + " of physical memory: " +
                   format_bytes(s_->used) + " of " + format_bytes(s_->opt.capacity) +
                   " in use, " + format_bytes(s_->opt.capacity - s_->used) + " free");
  }
  // A spare chunk of this size first (its bytes are the old ones: like cuMemCreate's, a new
  // chunk's contents are unspecified), else a new memfd (zeros).
  if (auto spare = s_->spare.find(bytes); spare != s_->spare.end() && !spare->second.empty()) {
    State::Chunk chunk = spare->second.back();
    spare->second.pop_back();
    s_->spare_bytes -= bytes;
    --s_->spare_chunks;
    PhysicalHandle h = s_->next_handle++;
    s_->chunks[h] = chunk;
    s_->used += bytes;
    return h;
  }
  int fd = ::memfd_create("spill-sim-chunk", MFD_CLOEXEC);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    int err = errno;
    if (fd >= 0) ::close(fd);
    std::string why = std::strerror(err);
    if (err == EMFILE || err == ENFILE) {
      // Not the memory: the descriptors (one per physical chunk, spare ones included).
      rlimit lim{};
      ::getrlimit(RLIMIT_NOFILE, &lim);
      const std::size_t held = s_->chunks.size() + s_->spare_chunks;
      why += std::string(" (") + kSimOutOfDescriptors + ": this device holds " +
             std::to_string(held) + " for its physical allocations; the process may open " +
             std::to_string(lim.rlim_cur) + ")";
    }
    SPILL_FAIL_OOM("SimDevice: cannot back " + format_bytes(bytes) +
                   " of physical memory on the host: " + why);
  }
  PhysicalHandle h = s_->next_handle++;
  s_->chunks[h] = {fd, bytes, 0};
  s_->used += bytes;
  return h;
}

void SimDevice::do_release_physical(PhysicalHandle handle, std::size_t bytes) {
  std::unique_lock lock(s_->vm);
  auto it = s_->chunks.find(handle);
  SPILL_EXPECTS(it != s_->chunks.end(),
                "release_physical: handle " + std::to_string(handle) + " is not a live chunk");
  SPILL_EXPECTS(it->second.bytes == bytes,
                "release_physical: handle " + std::to_string(handle) + " has " +
                    format_bytes(it->second.bytes) + ", not " + format_bytes(bytes));
  SPILL_EXPECTS(it->second.mapped == 0, "release_physical: handle " + std::to_string(handle) +
                                            " is still mapped; unmap it first");
  if (s_->spare_bytes + bytes <= State::kSpareLimit && s_->spare_chunks < State::kSpareChunks) {
    s_->spare[bytes].push_back(it->second);
    s_->spare_bytes += bytes;
    ++s_->spare_chunks;
  } else {
    ::close(it->second.fd);
  }
  s_->used -= bytes;
  s_->chunks.erase(it);
}

void SimDevice::do_map(void* addr, std::size_t bytes, PhysicalHandle handle) {
  std::unique_lock lock(s_->vm);
  auto r = containing(s_->reservations, u(addr));
  SPILL_EXPECTS(r != s_->reservations.end() && u(addr) + bytes <= r->first + r->second,
                "map: " + format_address(addr) + " + " + format_bytes(bytes) +
                    " is not inside a reservation");
  auto c = s_->chunks.find(handle);
  SPILL_EXPECTS(c != s_->chunks.end(),
                "map: handle " + std::to_string(handle) + " is not a live chunk");
  SPILL_EXPECTS(c->second.bytes == bytes, "map: handle " + std::to_string(handle) + " has " +
                                              format_bytes(c->second.bytes) + ", not " +
                                              format_bytes(bytes));
  auto next = s_->mappings.lower_bound(u(addr));
  bool overlaps = (next != s_->mappings.end() && next->first < u(addr) + bytes) ||
                  containing(s_->mappings, u(addr)) != s_->mappings.end();
  SPILL_EXPECTS(!overlaps, "map: " + format_address(addr) + " + " + format_bytes(bytes) +
                               " overlaps memory that is already mapped");
  void* p = ::mmap(addr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, c->second.fd, 0);
  if (p == MAP_FAILED) {
    SPILL_FAIL_OOM("SimDevice: map of " + format_bytes(bytes) + " failed: " +
                   std::strerror(errno));
  }
  populate_present(c->second.fd, p, bytes);
  s_->mappings[u(addr)] = {bytes, handle};
  c->second.mapped++;
  s_->mapped += bytes;
}

void SimDevice::do_unmap(void* addr, std::size_t bytes) {
  std::unique_lock lock(s_->vm);
  // One mapping, whole, as map() made it: CUDA's cuMemUnmap takes "the entire contiguous
  // address range that was mapped" (PyTorch's expandable segments unmap one handle at a time).
  auto first = s_->mappings.find(u(addr));
  SPILL_EXPECTS(first != s_->mappings.end() && first->second.bytes == bytes,
                "unmap: " + format_address(addr) + " + " + format_bytes(bytes) +
                    " is not one mapping (unmap each mapped chunk on its own, as mapped)");
  auto it = std::next(first);
  void* p = ::mmap(addr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                   -1, 0);
  if (p == MAP_FAILED) {
    throw Error("SimDevice: unmap of " + format_bytes(bytes) + " at " + format_address(addr) +
                " failed: " + std::strerror(errno));
  }
  for (auto m = first; m != it; ++m) s_->chunks.at(m->second.handle).mapped--;
  s_->mappings.erase(first, it);
  s_->mapped -= bytes;
}

// ---- Plain device memory and host memory

void* SimDevice::do_allocate(std::size_t bytes) {
  std::size_t size = page_round(bytes);
  std::unique_lock lock(s_->vm);
  if (size > s_->opt.capacity - s_->used) {
    SPILL_FAIL_OOM("SimDevice: cannot allocate " + format_bytes(bytes) + ": " +
                   format_bytes(s_->used) + " of " + format_bytes(s_->opt.capacity) +
                   " in use, " + format_bytes(s_->opt.capacity - s_->used) + " free");
  }
  void* p = map_anonymous(size, PROT_READ | PROT_WRITE);
  if (p == nullptr) SPILL_FAIL_OOM("SimDevice: host mmap of " + format_bytes(size) + " failed");
  s_->allocations[u(p)] = size;
  s_->used += size;
  return p;
}

void SimDevice::do_deallocate(void* ptr) {
  std::unique_lock lock(s_->vm);
  auto it = s_->allocations.find(u(ptr));
  SPILL_EXPECTS(it != s_->allocations.end(),
                "deallocate: " + format_address(ptr) + " was not allocated by this device");
  ::munmap(ptr, it->second);
  s_->used -= it->second;
  s_->allocations.erase(it);
}

void* SimDevice::do_allocate_host(std::size_t bytes) {
  std::size_t size = page_round(bytes);
  check_pinnable(s_->opt.host_memory, size, "allocate_host");
  void* p = map_anonymous(size, PROT_READ | PROT_WRITE);
  if (p == nullptr) {
    SPILL_FAIL_OOM("SimDevice: cannot allocate " + format_bytes(bytes) + " of pinned host memory");
  }
  prefer_huge_pages(p, size);
  std::unique_lock lock(s_->vm);
  s_->host_pinned[u(p)] = size;
  return p;
}

void SimDevice::do_free_host(void* ptr) {
  std::unique_lock lock(s_->vm);
  auto it = s_->host_pinned.find(u(ptr));
  SPILL_EXPECTS(it != s_->host_pinned.end(),
                "free_host: " + format_address(ptr) + " was not allocated by allocate_host");
  ::munmap(ptr, it->second);
  s_->host_pinned.erase(it);
}

void SimDevice::do_register_host(void* ptr, std::size_t bytes) {
  std::unique_lock lock(s_->vm);
  SPILL_EXPECTS(!s_->is_device_address(ptr),
                "register_host: " + format_address(ptr) + " is device memory");
  auto next = s_->host_registered.lower_bound(u(ptr));
  bool overlaps = (next != s_->host_registered.end() && next->first < u(ptr) + bytes) ||
                  containing(s_->host_registered, u(ptr)) != s_->host_registered.end();
  SPILL_EXPECTS(!overlaps, "register_host: " + format_address(ptr) + " + " + format_bytes(bytes) +
                               " overlaps memory that is already registered");
  check_pinnable(s_->opt.host_memory, bytes, "register_host");
  s_->host_registered[u(ptr)] = bytes;
}

void SimDevice::do_unregister_host(void* ptr) {
  std::unique_lock lock(s_->vm);
  auto it = s_->host_registered.find(u(ptr));
  SPILL_EXPECTS(it != s_->host_registered.end(),
                "unregister_host: " + format_address(ptr) + " is not registered");
  s_->host_registered.erase(it);
}

}  // namespace spill

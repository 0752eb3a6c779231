#include "allocator/host_pool.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "profiling/events.hpp"

namespace spill {
namespace {
constexpr std::size_t kAlign = 512;
}

HostPool::HostPool(Device& device, std::optional<std::size_t> cap, std::size_t chunk_bytes)
    : dev_(device), cap_(cap), chunk_bytes_(chunk_bytes), pool_(&device, kAlign, true) {}

HostPool::~HostPool() {
  std::lock_guard lock(mu_);
  used_.clear();
  chunks_.clear_and_dispose([&](Segment* s) {
    void* p = reinterpret_cast<void*>(s->addr);
    try {
      dev_.unregister_host(p);
    } catch (...) {
      // Teardown after a device error: the pages are unmapped regardless.
    }
    ::munmap(p, s->size);
    // (a trace exported after shutdown ends with nothing pinned)
    profiling::TraceRecorder::global().record(profiling::EventKind::HostFree, s->addr, s->size, 0,
                                              dev_.info().ordinal);
    delete s;
  });
}

void* HostPool::allocate(std::size_t bytes) {
  SPILL_EXPECTS(bytes > 0, "host pool: size must be above zero");
  SPILL_EXPECTS(bytes <= (std::size_t{1} << 56),
                "host pool: " + std::to_string(bytes) + " bytes is absurd");
  if (cap_ && bytes > *cap_) {
    SPILL_FAIL_HOST_CAP("host pool: " + format_bytes(bytes) + " is more than the whole host_cap of " +
                   format_bytes(*cap_) + ". Raise host_cap or swap smaller blocks.");
  }
  const std::size_t size = (bytes + kAlign - 1) / kAlign * kAlign;
  std::lock_guard lock(mu_);
  Block* b = pool_.take(size, nullptr);
  if (b == nullptr) {
    std::size_t chunk = std::max(chunk_bytes_, (size + (2u << 20) - 1) / (2u << 20) * (2u << 20));
    if (cap_ && reserved_ + chunk > *cap_) {
      // Give back wholly free chunks first, then try a chunk of exactly what is needed.
      release_free_chunks_locked();
      chunk = std::min(chunk, (size + 4095) / 4096 * 4096);
      if (reserved_ + chunk > *cap_) {
        SPILL_FAIL_HOST_CAP("host pool: host_cap " + format_bytes(*cap_) + " reached: " +
                       format_bytes(in_use_) + " of pinned host memory in use, " +
                       format_bytes(reserved_) + " reserved, " + format_bytes(bytes) +
                       " more asked for. Raise host_cap or lower the budget's pressure.");
      }
    }
    void* p = map_chunk_locked(chunk, (size + 4095) / 4096 * 4096, bytes);
    auto* seg = new Segment{reinterpret_cast<std::uintptr_t>(p), chunk, nullptr, false};
    chunks_.push_back(*seg);
    reserved_ += chunk;
    stat_.add(chunk);
    pool_.add_segment(seg);
    profiling::TraceRecorder::global().record(profiling::EventKind::HostAlloc, seg->addr, chunk, 0,
                                              dev_.info().ordinal);
    b = pool_.take(size, nullptr);
    SPILL_ASSERT(b != nullptr, "a fresh host chunk must fit the request");
  }
  b->requested = bytes;
  used_.insert(*b);
  in_use_ += b->size;
  return reinterpret_cast<void*>(b->addr);
}

void* HostPool::map_chunk_locked(std::size_t& chunk, std::size_t least, std::size_t bytes) {
  // The host (mmap, ulimit -v, or the device refusing to pin: what the host cannot keep
  // resident) may refuse a whole chunk and still grant what is needed: halved down to the
  // request's size, then once more after giving back the free chunks (audit 42b #3: a 64 MiB
  // chunk refused failed a 4 MiB eviction).
  std::string refusal;
  bool released = false;
  for (;;) {
    void* p = ::mmap(nullptr, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      refusal = std::string("mmap: ") + std::strerror(errno);
    } else {
      try {
        dev_.register_host(p, chunk);
        return p;
      } catch (const HostCapExceeded& e) {  // the device's refusal to pin it
        ::munmap(p, chunk);
        refusal = without_source_location(e.what());
      } catch (...) {
        ::munmap(p, chunk);
        throw;
      }
    }
    if (chunk > least) {
      chunk = std::max(least, chunk / 2);
    } else if (!released && reserved_ > in_use_) {
      release_free_chunks_locked();
      released = true;
    } else {
      // HostCapExceeded is spill's host-memory error, also for the host's own refusal: the
      // swapper skips the block as for a full cap. The text says which it was.
      SPILL_FAIL_HOST_CAP(
          "host pool: the host refused " + format_bytes(chunk) + " of pinned host memory for " +
          format_bytes(bytes) + " (" + refusal + "); host_cap " +
          (cap_ ? format_bytes(*cap_) + " is not reached" : std::string("is unlimited")) + ": " +
          format_bytes(in_use_) + " in use, " + format_bytes(reserved_) +
          " reserved. The host is short of memory (RAM, ulimit -v): free some, or lower the "
          "budget's pressure");
    }
  }
}

void HostPool::deallocate(void* ptr, std::size_t) {
  std::lock_guard lock(mu_);
  Block probe;
  probe.addr = reinterpret_cast<std::uintptr_t>(ptr);
  auto it = used_.find(probe);
  if (it == used_.end()) {
    bool inside = false;
    for (const Segment& s : chunks_) inside |= probe.addr >= s.addr && probe.addr < s.addr + s.size;
    SPILL_EXPECTS(false, "host pool: " + format_address(ptr) +
                             (inside ? " is not a buffer in use (double free?)"
                                     : " was not allocated by this pool"));
  }
  Block& b = *it;
  used_.erase(it);
  in_use_ -= b.size;
  pool_.give_back(&b, nullptr);
}

std::size_t HostPool::in_use() const {
  std::lock_guard lock(mu_);
  return in_use_;
}

std::size_t HostPool::reserved() const {
  std::lock_guard lock(mu_);
  return reserved_;
}

Stat HostPool::stat() const {
  std::lock_guard lock(mu_);
  return stat_;
}

void HostPool::reset_peak() {
  std::lock_guard lock(mu_);
  stat_.reset_peak();
}

void HostPool::release_free_chunks() {
  std::lock_guard lock(mu_);
  release_free_chunks_locked();
}

void HostPool::release_free_chunks_locked() {
  for (Segment* s : pool_.free_segments()) {
    pool_.remove_free_segment(s);
    void* p = reinterpret_cast<void*>(s->addr);
    dev_.unregister_host(p);
    ::munmap(p, s->size);
    reserved_ -= s->size;
    stat_.sub(s->size);
    profiling::TraceRecorder::global().record(profiling::EventKind::HostFree, s->addr, s->size, 0,
                                              dev_.info().ordinal);
    chunks_.erase(chunks_.iterator_to(*s));
    delete s;
  }
}

}  // namespace spill

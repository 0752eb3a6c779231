// The pin/unpin protocol, prefetch and evict hints, and release. See swapper.hpp.
#include "swapper/swapper.hpp"

#include <algorithm>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "profiling/events.hpp"
#include "profiling/nvtx.hpp"
#include "swapper/swapper_impl.hpp"

namespace spill {

using profiling::EventKind;
using profiling::TraceRecorder;

const char* to_string(Residence r) {
  switch (r) {
    case Residence::Resident: return "resident";
    case Residence::SwappingOut: return "swapping out";
    case Residence::OnHost: return "on host";
    case Residence::SwappingIn: return "swapping in";
  }
  return "?";
}

namespace {
std::uintptr_t key(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }
std::uint64_t sid(Stream s) { return reinterpret_cast<std::uint64_t>(s); }
}  // namespace

Swapper::Impl::Impl(Device& d, ResidencyBackend& b, HostMemory& h, SwapperOptions o)
    : dev(d), backend(b), host(h), opt(std::move(o)) {
  SPILL_EXPECTS(opt.chunk_bytes > 0, "swapper: chunk_bytes must be above zero");
  d2h = dev.create_stream();
  h2d = dev.create_stream();
}

Swapper::Swapper(Device& device, ResidencyBackend& backend, HostMemory& host,
                 SwapperOptions options)
    : impl_(std::make_unique<Impl>(device, backend, host, std::move(options))) {}

Swapper::~Swapper() {
  Impl& m = *impl_;
  try {
    m.dev.synchronize(m.d2h);
    m.dev.synchronize(m.h2d);
  } catch (...) {
    // A sticky device error: free what we can below.
  }
  std::lock_guard lock(m.mu);
  for (auto& [base, b] : m.blocks) {
    if (b.out_done) m.dev.destroy_event(b.out_done);
    if (b.in_done) m.dev.destroy_event(b.in_done);
    if (b.host) m.host.deallocate(b.host, b.size);
  }
  for (auto& z : m.zombies) {
    m.host.deallocate(z.host, z.size);
    if (z.done) m.dev.destroy_event(z.done);
  }
  for (Event e : m.event_pool) m.dev.destroy_event(e);
  m.dev.destroy_stream(m.d2h);
  m.dev.destroy_stream(m.h2d);
}

// ---- helpers

Event Swapper::Impl::get_event_locked() {
  if (event_pool.empty()) return dev.create_event();
  Event e = event_pool.back();
  event_pool.pop_back();
  return e;
}

void Swapper::Impl::put_event_locked(Event& e) {
  if (e != nullptr) event_pool.push_back(e);
  e = nullptr;
}

SwapBlock* Swapper::Impl::find_tracked_locked(const void* ptr) {
  auto it = blocks.upper_bound(key(ptr));
  if (it == blocks.begin()) return nullptr;
  --it;
  return key(ptr) < it->first + it->second.size ? &it->second : nullptr;
}

SwapBlock& Swapper::Impl::block_for_locked(const void* ptr, const char* op) {
  if (SwapBlock* b = find_tracked_locked(ptr)) return *b;
  std::optional<SwappableBlock> info = backend.find_block(ptr);
  SPILL_EXPECTS(info.has_value(), std::string(op) + ": " + format_address(ptr) +
                                      " is not inside a swappable block of this allocator");
  SwapBlock& b = blocks[key(info->base)];
  b.base = info->base;
  b.size = info->size;
  stats.resident_bytes += b.size;
  return b;
}

void Swapper::Impl::wait_not_busy(std::unique_lock<std::mutex>& lock, std::uintptr_t base) {
  cv.wait(lock, [&] {
    auto it = blocks.find(base);
    return it == blocks.end() || !it->second.busy;
  });
}

void Swapper::Impl::copy_chunks(void* dst, const void* src, std::size_t bytes, CopyKind kind,
                                Stream s) {
  // Chunks let the first bytes land while the rest are in flight, and let other blocks'
  // copies interleave on the same engine.
  for (std::size_t off = 0; off < bytes; off += opt.chunk_bytes) {
    std::size_t n = std::min(opt.chunk_bytes, bytes - off);
    dev.copy_async(static_cast<char*>(dst) + off, static_cast<const char*>(src) + off, n, kind, s);
  }
}

void Swapper::Impl::settle_locked(SwapBlock& b) {
  if (b.state == Residence::SwappingIn && b.in_done && dev.query(b.in_done)) {
    b.state = Residence::Resident;
  }
}

bool Swapper::Impl::swap_in(std::unique_lock<std::mutex>& lock, std::uintptr_t base,
                            bool prefetch) {
  SwapBlock& b = blocks.at(base);
  SPILL_ASSERT(b.state == Residence::OnHost, "swap_in of a block that is not on the host");
  b.busy = true;
  void* ptr = b.base;
  std::size_t size = b.size;
  lock.unlock();
  profiling::NvtxRange range(prefetch ? "spill prefetch" : "spill swap-in",
                             prefetch ? profiling::kNvtxPrefetch : profiling::kNvtxSwapIn);
  std::exception_ptr failure;
  bool mapped = true;
  try {
    if (prefetch) {
      // A prefetch only uses room that is free, or that evictions already in flight will
      // free: it never chooses new victims (they could be needed before this block).
      mapped = backend.try_reback(ptr, size);
      if (!mapped && wait_inflight(size) > 0) mapped = backend.try_reback(ptr, size);
    } else {
      backend.reback(ptr, size);  // may run the eviction ladder, which takes our lock
    }
  } catch (...) {
    failure = std::current_exception();
  }
  lock.lock();
  SwapBlock& again = blocks.at(base);  // busy blocks are never erased
  again.busy = false;
  cv.notify_all();
  if (!mapped) {
    stats.prefetches_skipped++;
    return false;
  }
  if (failure) {
    if (prefetch) return false;
    // Say which blocks hold the budget: the pinned ones cannot move.
    std::string pinned;
    std::size_t pinned_bytes = 0;
    for (auto& [k, other] : blocks) {
      if (other.pins > 0 && other.state != Residence::OnHost) {
        pinned_bytes += other.size;
        if (pinned.size() < 400)
          pinned += " " + format_address(other.base) + " (" + format_bytes(other.size) + ")";
      }
    }
    std::size_t by_state[4] = {0, 0, 0, 0}, busy_bytes = 0;
    for (auto& [k, other] : blocks) {
      by_state[static_cast<int>(other.state)] += other.size;
      if (other.busy) busy_bytes += other.size;
    }
    try {
      std::rethrow_exception(failure);
    } catch (const OutOfMemory& e) {
      throw OutOfMemory(std::string("pin: cannot bring ") + format_bytes(size) + " at " +
                        format_address(ptr) + " back: " + format_bytes(pinned_bytes) +
                        " of the budget is pinned by blocks that cannot be evicted:" +
                        (pinned.empty() ? " none" : pinned) + " (tracked blocks: " +
                        format_bytes(by_state[0]) + " resident, " + format_bytes(by_state[1]) +
                        " swapping out, " + format_bytes(by_state[2]) + " on host, " +
                        format_bytes(by_state[3]) + " swapping in, " + format_bytes(busy_bytes) +
                        " being mapped). " + e.what());
    }
  }
  again.in_done = again.in_done ? again.in_done : get_event_locked();
  if (!again.untouched) {  // an untouched block has no bytes to bring back
    std::uint64_t start = TraceRecorder::now();
    try {
      copy_chunks(again.base, again.host, again.size, CopyKind::HostToDevice, h2d);
    } catch (...) {
      // The bytes are still on the host: give the fresh memory back and stay there. Chunks
      // already enqueued only write memory that is unmapped after them.
      dev.synchronize(h2d);
      backend.unback(again.base, again.size);
      throw;
    }
    dev.host_callback(h2d, [start, base, size] {
      TraceRecorder::global().record_span(EventKind::SwapIn, start, base, size);
    });
    stats.swap_ins++;
    stats.bytes_in += size;
  }
  dev.record(again.in_done, h2d);
  again.state = Residence::SwappingIn;
  again.prefetched = prefetch;
  stats.on_host_bytes -= size;
  stats.resident_bytes += size;
  if (prefetch) stats.prefetches++;
  return true;
}

void Swapper::Impl::prefetch_all(std::unique_lock<std::mutex>& lock,
                                 const std::vector<std::uintptr_t>& bases) {
  for (std::uintptr_t base : bases) {
    wait_not_busy(lock, base);
    auto it = blocks.find(base);
    if (it == blocks.end()) continue;
    if (it->second.state == Residence::SwappingOut) {
      // Still on the device: cancel the eviction instead of copying back.
      it->second.state = Residence::Resident;
      continue;
    }
    if (it->second.state == Residence::OnHost) swap_in(lock, base, true);
  }
}

// ---- protocol

void Swapper::pin(const void* ptr, Stream stream) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  std::vector<std::uintptr_t> wanted = m.advance_op_locked(false);
  if (!wanted.empty()) m.prefetch_all(lock, wanted);
  std::uintptr_t base = key(m.block_for_locked(ptr, "pin").base);
  m.wait_not_busy(lock, base);
  SwapBlock* b = &m.block_for_locked(ptr, "pin");
  if (b->state == Residence::SwappingOut) {
    // Cancel: the device bytes are still there. The stream waits for the copy in flight so
    // that a write cannot race it (the host copy it makes stays valid unless written).
    b->state = Residence::Resident;
    m.dev.wait(stream, b->out_done);
  } else if (b->state == Residence::OnHost) {
    m.stats.demand_fetches++;
    std::uint64_t stall_start = TraceRecorder::now();
    m.swap_in(lock, base, false);
    b = &m.blocks.at(base);
    // The stream stalls until the copy lands: a slice from the pin to the copy's end.
    const std::size_t size = b->size;
    const std::uint64_t stream_id = sid(stream);
    m.dev.host_callback(m.h2d, [stall_start, base, size, stream_id] {
      TraceRecorder::global().record_span(EventKind::Stall, stall_start, base, size, stream_id);
    });
    b->prefetched = false;
  } else if (b->prefetched) {
    bool landed = b->state == Residence::Resident || m.dev.query(b->in_done);
    (landed ? m.stats.prefetch_hits : m.stats.prefetch_late)++;
    if (!landed) m.step.lookahead = std::min(m.step.lookahead + 1, 2);
    b->prefetched = false;
  }
  m.settle_locked(*b);
  if (b->state == Residence::SwappingIn) m.dev.wait(stream, b->in_done);
  b->pins++;
  b->last_use = ++m.tick;
  m.on_pin_locked(*b, stream);
  TraceRecorder::global().record(EventKind::Pin, base, b->size, sid(stream));
}

void Swapper::unpin(const void* ptr, Stream stream, bool wrote) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  SwapBlock* b = m.find_tracked_locked(ptr);
  SPILL_EXPECTS(b != nullptr && b->pins > 0,
                "unpin: " + format_address(ptr) + " is not pinned (unpin without pin)");
  if (std::find(b->use_streams.begin(), b->use_streams.end(), stream) == b->use_streams.end())
    b->use_streams.push_back(stream);
  if (wrote) b->host_valid = false, b->untouched = false;
  b->pins--;
  m.on_unpin_locked(*b, wrote);
  TraceRecorder::global().record(EventKind::Unpin, key(b->base), b->size, sid(stream));
}

void Swapper::prefetch(const void* ptr) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  std::uintptr_t base = key(m.block_for_locked(ptr, "prefetch").base);
  m.prefetch_all(lock, {base});
  TraceRecorder::global().record(EventKind::Prefetch, base, m.blocks.at(base).size,
                                 profiling::kHostStream);
}

void Swapper::evict(const void* ptr) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  std::uintptr_t base = key(m.block_for_locked(ptr, "evict").base);
  m.wait_not_busy(lock, base);
  SwapBlock& b = m.blocks.at(base);
  if (b.pins > 0 || b.state == Residence::OnHost || b.state == Residence::SwappingOut) return;
  m.start_swap_out_locked(b);
  m.stats.evictions_planned++;
  TraceRecorder::global().record(EventKind::Evict, base, b.size, profiling::kHostStream);
}

std::size_t Swapper::evict_bytes(std::size_t needed) { return impl_->evict_bytes(needed); }

void Swapper::release(void* base, Stream stream) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  m.wait_not_busy(lock, key(base));
  auto it = m.blocks.find(key(base));
  if (it == m.blocks.end()) return;  // never pinned: nothing to do
  SwapBlock& b = it->second;
  // Copies still touching the memory (a swap-in writing it, a swap-out reading it) must
  // finish before the memory's next owner runs or the allocator unmaps it: the freeing
  // stream waits for them, so the allocator's stream-ordered free covers them.
  bool copying = false;
  for (Event e : {b.in_done, b.out_done}) {
    if (e && !m.dev.query(e)) {
      m.dev.wait(stream, e);
      copying = true;
    }
  }
  if (b.state == Residence::OnHost || b.state == Residence::SwappingOut) {
    if (b.state == Residence::SwappingOut) m.stats.resident_bytes -= b.size;
    else m.stats.on_host_bytes -= b.size;
  } else {
    m.stats.resident_bytes -= b.size;
  }
  if (b.host) {
    // A copy may still be writing (swap-out) or reading (swap-in) the host buffer: free it
    // once the freeing stream, which now waits for both, gets past this point.
    if (copying) {
      Event done = m.get_event_locked();
      m.dev.record(done, stream);
      m.zombies.push_back({b.host, b.size, done});
    } else {
      m.host.deallocate(b.host, b.size);
      m.stats.host_bytes -= b.size;
    }
  }
  m.put_event_locked(b.out_done);
  m.put_event_locked(b.in_done);
  m.step.id_of.erase(key(base));
  m.blocks.erase(it);
}

void Swapper::track(void* base, std::size_t size) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  auto [it, fresh] = m.blocks.try_emplace(key(base));
  if (!fresh) return;
  it->second.base = base;
  it->second.size = size;
  it->second.untouched = true;
  m.stats.resident_bytes += size;
}

void Swapper::forget_stream(Stream stream) {
  Impl& m = *impl_;
  m.dev.synchronize(stream);
  std::lock_guard lock(m.mu);
  for (auto& [base, b] : m.blocks) std::erase(b.use_streams, stream);
  m.step.stream_ids.erase(reinterpret_cast<std::uintptr_t>(stream));
}

Residence Swapper::residence(const void* ptr) const {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  SwapBlock* b = m.find_tracked_locked(ptr);
  if (b == nullptr) return Residence::Resident;
  m.settle_locked(*b);
  return b->state;
}

SwapStats Swapper::stats() const {
  std::lock_guard lock(impl_->mu);
  return impl_->stats;
}

graph::Trace Swapper::last_trace() const {
  std::lock_guard lock(impl_->mu);
  return impl_->step.last_trace;
}

void Swapper::quiesce() {
  Impl& m = *impl_;
  m.dev.synchronize(m.d2h);
  m.dev.synchronize(m.h2d);
  std::lock_guard lock(m.mu);
  m.reap_locked();
  for (auto& [base, b] : m.blocks) m.settle_locked(b);
}

void Swapper::begin_op(std::string_view name) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  m.step.auto_ops = false;
  std::vector<std::uintptr_t> wanted = m.advance_op_locked(true);
  if (!name.empty() && m.step.recording) {
    if (m.step.trace.op_names.size() <= static_cast<std::size_t>(m.step.op))
      m.step.trace.op_names.resize(m.step.op + 1);
    m.step.trace.op_names[m.step.op] = std::string(name);
  }
  if (!wanted.empty()) m.prefetch_all(lock, wanted);
}

void Swapper::begin_step() {
  std::lock_guard lock(impl_->mu);
  impl_->begin_step_locked();
}

void Swapper::end_step() {
  std::lock_guard lock(impl_->mu);
  impl_->end_step_locked();
}

}  // namespace spill

// Swap-out and the eviction hook: choosing victims, starting copies to the host, and unmapping
// a block once its copy and every recorded use are complete.
#include <algorithm>

#include "core/errors.hpp"
#include "profiling/events.hpp"
#include "profiling/nvtx.hpp"
#include "swapper/swapper_impl.hpp"

namespace spill {

using profiling::EventKind;
using profiling::TraceRecorder;

namespace {
std::uintptr_t key(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }
}  // namespace

void Swapper::Impl::start_swap_out_locked(SwapBlock& b) {
  SPILL_ASSERT(b.pins == 0 && !b.busy, "swap-out of a pinned or busy block");
  profiling::NvtxRange range("spill swap-out", profiling::kNvtxSwapOut);
  // The D2H stream runs after every recorded use and after a swap-in still landing.
  for (Stream s : b.use_streams) {
    Event e = get_event_locked();
    dev.record(e, s);
    dev.wait(d2h, e);  // binds to this record: the event can go back to the pool at once
    event_pool.push_back(e);
  }
  b.use_streams.clear();
  if (b.in_done) dev.wait(d2h, b.in_done);
  // Clean only when the host copy is known current (every write since it was made was
  // bracketed by pin/unpin(wrote); declaring a block swappable makes it dirty), or when the
  // block was never written (C++ mode).
  const bool clean = (b.host_valid && b.host != nullptr) || b.untouched;
  if (!clean) {
    if (b.host == nullptr) {
      b.host = host.allocate(b.size);  // OutOfMemory at the host cap: the block stays put
      stats.host_bytes += b.size;
    }
    std::uint64_t start = TraceRecorder::now();
    copy_chunks(b.host, b.base, b.size, CopyKind::DeviceToHost, d2h);
    std::uintptr_t base = key(b.base);
    std::size_t size = b.size;
    if (TraceRecorder::global().enabled())  // (a host function holds a GPU's copy stream)
      dev.host_callback(d2h, [this, start, base, size] {
        const std::uint64_t end = TraceRecorder::now();
        const std::uint64_t from = std::max(start, d2h_trace_end.exchange(end));
        TraceRecorder::global().record_span(EventKind::SwapOut, std::min(from, end), base, size,
                                            0, ordinal);
      });
    stats.swap_outs++;
    stats.bytes_out += b.size;
  } else {
    stats.clean_evictions++;
  }
  if (b.out_done == nullptr) b.out_done = get_event_locked();
  dev.record(b.out_done, d2h);
  b.out_order = next_out_order++;
  b.host_valid = true;  // valid once out_done completes; a write before that cancels (pin)
  b.state = Residence::SwappingOut;
  swapping_out.insert(reinterpret_cast<std::uintptr_t>(b.base));
  // Every eviction, with a copy or clean: the trace's bytes on host follow these (a clean one
  // has no swap_out span).
  TraceRecorder::global().record(EventKind::Evict, key(b.base), b.size, profiling::kHostStream,
                                 ordinal);
}

std::size_t Swapper::Impl::complete_swap_out_locked(SwapBlock& b) {
  backend.unback(b.base, b.size);
  const auto base = reinterpret_cast<std::uintptr_t>(b.base);
  count_fresh_locked(base, b, -1);
  swapping_out.erase(base);
  b.state = Residence::OnHost;
  put_event_locked(b.out_done);
  put_event_locked(b.in_done);
  stats.resident_bytes -= b.size;
  stats.on_host_bytes += b.size;
  return b.size;
}

std::size_t Swapper::Impl::reap_locked() {
  std::size_t freed = 0;
  for (auto it = swapping_out.begin(); it != swapping_out.end();) {
    SwapBlock& b = blocks.at(*it);
    ++it;  // (completing it takes it out of the set)
    if (!b.busy && dev.query(b.out_done)) freed += complete_swap_out_locked(b);
  }
  reap_zombies_locked();
  return freed;
}

void Swapper::Impl::reap_zombies_locked() {
  auto done = std::remove_if(zombies.begin(), zombies.end(), [&](Zombie& z) {
    if (!dev.query(z.done)) return false;
    host.deallocate(z.host, z.size);
    stats.host_bytes -= z.size;
    event_pool.push_back(z.done);
    return true;
  });
  zombies.erase(done, zombies.end());
}

std::vector<std::uintptr_t> Swapper::Impl::rank_victims_locked() {
  struct Candidate {
    std::uintptr_t base;
    bool clean;
    std::int64_t next_use;  // op index of the next use; larger = better victim
    std::uint64_t last_use;
  };
  std::vector<Candidate> c;
  for (auto& [base, b] : blocks) {
    settle_locked(b);
    if (!evictable_locked(b)) continue;
    if (b.state != Residence::Resident && b.state != Residence::SwappingIn) continue;
    if (b.size < opt.min_swap_bytes) continue;
    c.push_back({base, (b.host_valid && b.host != nullptr) || b.untouched, next_use_locked(b),
                 b.last_use});
  }
  bool belady = false;
  for (const auto& [id, st] : scopes) belady |= st.follows_plan();
  std::sort(c.begin(), c.end(), [&](const Candidate& a, const Candidate& b) {
    if (belady && a.next_use != b.next_use) return a.next_use > b.next_use;
    return a.last_use < b.last_use;
  });
  // Prefer clean blocks (no copy) among the better half of the ranking; with plans, only among
  // those not needed again in this step: a clean block needed a few ops from now is not
  // evicted before a dirty one needed later (on the CPU bridge, a saved activation the plan had
  // just prefetched went before a gradient the optimizer reads after the backward, and came
  // back on demand).
  auto better = c.begin() + static_cast<std::ptrdiff_t>((c.size() + 1) / 2);
  if (belady)
    better = std::find_if(c.begin(), better,
                          [](const Candidate& x) { return x.next_use < kUnknownUse; });
  std::stable_partition(c.begin(), better, [](const Candidate& x) { return x.clean; });
  std::vector<std::uintptr_t> out;
  for (auto& x : c) out.push_back(x.base);
  return out;
}

std::size_t Swapper::Impl::evict_bytes(std::size_t needed) {
  profiling::NvtxRange range("spill evict", profiling::kNvtxEvict);
  std::unique_lock lock(mu);
  host_refusal.clear();
  std::size_t freed = reap_locked();
  if (freed >= needed) return freed;
  std::size_t coming = 0;
  for (auto& [base, b] : blocks)
    if (b.state == Residence::SwappingOut && !b.busy) coming += b.size;
  if (freed + coming < needed) {
    for (std::uintptr_t base : rank_victims_locked()) {
      if (freed + coming >= needed) break;
      SwapBlock& b = blocks.at(base);
      try {
        start_swap_out_locked(b);
      } catch (const OutOfMemory& e) {
        host_refusal = e.what();  // kept for the OOM message, which said nothing of it
        continue;  // host cap: try blocks that need no host buffer
      }
      stats.evictions_reactive++;
      coming += b.size;
    }
  }
  lock.unlock();
  return freed + wait_inflight(needed - std::min(needed, freed));
}

std::size_t Swapper::Impl::wait_inflight(std::size_t needed) {
  std::unique_lock lock(mu);
  std::size_t freed = reap_locked();
  // In the order they were issued: the D2H stream runs them in that order, so the first to
  // wait for is the first to free its room (waiting by address could wait for the last).
  struct Waiting {
    std::uint64_t order;
    std::uintptr_t base;
    Event e;
  };
  std::vector<Waiting> waiting;
  for (auto& [base, b] : blocks)
    if (b.state == Residence::SwappingOut && !b.busy) waiting.push_back({b.out_order, base, b.out_done});
  std::sort(waiting.begin(), waiting.end(),
            [](const Waiting& a, const Waiting& b) { return a.order < b.order; });
  for (auto& [order, base, e] : waiting) {
    if (freed >= needed) break;
    std::uint64_t start = TraceRecorder::now();
    const std::uint64_t host0 = TraceRecorder::global().now_ns();
    const double c0 = TraceRecorder::clock_seconds();
    // A recording timed on the device: the host's wait may leave its stream idle.
    StepState* timed = device_timed_scope_locked();
    if (timed != nullptr) mark_locked(*timed, StepState::MarkKind::StallBegin);
    const std::uint64_t timed_scope = timed != nullptr ? timed->scope : 0;
    lock.unlock();
    {
      profiling::NvtxRange wait("spill wait swap-out", profiling::kNvtxWait);
      dev.synchronize(e);
    }
    const double waited = TraceRecorder::clock_seconds() - c0;
    const std::uint64_t host_waited = TraceRecorder::global().now_ns() - host0;
    lock.lock();
    if (timed != nullptr) {
      timed = find_scope_locked(timed_scope);  // the scope may have ended meanwhile
      if (timed != nullptr && timed->in_step && timed->recording)
        mark_locked(*timed, StepState::MarkKind::StallEnd);
    }
    stats.host_wait_s += static_cast<double>(host_waited) * 1e-9;
    waited_ns += host_waited;
    stats.stall_s += std::max(0.0, waited);
    TraceRecorder::global().record_span(EventKind::Stall, start, base, 0,
                                        profiling::kHostStream, ordinal);
    auto it = blocks.find(base);
    // The block may have been pinned (cancelled) or released while we waited.
    if (it != blocks.end() && it->second.state == Residence::SwappingOut && !it->second.busy &&
        it->second.out_done == e && dev.query(e))
      freed += complete_swap_out_locked(it->second);
  }
  return freed;
}

}  // namespace spill

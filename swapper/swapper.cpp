// The pin/unpin protocol, prefetch and evict hints, and release. See swapper.hpp.
#include "swapper/swapper.hpp"

#include <algorithm>
#include <atomic>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "profiling/events.hpp"
#include "profiling/nvtx.hpp"
#include "swapper/swapper_impl.hpp"
#include "swapper/thread_scopes.hpp"

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

namespace {
std::atomic<std::uint64_t> next_serial{1};

// Generations are process-wide, not per swapper: a pin token kept across spill_shutdown and
// spill_init must not match a block of the new runtime at the same address (same base, both
// generation 1 with a per-runtime counter), or its unpin would end the new block's pin.
std::atomic<std::uint64_t> next_generation{1};
}  // namespace

std::uint64_t Swapper::Impl::current_scope() const { return thread_scopes::get(serial); }

void Swapper::Impl::set_current_scope(std::uint64_t scope) const {
  thread_scopes::set(serial, scope);
}

Swapper::Impl::Impl(Device& d, ResidencyBackend& b, HostMemory& h, SwapperOptions o)
    : dev(d), ordinal(d.info().ordinal), backend(b), host(h), opt(std::move(o)),
      serial(next_serial++) {
  SPILL_EXPECTS(opt.chunk_bytes > 0, "swapper: chunk_bytes must be above zero");
  d2h = dev.create_stream();
  h2d = dev.create_stream();
  thread_scopes::born(serial);
}

Swapper::Swapper(Device& device, ResidencyBackend& backend, HostMemory& host,
                 SwapperOptions options)
    : impl_(std::make_unique<Impl>(device, backend, host, std::move(options))) {}

Swapper::~Swapper() {
  Impl& m = *impl_;
  thread_scopes::gone(m.serial);  // threads' scopes on it may make room for others
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
  for (auto& [scope, st] : m.scopes) m.release_marks_locked(st);
  for (Event e : m.timing_pool) m.dev.destroy_event(e);
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

SwapBlock& Swapper::Impl::add_block_locked(void* base, std::size_t size) {
  SwapBlock& b = blocks[key(base)];
  b.base = base;
  b.size = size;
  b.request = size;
  b.swappable = !opt.opt_in;
  b.generation = next_generation.fetch_add(1, std::memory_order_relaxed);
  b.pins_after = next_pin;
  b.born = ++tick;
  stats.resident_bytes += size;
  count_fresh_locked(key(base), b, +1);
  return b;
}

SwapBlock* Swapper::Impl::lookup_locked(const void* ptr, const char* op) {
  if (SwapBlock* b = find_tracked_locked(ptr)) return b;
  std::optional<SwappableBlock> info = backend.find_block(ptr);
  if (!info) {
    if (backend.owns(ptr)) return nullptr;  // a block of the small pool: never moves
    SPILL_EXPECTS(false, std::string(op) + ": " + format_address(ptr) +
                             " is not inside a block of this allocator");
  }
  return &add_block_locked(info->base, info->size);
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

void Swapper::Impl::cancel_swap_out_locked(SwapBlock& b) {
  swapping_out.erase(key(b.base));
  // The device bytes are still there, but a swap-out may have started while the block's
  // swap-in was landing (a SwappingIn victim): then it is still swapping in, and its users
  // must wait for that copy.
  b.state = b.in_done != nullptr && !dev.query(b.in_done) ? Residence::SwappingIn
                                                          : Residence::Resident;
}

void Swapper::Impl::settle_locked(SwapBlock& b) {
  if (b.state == Residence::SwappingIn && b.in_done && dev.query(b.in_done)) {
    b.state = Residence::Resident;
  }
}

std::exception_ptr Swapper::Impl::host_wait_pinned(std::unique_lock<std::mutex>& lock,
                                                   std::uintptr_t base, Event e) {
  SwapBlock& b = blocks.at(base);
  const std::uint64_t generation = b.generation;
  b.pins++;  // held while the host waits without the lock: nothing moves it meanwhile
  lock.unlock();
  std::exception_ptr error;
  try {
    profiling::NvtxRange range("spill pin wait", profiling::kNvtxWait);
    dev.synchronize(e);
  } catch (...) {
    error = std::current_exception();
  }
  lock.lock();
  auto again = blocks.find(base);
  if (again != blocks.end() && again->second.generation == generation) {
    again->second.pins--;
    settle_locked(again->second);
  }
  return error;
}

bool Swapper::Impl::return_cache_for(std::size_t size, bool reap) {
  const std::size_t room = backend.room();
  if (room >= size || backend.cached_bytes() == 0 || backend.release_cache(size - room) == 0)
    return false;
  std::lock_guard counted(mu);
  stats.cache_returns++;
  if (reap) reap_locked();
  return true;
}

bool Swapper::Impl::make_room_for_prefetch(void* ptr, std::size_t size, RoomWait wait) {
  // (After the swap-outs, those that completed while the host waited free their room too. A
  // graph plan's prefetch leaves them to the next reap: the prediction simulates the swapper's
  // lazy completion of swap-outs, and a prefetch that finds its block still being copied out
  // keeps it.)
  const bool reap = wait == RoomWait::SwapOutsThenCache;
  auto from_cache = [&] { return return_cache_for(size, reap) && backend.try_reback(ptr, size); };
  auto from_swap_outs = [&] {
    const std::size_t room = backend.room();
    return (room >= size || wait_inflight(size - room) > 0) && backend.try_reback(ptr, size);
  };
  if (wait == RoomWait::CacheThenSwapOuts) return from_cache() || from_swap_outs();
  return from_swap_outs() || from_cache();
}

bool Swapper::Impl::swap_in(std::unique_lock<std::mutex>& lock, std::uintptr_t base,
                            bool prefetch, RoomWait wait) {
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
      // A prefetch only uses room that is free now: it never chooses victims here (they
      // could be needed before this block) and never waits (the plan retries it later),
      // unless `wait` says how (make_room_for_prefetch). Without room now, cached blocks give
      // it their memory (whole, none larger than it), the copy stream waiting for their
      // queued work rather than the host. When they cannot and the cache comes first, it is
      // returned before anything else: the same blocks whatever the device's progress
      // (try_reback returns only those whose queued work has run, which depends on it).
      if (wait == RoomWait::CacheThenSwapOuts && backend.room() < size &&
          !backend.cache_can_back(size))
        return_cache_for(size, false);
      mapped = (backend.room() < size && backend.reback_from_cache(ptr, size, h2d)) ||
               backend.try_reback(ptr, size);
      if (!mapped && wait != RoomWait::None) mapped = make_room_for_prefetch(ptr, size, wait);
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
    std::size_t by_state[4] = {0, 0, 0, 0}, busy_bytes = 0;
    for (auto& [k, other] : blocks) {
      by_state[static_cast<int>(other.state)] += other.size;
      if (other.busy) busy_bytes += other.size;
    }
    try {
      std::rethrow_exception(failure);
    } catch (const OutOfMemory& e) {
      // Say which blocks hold the budget: those that cannot move.
      const std::string name = backend.block_name(ptr);  // the caller's, when it gave one
      throw OutOfMemory(std::string("pin: cannot bring ") + format_bytes(size) + " at " +
                        format_address(ptr) + (name.empty() ? "" : " (\"" + name + "\")") +
                        " back: " + unevictable_report_locked() +
                        " (tracked blocks: " + format_bytes(by_state[0]) + " resident, " +
                        format_bytes(by_state[1]) + " swapping out, " +
                        format_bytes(by_state[2]) + " on host, " + format_bytes(by_state[3]) +
                        " swapping in, " + format_bytes(busy_bytes) + " being mapped). " +
                        e.what());
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
    // (A host function on the copy stream, only while recording: on a GPU each one holds
    // the stream until the host has run it.)
    if (TraceRecorder::global().enabled())
      dev.host_callback(h2d, [this, start, base, size] {  // see h2d_trace_end
        const std::uint64_t end = TraceRecorder::now();
        const std::uint64_t from = std::max(start, h2d_trace_end.exchange(end));
        TraceRecorder::global().record_span(EventKind::SwapIn, std::min(from, end), base, size,
                                            0, ordinal);
      });
    stats.swap_ins++;
    stats.bytes_in += size;
  }
  dev.record(again.in_done, h2d);
  again.state = Residence::SwappingIn;
  count_fresh_locked(base, again, +1);  // (back from the host)
  again.prefetched = prefetch;
  stats.on_host_bytes -= size;
  stats.resident_bytes += size;
  if (prefetch) stats.prefetches++;
  return true;
}

void Swapper::Impl::prefetch_all(std::unique_lock<std::mutex>& lock,
                                 const std::vector<std::uintptr_t>& bases, RoomWait wait) {
  for (std::uintptr_t base : bases) {
    wait_not_busy(lock, base);
    auto it = blocks.find(base);
    if (it == blocks.end()) continue;
    if (it->second.state == Residence::SwappingOut) {
      // Still on the device: cancel the eviction instead of copying back.
      cancel_swap_out_locked(it->second);
      continue;
    }
    if (it->second.state == Residence::OnHost) swap_in(lock, base, true, wait);
  }
}

SwapStats swaps_since(const SwapStats& now, const SwapStats& before) {
  SwapStats d = now;
  d.bytes_out -= before.bytes_out;
  d.bytes_in -= before.bytes_in;
  d.swap_outs -= before.swap_outs;
  d.swap_ins -= before.swap_ins;
  d.clean_evictions -= before.clean_evictions;
  d.prefetches -= before.prefetches;
  d.prefetch_hits -= before.prefetch_hits;
  d.prefetch_late -= before.prefetch_late;
  d.prefetches_skipped -= before.prefetches_skipped;
  d.demand_fetches -= before.demand_fetches;
  d.evictions_reactive -= before.evictions_reactive;
  d.evictions_planned -= before.evictions_planned;
  d.host_wait_s -= before.host_wait_s;
  d.stall_s -= before.stall_s;
  d.stale_unpins -= before.stale_unpins;
  d.cache_returns -= before.cache_returns;
  return d;
}

void add_swaps(SwapStats& t, const SwapStats& s) {
  t.bytes_out += s.bytes_out;
  t.bytes_in += s.bytes_in;
  t.swap_outs += s.swap_outs;
  t.swap_ins += s.swap_ins;
  t.clean_evictions += s.clean_evictions;
  t.prefetches += s.prefetches;
  t.prefetch_hits += s.prefetch_hits;
  t.prefetch_late += s.prefetch_late;
  t.prefetches_skipped += s.prefetches_skipped;
  t.demand_fetches += s.demand_fetches;
  t.evictions_reactive += s.evictions_reactive;
  t.evictions_planned += s.evictions_planned;
  t.host_wait_s += s.host_wait_s;
  t.stall_s += s.stall_s;
  t.stale_unpins += s.stale_unpins;
  t.cache_returns += s.cache_returns;
}

// ---- protocol

PinToken Swapper::pin(const void* ptr, Stream stream) { return impl_->pin(ptr, stream, false); }

PinToken Swapper::pin_for_host(const void* ptr) { return impl_->pin(ptr, nullptr, true); }

PinToken Swapper::Impl::pin(const void* ptr, Stream stream, bool host) {
  std::unique_lock lock(mu);
  const std::uint64_t scope = current_scope();
  if (StepState* step = find_scope_locked(scope)) {
    std::vector<PlannedPrefetch> wanted = advance_op_locked(*step, false);
    mark_op_start_locked(*step, stream, host);
    if (!wanted.empty()) prefetch_planned(lock, *step, std::move(wanted));
  }
  SwapBlock* b = lookup_locked(ptr, host ? "pin_for_host" : "pin");
  if (b == nullptr) return {};
  const std::uintptr_t base = key(b->base);
  wait_not_busy(lock, base);
  b = lookup_locked(ptr, host ? "pin_for_host" : "pin");  // it may have been freed meanwhile
  if (b == nullptr || key(b->base) != base) return {};
  Event wait_for = nullptr;
  // A host pin of a block on the host stalls its caller from here until the bytes have
  // landed, however the host learns that they have: by waiting, or by a query that finds the
  // copy done (on SimDevice in wall-query mode that moves the simulated clock without a wait,
  // and whether it does is a race with the copy thread). Measured as the clock's advance.
  const bool host_demand = host && b->state == Residence::OnHost;
  const double demand_c0 = host_demand ? TraceRecorder::clock_seconds() : 0.0;
  const double demand_stall0 = stats.stall_s;
  if (b->state == Residence::SwappingOut) {
    // Cancel: the device bytes are still there. The user waits for the copy in flight so
    // that a write cannot race it (the host copy it makes stays valid unless written); the
    // swap-out itself waited for any swap-in still landing.
    cancel_swap_out_locked(*b);
    wait_for = b->out_done;
  } else if (b->state == Residence::OnHost) {
    stats.demand_fetches++;
    std::uint64_t stall_start = TraceRecorder::now();
    swap_in(lock, base, false);
    b = &blocks.at(base);
    // The user stalls until the copy lands: a slice from the pin to the copy's end.
    const std::size_t size = b->size;
    const std::uint64_t stream_id = host ? profiling::kHostStream : sid(stream);
    if (TraceRecorder::global().enabled())  // (as the swap-in's slice)
      dev.host_callback(h2d, [stall_start, base, size, stream_id, device = ordinal] {
        TraceRecorder::global().record_span(EventKind::Stall, stall_start, base, size,
                                            stream_id, device);
      });
    b->prefetched = false;
  } else if (b->prefetched) {
    bool landed = b->state == Residence::Resident || dev.query(b->in_done);
    (landed ? stats.prefetch_hits : stats.prefetch_late)++;
    StepState* st = find_scope_locked(scope);
    // A step pinned on a stream issues its prefetches at the plan's ops, waiting for room
    // (see prefetch_planned): earlier, they would wait for room the plan has not made yet.
    if (!landed && st != nullptr && st->timing != StepState::Timing::Device)
      st->lookahead = std::min(st->lookahead + 1, 2);
    b->prefetched = false;
  }
  settle_locked(*b);
  if (b->state == Residence::SwappingIn && wait_for == nullptr) wait_for = b->in_done;
  if (wait_for != nullptr && !host) {
    StepState* timed = device_timed_scope_locked();
    if (timed != nullptr && stream != timed->timing_stream) timed = nullptr;
    if (timed != nullptr) mark_locked(*timed, StepState::MarkKind::StallBegin);
    dev.wait(stream, wait_for);
    if (timed != nullptr) mark_locked(*timed, StepState::MarkKind::StallEnd);
  }
  b->pins++;
  b->last_use = ++tick;
  b->host_used = b->host_used || host;
  if (StepState* st = find_scope_locked(scope)) {
    b->scope = scope;
    on_pin_locked(*st, *b, host ? reinterpret_cast<Stream>(~std::uintptr_t{0}) : stream);
  }
  TraceRecorder::global().record(EventKind::Pin, base, b->size,
                                 host ? profiling::kHostStream : sid(stream), ordinal);
  PinToken token{base, b->generation, host, scope};
  auto slot = std::find(b->pin_ids.begin(), b->pin_ids.end(), std::uint64_t{0});
  if (slot != b->pin_ids.end()) *slot = token.pin = ++next_pin;
  if (wait_for != nullptr && host) {
    // Pinned: nothing can move it while the host waits without the lock. Events are recycled,
    // never destroyed, while the swapper lives: a re-recorded one only makes the wait longer.
    lock.unlock();
    const double t0 = TraceRecorder::clock_seconds();
    const std::uint64_t host0 = TraceRecorder::global().now_ns();
    dev.synchronize(wait_for);
    const double waited = TraceRecorder::clock_seconds() - t0;
    const std::uint64_t host_waited = TraceRecorder::global().now_ns() - host0;
    lock.lock();
    stats.stall_s += std::max(0.0, waited);
    waited_ns += host_waited;
  }
  if (host_demand) {
    // Waits inside the fetch (room, the copy) are counted already; add what they missed.
    const double advance = TraceRecorder::clock_seconds() - demand_c0;
    stats.stall_s += std::max(0.0, advance - (stats.stall_s - demand_stall0));
  }
  return token;
}

void Swapper::Impl::unpin_locked(SwapBlock& b, Stream stream, bool wrote, bool host,
                                 std::uint64_t scope) {
  if (!host && std::find(b.use_streams.begin(), b.use_streams.end(), stream) == b.use_streams.end())
    b.use_streams.push_back(stream);
  if (wrote) b.host_valid = false, b.untouched = false;
  b.pins--;
  if (StepState* st = find_scope_locked(scope)) on_unpin_locked(*st, b, wrote);
  TraceRecorder::global().record(EventKind::Unpin, key(b.base), b.size,
                                 host ? profiling::kHostStream : sid(stream), ordinal);
}

void Swapper::unpin(const void* ptr, Stream stream, bool wrote) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  SwapBlock* b = m.find_tracked_locked(ptr);
  if (b == nullptr && !m.backend.find_block(ptr) && m.backend.owns(ptr)) return;  // never moves
  SPILL_EXPECTS(b != nullptr && b->pins > 0,
                "unpin: " + format_address(ptr) + " is not pinned (unpin without pin)");
  // Which pin it ends is not known: one counted alone if any, else a tracked one.
  if (b->pins <= b->tracked_pins()) {
    auto open = std::find_if(b->pin_ids.begin(), b->pin_ids.end(),
                             [](std::uint64_t id) { return id != 0; });
    *open = 0;
  }
  m.unpin_locked(*b, stream, wrote, false, m.current_scope());
}

void Swapper::unpin(const PinToken& token, Stream stream, bool wrote) {
  if (!token) return;  // a block that never moves
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  auto it = m.blocks.find(token.block);
  if (it == m.blocks.end() || it->second.generation != token.generation) {
    m.stats.stale_unpins++;  // freed meanwhile (its address perhaps reused): nothing to do
    return;
  }
  SwapBlock& b = it->second;
  auto slot = token.pin == 0 ? b.pin_ids.end()
                             : std::find(b.pin_ids.begin(), b.pin_ids.end(), token.pin);
  // A token with an id ends that pin, if it has not ended yet; one without (a pin past the
  // tracked ones) ends one of the pins counted alone. Ids are given in order: one above the
  // latest given, or not above the latest before the block's life began, was never a pin of
  // this block (a corrupted or forged token), which is not a token unpinned twice.
  if (token.pin > m.next_pin || (token.pin != 0 && token.pin <= b.pins_after)) {
    throw InvalidArgument(
        "unpin: the token names pin " + std::to_string(token.pin) + " of the block at " +
        format_address(b.base) + ", which was never one of its pins (" +
        (token.pin > m.next_pin ? "pins given out so far go up to " + std::to_string(m.next_pin)
                                : "its pins have ids above " + std::to_string(b.pins_after)) +
        "): the token is corrupted or was not returned by spill_pin");
  }
  SPILL_EXPECTS(token.pin != 0 ? slot != b.pin_ids.end() : b.pins > b.tracked_pins(),
                "unpin: the token of pin " + std::to_string(token.pin) + " of the block at " +
                    format_address(b.base) + " was unpinned already (a token unpinned twice)");
  if (slot != b.pin_ids.end()) *slot = 0;
  m.unpin_locked(it->second, stream, wrote, token.host,
                 token.scope.has_value() ? *token.scope : m.current_scope());
}

void Swapper::prefetch(const void* ptr, bool wait_for_room) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  SwapBlock* found = m.lookup_locked(ptr, "prefetch");
  if (found == nullptr) return;
  const std::uintptr_t base = key(found->base);
  const std::size_t size = found->size;
  m.prefetch_all(lock, {base}, wait_for_room ? Impl::RoomWait::CacheThenSwapOuts
                                            : Impl::RoomWait::None);
  TraceRecorder::global().record(EventKind::Prefetch, base, size, profiling::kHostStream,
                                 m.ordinal);
}

SwapBlock* Swapper::Impl::idle_block_locked(std::unique_lock<std::mutex>& lock, const void* ptr,
                                            const char* op) {
  SwapBlock* found = lookup_locked(ptr, op);
  if (found == nullptr) return nullptr;
  const std::uintptr_t base = key(found->base);
  wait_not_busy(lock, base);
  auto it = blocks.find(base);
  return it == blocks.end() ? nullptr : &it->second;  // (freed meanwhile)
}

void Swapper::evict(const void* ptr) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  SwapBlock* b = m.idle_block_locked(lock, ptr, "evict");
  if (b == nullptr || !m.evictable_locked(*b) || b->state == Residence::OnHost ||
      b->state == Residence::SwappingOut || b->size < m.opt.min_swap_bytes)
    return;
  m.start_swap_out_locked(*b);
  m.stats.evictions_planned++;
}

void Swapper::discard(const void* ptr) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  SwapBlock* b = m.idle_block_locked(lock, ptr, "discard");
  if (b == nullptr || b->state != Residence::OnHost) return;
  // No bytes to bring back (as a block never written): the swap-in maps memory and copies
  // nothing; the write that follows, unpinned with `wrote`, makes it a block with bytes again.
  b->untouched = true;
  b->host_valid = false;
}

std::size_t Swapper::evict_bytes(std::size_t needed) { return impl_->evict_bytes(needed); }

void Swapper::release(void* base, Stream stream) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  m.wait_not_busy(lock, key(base));
  auto it = m.blocks.find(key(base));
  if (it == m.blocks.end()) return;  // never pinned: nothing to do
  if (it->second.host_used && it->second.in_done && !m.dev.query(it->second.in_done)) {
    // A swap-in still landing (a prefetch of a block freed before its use) would overwrite
    // the memory's next owner, which the host may write at once (the allocator hands it out
    // in the freeing stream's order, which the host does not follow): the host waits for it.
    // Before, the CPU bridge's next block lost the bytes the host wrote first (about half the
    // runs of ResyncedSteps.ANewBatchAtTheActivationsPlaceIsNoStateThePlansStepMade). A
    // failed copy leaves the memory as it is: its error is not this free's; the freeing
    // stream still waits for the event below, and the error surfaces at the device's next use.
    const std::uint64_t host0 = TraceRecorder::global().now_ns();
    m.host_wait_pinned(lock, key(base), it->second.in_done);
    m.waited_ns += TraceRecorder::global().now_ns() - host0;
    it = m.blocks.find(key(base));
    if (it == m.blocks.end()) return;
  }
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
  m.count_fresh_locked(key(base), b, -1);
  m.swapping_out.erase(key(base));
  for (auto& [id, st] : m.scopes) {
    st.id_of.erase(key(base));
    st.birth_of.erase(key(base));
    m.forget_expected_locked(st, key(base));
  }
  m.blocks.erase(it);
}

void Swapper::track(void* base, std::size_t size, Stream stream, std::size_t request) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  if (m.blocks.count(key(base)) != 0) return;
  SwapBlock& b = m.add_block_locked(base, size);
  if (request != 0) b.request = request;
  // C++ mode: nothing can have written it yet, and every write will be pinned. Opt-in mode:
  // not swappable (so protected) until declared.
  b.untouched = !m.opt.opt_in;
  b.use_streams.push_back(stream);  // the allocation is a use by the allocating stream
  if (StepState* st = m.find_scope_locked(m.current_scope())) m.on_birth_locked(*st, b);
}

void Swapper::set_swappable(const void* ptr, bool on) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  SwapBlock* found = m.lookup_locked(ptr, "set_swappable");
  if (found == nullptr) return;  // never moves
  const std::uintptr_t base = key(found->base);
  m.wait_not_busy(lock, base);
  auto it = m.blocks.find(base);
  SPILL_EXPECTS(it != m.blocks.end(),
                "set_swappable: " + format_address(ptr) + " was freed while it was being moved");
  SwapBlock* b = &it->second;
  if (on) {
    // From now on every use is pinned; what happened before went unseen: dirty.
    b->swappable = true;
    b->host_valid = false;
    b->untouched = false;
    return;
  }
  if (b->state == Residence::OnHost) {
    m.swap_in(lock, base, false);  // throws (block unchanged) when it cannot come back
    b = &m.blocks.at(base);
  }
  if (b->state == Residence::SwappingOut) m.cancel_swap_out_locked(*b);
  b->swappable = false;
  b->host_valid = false;  // code outside the hooks may write it from now on
  b->untouched = false;
  m.settle_locked(*b);
  if (b->state == Residence::SwappingIn) {
    if (std::exception_ptr error = m.host_wait_pinned(lock, base, b->in_done))
      std::rethrow_exception(error);
  }
}

void Swapper::record_stream(const void* ptr, Stream stream) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  SwapBlock* b = m.lookup_locked(ptr, "record_stream");
  if (b == nullptr) return;
  if (std::find(b->use_streams.begin(), b->use_streams.end(), stream) == b->use_streams.end())
    b->use_streams.push_back(stream);
}

void Swapper::forget_stream(Stream stream) {
  Impl& m = *impl_;
  m.dev.synchronize(stream);
  std::lock_guard lock(m.mu);
  for (auto& [base, b] : m.blocks) std::erase(b.use_streams, stream);
  for (auto& [id, st] : m.scopes) st.stream_ids.erase(reinterpret_cast<std::uintptr_t>(stream));
}

Residence Swapper::residence(const void* ptr) const {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  SwapBlock* b = m.find_tracked_locked(ptr);
  if (b == nullptr) return Residence::Resident;
  m.settle_locked(*b);
  return b->state;
}

Residence Swapper::settle(const void* ptr) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  SwapBlock* b = m.find_tracked_locked(ptr);
  if (b == nullptr) return Residence::Resident;
  m.settle_locked(*b);
  if (b->state == Residence::SwappingOut && !b->busy && m.dev.query(b->out_done))
    m.complete_swap_out_locked(*b);
  return b->state;
}

std::uint64_t Swapper::generation(const void* ptr) const {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  const SwapBlock* b = m.find_tracked_locked(ptr);
  return b == nullptr ? 0 : b->generation;
}

std::size_t Swapper::reap() {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  return m.reap_locked();
}

void Swapper::reap_freed() {
  Impl& m = *impl_;
  std::vector<Event> copies;
  {
    std::lock_guard lock(m.mu);
    for (const Impl::Zombie& z : m.zombies) copies.push_back(z.done);
  }
  // Events are recycled, never destroyed, while the swapper lives: one reaped and recorded
  // again meanwhile only makes the wait longer.
  for (Event e : copies) m.dev.synchronize(e);
  std::lock_guard lock(m.mu);
  m.reap_locked();
}

bool Swapper::swappable(const void* ptr) const {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  SwapBlock* b = m.find_tracked_locked(ptr);
  if (b != nullptr) return b->swappable;
  return !m.opt.opt_in && m.backend.find_block(ptr).has_value();
}

std::optional<Swapper::BlockUse> Swapper::use_of(const void* ptr) const {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  SwapBlock* b = m.find_tracked_locked(ptr);
  if (b == nullptr) return std::nullopt;
  m.settle_locked(*b);
  return BlockUse{b->state, b->swappable, b->pins, b->generation};
}

SwapStats Swapper::stats() const {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  // host_bytes is what is held now: the host buffers of blocks freed while a copy touched
  // them go once the copy has landed, even when no eviction, residence query or allocation
  // came since to reap them (before, they stayed counted after everything was freed).
  m.reap_zombies_locked();
  SwapStats s = m.stats;
  for (const auto& [base, b] : m.blocks) {
    if (b.pins > 0) s.pinned_bytes += b.size;
    if (!b.swappable) s.unswappable_bytes += b.size;
    if (b.state == Residence::SwappingOut) s.swapping_out_bytes += b.size;
  }
  return s;
}

std::string Swapper::residency_report() const {
  std::lock_guard lock(impl_->mu);
  return impl_->unevictable_report_locked();
}

LargeBlockObserver::Unevictable Swapper::unevictable() const {
  std::lock_guard lock(impl_->mu);
  LargeBlockObserver::Unevictable u;
  for (const auto& [base, b] : impl_->blocks) {
    if (b.state != Residence::Resident && b.state != Residence::SwappingIn) continue;
    if (b.pins > 0) u.pinned += b.size;
    else if (!b.swappable) u.unswappable += b.size;
  }
  u.host_refusal = impl_->host_refusal;
  return u;
}

std::string Swapper::Impl::unevictable_report_locked() const {
  struct Kind {
    const char* what;
    std::size_t bytes = 0, count = 0;
    std::string first;
  } kinds[2] = {{"pinned"}, {"not declared swappable"}};
  for (const auto& [base, b] : blocks) {
    if (b.state != Residence::Resident && b.state != Residence::SwappingIn) continue;
    const bool why[2] = {b.pins > 0, !b.swappable};
    for (int k = 0; k < 2; ++k) {
      if (!why[k]) continue;
      kinds[k].bytes += b.size;
      if (kinds[k].count++ < 4) {
        // The caller's name for it, when it gave one (the allocator's lock, after ours).
        const std::string name = backend.block_name(b.base);
        kinds[k].first += " " + format_address(b.base) + " (" + format_bytes(b.size) +
                          (name.empty() ? "" : ", \"" + name + "\"") + ")";
      }
    }
  }
  std::string out = "resident blocks the swapper cannot evict:";
  for (const Kind& k : kinds) {
    out += std::string(" ") + k.what + " " + format_bytes(k.bytes) + " in " +
           std::to_string(k.count) + " blocks" + (k.count ? ":" + k.first : "") +
           (k.count > 4 ? " ..." : "") + ";";
  }
  out.pop_back();
  return out;
}

graph::Trace Swapper::last_trace() const {
  std::lock_guard lock(impl_->mu);
  return impl_->last_trace_any;
}

graph::Trace Swapper::last_trace(std::uint64_t scope) const {
  std::lock_guard lock(impl_->mu);
  auto it = impl_->scopes.find(scope);
  return it == impl_->scopes.end() ? graph::Trace{} : it->second.last_trace;
}

void Swapper::set_budget(std::uint64_t bytes) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  m.opt.budget = bytes;
  for (auto& [id, st] : m.scopes) {
    st.replan = true;  // the plan was made for the old budget, and so were its variants'
    st.executing = false;
    st.variants.clear();
    st.keys.clear();
  }
}

void Swapper::quiesce() {
  Impl& m = *impl_;
  m.dev.synchronize(m.d2h);
  m.dev.synchronize(m.h2d);
  std::lock_guard lock(m.mu);
  m.reap_locked();
  for (auto& [base, b] : m.blocks) m.settle_locked(b);
}

void Swapper::begin_op(std::string_view name) { begin_op(name, impl_->current_scope()); }

void Swapper::begin_op(std::string_view name, std::uint64_t scope) {
  Impl& m = *impl_;
  m.set_current_scope(scope);
  std::unique_lock lock(m.mu);
  StepState& st = m.scope_locked(scope);
  st.auto_ops = false;
  std::vector<PlannedPrefetch> wanted = m.advance_op_locked(st, true);
  if (!name.empty() && st.recording) {
    if (st.trace.op_names.size() <= static_cast<std::size_t>(st.op))
      st.trace.op_names.resize(st.op + 1);
    st.trace.op_names[st.op] = std::string(name);
  }
  if (!wanted.empty()) m.prefetch_planned(lock, st, std::move(wanted));
}

void Swapper::begin_step() { begin_step(impl_->current_scope()); }

void Swapper::begin_step(std::uint64_t scope) {
  impl_->set_current_scope(scope);
  std::unique_lock lock(impl_->mu);
  StepState& st = impl_->scope_locked(scope);
  // A mark in the trace (address: the scope, bytes: the step's number from 1) and in NVTX,
  // so a timeline shows where each step begins.
  static const std::uint32_t step_tag = TraceRecorder::global().intern("step begins");
  if (auto named = impl_->scope_names.find(scope);
      named != impl_->scope_names.end() && TraceRecorder::global().enabled())
    TraceRecorder::global().record(EventKind::ScopeName, scope, 0, profiling::kHostStream,
                                   impl_->ordinal, TraceRecorder::global().intern(named->second));
  TraceRecorder::global().record(EventKind::Mark, scope, ++st.steps_begun, profiling::kHostStream,
                                 impl_->ordinal, step_tag);
  profiling::nvtx_mark("spill step begins", profiling::kNvtxStep);
  impl_->begin_step_locked(st);
  // What the plan has resident at the step's start but was moved out since the last step's
  // end (its own prefetches of the first ops were issued there): without this, each came
  // back on demand at its first pin, step after step, as nothing made the plan again.
  std::vector<PlannedPrefetch> wanted = impl_->moved_since_plan_locked(st);
  if (!wanted.empty()) impl_->prefetch_planned(lock, st, std::move(wanted));
}

void Swapper::set_scope(std::uint64_t scope) { impl_->set_current_scope(scope); }

void Swapper::set_scope_name(std::uint64_t scope, std::string_view name) {
  TraceRecorder& recorder = TraceRecorder::global();
  if (recorder.enabled()) {
    recorder.record(EventKind::ScopeName, scope, 0, profiling::kHostStream, impl_->ordinal,
                    name.empty() ? 0 : recorder.intern(name));
  }
  std::lock_guard lock(impl_->mu);
  if (name.empty()) impl_->scope_names.erase(scope);
  else impl_->scope_names[scope] = std::string(name);
}

std::string Swapper::scope_name(std::uint64_t scope) const {
  std::lock_guard lock(impl_->mu);
  auto it = impl_->scope_names.find(scope);
  return it == impl_->scope_names.end() ? std::string() : it->second;
}

void Swapper::set_step_key(std::uint64_t scope, std::uint64_t key) {
  // (The calling thread's current scope stays: a key for another scope, such as another
  // model's next step, must not take the thread's later pins there.)
  std::unique_lock lock(impl_->mu);
  StepState* found = impl_->find_scope_locked(scope);
  if (found == nullptr) return;  // no step begun, or the scope ended: nothing to follow
  if (impl_->variant_for_key_locked(*found, key) == found->variants.end()) {
    found->step_key = key;  // no plan to switch: nothing to wait for (the steady state)
    return;
  }
  // A switch replaces the plan, which threads issuing the scope's planned prefetches read
  // without the lock; the scope is looked up at each wake-up (end_scope may drop it meanwhile).
  impl_->cv.wait(lock, [&] {
    found = impl_->find_scope_locked(scope);
    return found == nullptr || found->users == 0;
  });
  if (found == nullptr) return;  // no step begun, or the scope ended: nothing to follow
  std::vector<PlannedPrefetch> wanted = impl_->set_step_key_locked(*found, key);
  if (!wanted.empty()) impl_->prefetch_planned(lock, *found, std::move(wanted));
}

void Swapper::end_step() { end_step(impl_->current_scope()); }

void Swapper::end_step(std::uint64_t scope) {
  impl_->set_current_scope(scope);
  std::unique_lock lock(impl_->mu);
  StepState* found = impl_->find_scope_locked(scope);
  if (found == nullptr) return;  // never begun, or ended
  StepState& st = *found;
  impl_->end_step_locked(st);
  // The next step repeats this one: bring back what its first ops need while the caller is
  // between steps (loading data, logging), instead of at its first pin.
  std::vector<PlannedPrefetch> wanted = impl_->next_step_prefetches_locked(st);
  if (!wanted.empty()) impl_->prefetch_planned(lock, st, std::move(wanted));
}

bool Swapper::end_scope(std::uint64_t scope) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  m.scope_names.erase(scope);
  // Threads issuing the scope's planned prefetches use its state without the lock.
  auto it = m.scopes.find(scope);
  m.cv.wait(lock, [&] {
    it = m.scopes.find(scope);
    return it == m.scopes.end() || it->second.users == 0;
  });
  if (it == m.scopes.end()) return false;
  m.release_marks_locked(it->second);
  m.scopes.erase(it);  // a step in progress is abandoned with it
  if (m.last_trace_any_scope == scope) m.last_trace_any = graph::Trace{};
  return true;
}

}  // namespace spill

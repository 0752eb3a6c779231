#include "profiling/events.hpp"

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#if defined(__x86_64__)
#include <x86intrin.h>
#endif
#include <unordered_map>

#include "core/errors.hpp"

namespace spill::profiling {
namespace {

// Bit 7 of the kind byte marks an event whose times are already nanoseconds of a TraceClock.
constexpr std::uint64_t kClockedBit = 0x80;

constexpr std::uint64_t pack_meta(EventKind kind, std::int32_t device, std::uint32_t tag) {
  return static_cast<std::uint64_t>(kind) | (static_cast<std::uint64_t>(device & 0xffffff) << 8) |
         (static_cast<std::uint64_t>(tag) << 32);
}

// The clock set by set_clock; replaced ones are kept (a racing reader may still hold one).
std::atomic<const TraceClock*> g_clock{nullptr};
std::mutex g_clock_mu;

std::atomic<std::uint32_t> next_recorder_id{1};

}  // namespace

// One thread's ring: written by its thread only, read by collect() under the recorder's mutex.
// Its words come zeroed from calloc, which maps a large ring's pages only as events reach them:
// a thread that records a few events costs a few KiB, not the whole ring (3.5 MiB by default;
// value-initialised atomics wrote every page at once).
struct TraceRecorder::Ring {
  static constexpr int kWords = 7;
  struct Free {
    void operator()(std::uint64_t* p) const { std::free(p); }
  };
  explicit Ring(std::size_t cap, std::uint32_t thread_no)
      : mask(cap - 1),
        words(static_cast<std::uint64_t*>(std::calloc(cap * kWords, sizeof(std::uint64_t)))),
        thread(thread_no) {
    if (!words) throw std::bad_alloc();
  }
  // Word k of the event in slot i (any i: the ring wraps).
  std::atomic_ref<std::uint64_t> word(std::uint64_t i, int k) const {
    return std::atomic_ref<std::uint64_t>(words[(i & mask) * kWords + k]);
  }
  std::uint64_t mask;
  std::unique_ptr<std::uint64_t[], Free> words;
  std::atomic<std::uint64_t> head{0};
  std::uint64_t tail = 0;  // consumer side
  std::uint32_t thread;
};

namespace {

// Live recorders by id, so that an exiting thread can hand its rings back to recorders that
// still exist. Never destroyed: threads exit after static destruction too.
std::mutex& recorders_mu() {
  static auto* mu = new std::mutex();
  return *mu;
}
std::unordered_map<std::uint32_t, TraceRecorder*>& recorders() {
  static auto* live = new std::unordered_map<std::uint32_t, TraceRecorder*>();
  return *live;
}

// Set when the thread's exit has begun: thread_local destructors that run later (a user's
// cache freeing its blocks) still record, through the recorder's lock instead of a ring.
thread_local bool t_exiting = false;
// Who the thread was, for those: its number and the next position in its (gone) ring.
thread_local std::uint32_t t_exit_recorder = 0, t_exit_thread = 0;
thread_local std::uint64_t t_exit_seq = 0;
thread_local std::uint32_t t_last_id = 0;
thread_local TraceRecorder::Ring* t_last_ring = nullptr;

// Each thread caches its ring per recorder; at exit it hands every ring back to its recorder.
struct ThreadRings {
  std::unordered_map<std::uint32_t, std::shared_ptr<TraceRecorder::Ring>> by_recorder;
  ~ThreadRings() {
    t_exiting = true;
    if (t_last_ring != nullptr) {
      t_exit_recorder = t_last_id;
      t_exit_thread = t_last_ring->thread;
      t_exit_seq = t_last_ring->head.load(std::memory_order_relaxed);
    }
    t_last_id = 0;
    t_last_ring = nullptr;
    std::lock_guard lock(recorders_mu());
    for (auto& [id, ring] : by_recorder) {
      auto it = recorders().find(id);
      if (it != recorders().end()) it->second->retire(*ring);
    }
  }
};
thread_local ThreadRings t_rings;

std::size_t round_pow2(std::size_t n) {
  std::size_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace

const char* to_string(EventKind kind) {
  static constexpr const char* names[kEventKindCount] = {
      "alloc", "free", "map", "unmap", "pin", "unpin", "swap_out",
      "swap_in", "prefetch", "evict", "stall", "oom", "mark", "host_alloc", "host_free", "name",
      "free_on_host", "scope_name"};
  int i = static_cast<int>(kind);
  return i >= 0 && i < kEventKindCount ? names[i] : "?";
}

// fork() copies a lock that another thread holds, and nobody unlocks it in the child: the
// child's exit (ThreadRings' destructor) or its first ring would wait for ever. So the
// forking thread holds them all across the fork; order: recorders_mu(), then each recorder's
// (retire's order); g_clock_mu is never held with the others.
void TraceRecorder::lock_for_fork() {
  g_clock_mu.lock();
  recorders_mu().lock();
  for (auto& [id, r] : recorders()) r->mu_.lock();
}
void TraceRecorder::unlock_after_fork() {
  for (auto& [id, r] : recorders()) r->mu_.unlock();
  recorders_mu().unlock();
  g_clock_mu.unlock();
}

void TraceRecorder::install_fork_handlers() {
  static std::once_flag once;
  std::call_once(once, [] { ::pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork); });
}

TraceRecorder::TraceRecorder(std::size_t ring_capacity)
    : ring_capacity_(round_pow2(std::max<std::size_t>(ring_capacity, 16))),
      id_(next_recorder_id.fetch_add(1)) {
  install_fork_handlers();
  calibrate();
  std::lock_guard lock(recorders_mu());
  recorders().emplace(id_, this);
}

TraceRecorder::~TraceRecorder() {
  std::lock_guard lock(recorders_mu());
  recorders().erase(id_);
}

TraceRecorder& TraceRecorder::global() {
  static TraceRecorder* recorder = new TraceRecorder();  // never destroyed: used at exit
  return *recorder;
}

namespace {

const std::chrono::steady_clock::time_point kEpoch = std::chrono::steady_clock::now();

std::uint64_t steady_ns() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - kEpoch)
          .count());
}

#if defined(__x86_64__)
// The TSC is a valid clock only when it ticks at a constant rate in every power state.
bool tsc_usable() {
  std::ifstream info("/proc/cpuinfo");
  std::string line;
  while (std::getline(info, line)) {
    if (line.rfind("flags", 0) == 0)
      return line.find(" constant_tsc") != std::string::npos &&
             line.find(" nonstop_tsc") != std::string::npos;
  }
  return false;
}
const bool kUseTsc = tsc_usable();
#else
const bool kUseTsc = false;
#endif

}  // namespace

void TraceRecorder::set_clock(TraceClock clock) {
  std::lock_guard lock(g_clock_mu);
  // Never freed, not even by static destruction: at process exit a runtime the C API leaves
  // alive still has stream threads that read the current clock (ThreadSanitizer saw them read
  // a destroyed one).
  static auto* kept = new std::vector<std::unique_ptr<TraceClock>>();
  kept->push_back(std::make_unique<TraceClock>(std::move(clock)));
  g_clock.store(kept->back().get(), std::memory_order_release);
}

void TraceRecorder::clear_clock(const void* ctx) {
  std::lock_guard lock(g_clock_mu);
  const TraceClock* c = g_clock.load(std::memory_order_acquire);
  if (c != nullptr && (ctx == nullptr || c->ctx == ctx))
    g_clock.store(nullptr, std::memory_order_release);
}

double TraceRecorder::clock_seconds() {
  if (const TraceClock* c = g_clock.load(std::memory_order_acquire))
    return static_cast<double>(c->now_ns(c->ctx)) * 1e-9;
  return static_cast<double>(steady_ns()) * 1e-9;
}

std::string TraceRecorder::clock_name() {
  const TraceClock* c = g_clock.load(std::memory_order_acquire);
  return c != nullptr ? c->name : "host steady clock";
}

std::uint64_t TraceRecorder::now() {
  if (const TraceClock* c = g_clock.load(std::memory_order_acquire)) return c->now_ns(c->ctx);
#if defined(__x86_64__)
  if (kUseTsc) return __rdtsc();
#endif
  return steady_ns();
}

void TraceRecorder::calibrate() {
  std::uint64_t t = now(), ns = steady_ns();
  if (!kUseTsc) {
    tick0_ = 0, ns0_ = 0, ns_per_tick_ = 1.0;
    return;
  }
  if (tick0_ == 0) {
    // First point, and a short spin for a usable initial rate.
    tick0_ = t, ns0_ = ns;
    while (steady_ns() - ns0_ < 2'000'000) {
    }
    t = now(), ns = steady_ns();
  }
  if (t > tick0_) ns_per_tick_ = static_cast<double>(ns - ns0_) / static_cast<double>(t - tick0_);
}

double TraceRecorder::to_ns(std::uint64_t ticks) const {
  if (!kUseTsc) return static_cast<double>(ticks);
  return static_cast<double>(ns0_) +
         (static_cast<double>(ticks) - static_cast<double>(tick0_)) * ns_per_tick_;
}

std::uint64_t TraceRecorder::now_ns() const { return steady_ns(); }

TraceRecorder::Ring* TraceRecorder::ring_for_this_thread() {
  if (t_last_id == id_) return t_last_ring;
  if (t_exiting) return nullptr;
  auto& slot = t_rings.by_recorder[id_];
  if (!slot) {
    std::lock_guard lock(mu_);
    slot = std::make_shared<Ring>(ring_capacity_, next_thread_++);
    rings_.push_back(slot);
  }
  t_last_id = id_;
  t_last_ring = slot.get();
  return slot.get();
}

void TraceRecorder::record_always(EventKind kind, std::uint64_t address, std::uint64_t bytes,
                                  std::uint64_t stream, std::int32_t device, std::uint32_t tag,
                                  std::uint64_t time, std::uint64_t duration) {
  const bool clocked = g_clock.load(std::memory_order_relaxed) != nullptr;
  const std::uint64_t meta = pack_meta(kind, device, tag) | (clocked ? kClockedBit : 0);
  Ring* r = ring_for_this_thread();
  if (r == nullptr) {
    // The thread is exiting and its ring is gone: rare, so the lock is fine.
    std::lock_guard lock(mu_);
    if (t_exit_recorder != id_) {  // its first event for this recorder
      t_exit_recorder = id_;
      t_exit_thread = next_thread_++;
      t_exit_seq = 0;
    }
    store_locked({{time, address, bytes, stream, meta, duration,
                   order_.fetch_add(1, std::memory_order_relaxed)},
                  t_exit_thread,
                  t_exit_seq++});
    return;
  }
  const std::uint64_t order = order_.fetch_add(1, std::memory_order_relaxed);
  std::uint64_t h = r->head.load(std::memory_order_relaxed);
  r->word(h, 0).store(time, std::memory_order_relaxed);
  r->word(h, 1).store(address, std::memory_order_relaxed);
  r->word(h, 2).store(bytes, std::memory_order_relaxed);
  r->word(h, 3).store(stream, std::memory_order_relaxed);
  r->word(h, 4).store(meta, std::memory_order_relaxed);
  r->word(h, 5).store(duration, std::memory_order_relaxed);
  r->word(h, 6).store(order, std::memory_order_relaxed);
  r->head.store(h + 1, std::memory_order_release);
}

void TraceRecorder::store_locked(const Stored& event) {
  if (exited_.size() >= ring_capacity_) {
    exited_.pop_front();
    dropped_.fetch_add(1, std::memory_order_relaxed);
  }
  exited_.push_back(event);
}

void TraceRecorder::retire(const Ring& ring) {
  std::lock_guard lock(mu_);
  // The ring's thread is the caller, at its exit: nobody writes the ring any more.
  const std::uint64_t head = ring.head.load(std::memory_order_acquire);
  const std::uint64_t oldest = head > ring_capacity_ ? head - ring_capacity_ : 0;
  const std::uint64_t start = std::max(ring.tail, oldest);
  if (start > ring.tail) dropped_.fetch_add(start - ring.tail, std::memory_order_relaxed);
  for (std::uint64_t i = start; i < head; ++i) {
    Stored e{{}, ring.thread, i};
    for (int k = 0; k < Ring::kWords; ++k) e.words[k] = ring.word(i, k).load(std::memory_order_relaxed);
    store_locked(e);
  }
  std::erase_if(rings_, [&ring](const std::shared_ptr<Ring>& r) { return r.get() == &ring; });
}

std::size_t TraceRecorder::ring_count() const {
  std::lock_guard lock(mu_);
  return rings_.size();
}

TraceEvent TraceRecorder::decode(const Stored& s) const {
  TraceEvent e;
  const std::uint64_t meta = s.words[4];
  const bool clocked = (meta & kClockedBit) != 0;
  e.time_ns = clocked ? s.words[0] : static_cast<std::uint64_t>(std::max(0.0, to_ns(s.words[0])));
  e.address = s.words[1];
  e.bytes = s.words[2];
  e.stream = s.words[3];
  e.kind = static_cast<EventKind>(meta & 0x7f);
  std::int32_t dev = static_cast<std::int32_t>((meta >> 8) & 0xffffff);
  e.device = (dev & 0x800000) ? dev - 0x1000000 : dev;
  e.tag = static_cast<std::uint32_t>(meta >> 32);
  const std::uint64_t dur = s.words[5];
  e.duration_ns = kUseTsc && !clocked
                      ? static_cast<std::uint64_t>(static_cast<double>(dur) * ns_per_tick_)
                      : dur;
  e.thread = s.thread;
  e.order = s.words[6];
  return e;
}

std::vector<TraceEvent> TraceRecorder::collect() { return drain(true, nullptr); }

std::vector<TraceEvent> TraceRecorder::peek(Mark* mark) {
  if (mark != nullptr) {
    mark->threads.clear();
    mark->lost = 0;
  }
  return drain(false, mark);
}

void TraceRecorder::take(const Mark& mark) {
  std::lock_guard lock(mu_);
  auto seen = [&mark](std::uint32_t thread) -> const Mark::Seen* {
    auto it = mark.threads.find(thread);
    return it != mark.threads.end() ? &it->second : nullptr;
  };
  // Events of threads that exited since the peek are in the store now, by position.
  std::erase_if(exited_, [&](const Stored& e) {
    const Mark::Seen* s = seen(e.thread);
    return s != nullptr && e.seq < s->end;
  });
  for (auto& ring : rings_) {
    const Mark::Seen* s = seen(ring->thread);
    if (s == nullptr || s->end <= ring->tail) continue;
    if (s->valid_from > ring->tail)
      dropped_.fetch_add(s->valid_from - ring->tail, std::memory_order_relaxed);
    ring->tail = s->end;
  }
}

std::vector<TraceEvent> TraceRecorder::drain(bool take, Mark* mark) {
  std::vector<TraceEvent> out;
  std::lock_guard lock(mu_);
  calibrate();
  const std::uint64_t cap = ring_capacity_;
  for (const Stored& s : exited_) {
    out.push_back(decode(s));
    if (mark != nullptr) {
      auto it = mark->threads.try_emplace(s.thread, Mark::Seen{s.seq, s.seq + 1}).first;
      it->second.end = std::max(it->second.end, s.seq + 1);
    }
  }
  if (take) exited_ = {};
  for (auto& ring : rings_) {
    Ring& r = *ring;
    std::uint64_t head = r.head.load(std::memory_order_acquire);
    std::uint64_t start = std::max(r.tail, head > cap ? head - cap : 0);
    std::size_t first = out.size();
    for (std::uint64_t i = start; i < head; ++i) {
      Stored s{{}, r.thread, i};
      for (int k = 0; k < Ring::kWords; ++k) s.words[k] = r.word(i, k).load(std::memory_order_relaxed);
      out.push_back(decode(s));
    }
    // Slots the producer may have overwritten while we read them are discarded.
    std::uint64_t after = r.head.load(std::memory_order_acquire);
    std::uint64_t valid_from = after > cap ? after - cap : 0;
    std::uint64_t lost = start - r.tail;
    if (valid_from > start) {
      std::uint64_t bad = std::min(valid_from, head) - start;
      out.erase(out.begin() + static_cast<std::ptrdiff_t>(first),
                out.begin() + static_cast<std::ptrdiff_t>(first + bad));
      lost += bad;
    }
    if (mark != nullptr) {
      mark->threads[r.thread] = {r.tail + lost, head};
      mark->lost += lost;
    }
    if (!take) continue;
    if (lost) dropped_.fetch_add(lost, std::memory_order_relaxed);
    r.tail = head;
  }
  // By time, and events of equal times (the simulated device's host clock moves in steps:
  // many events share a value) in the order they were recorded, whatever their threads: by
  // thread, a free on a thread that had exited (a backward's) came before the allocation on
  // another thread at the same time, and `spill report` refused the trace.
  std::sort(out.begin(), out.end(), [](const TraceEvent& a, const TraceEvent& b) {
    return a.time_ns != b.time_ns ? a.time_ns < b.time_ns : a.order < b.order;
  });
  return out;
}

std::uint32_t TraceRecorder::intern(std::string_view name) {
  if (name.empty()) return 0;
  std::string text(name);
  std::lock_guard lock(mu_);
  // By a hash: block names make thousands of tags (a scan per name was quadratic).
  auto [it, fresh] = tag_ids_.emplace(std::move(text), static_cast<std::uint32_t>(tags_.size()));
  if (fresh) {
    try {
      tags_.push_back(it->first);
    } catch (...) {
      tag_ids_.erase(it);
      throw;
    }
  }
  return it->second;
}

std::string TraceRecorder::tag_name(std::uint32_t tag) const {
  std::lock_guard lock(mu_);
  SPILL_EXPECTS(tag < tags_.size(), "tag_name: unknown tag " + std::to_string(tag));
  return tags_[tag];
}

}  // namespace spill::profiling

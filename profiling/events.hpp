// Trace events: the record every layer emits (alloc, free, map, pin, swap, stall, OOM, ...)
// and a cheap recorder. Each thread writes into its own bounded ring without locks (relaxed
// atomic words, so concurrent collection is race-free); when a ring is full the oldest events
// are overwritten and counted as dropped. Recording can be switched off at the cost of one
// relaxed load per call.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace spill::profiling {

// Alloc/Free: a block handed out / returned by an allocator. Map/Unmap: physical device memory
// mapped / unmapped (the budget's bytes). HostAlloc/HostFree: pinned host memory taken / given
// back. SwapOut/SwapIn: a block's bytes moved to / from the host (duration = the copy).
// Pin/Unpin, Prefetch/Evict: the swapper's protocol and hints. Stall: time a stream or the host
// waited for a swap-in (duration). Oom: a failed request (bytes: the request, saturated at
// 2^63 - 1; address: the bytes still free under the budget then, which memory snapshots give
// as "device_free").
// Mark: a user annotation (tag). Name: a block was named (address: the block, bytes: its size,
// tag: the name; tag 0: its name was cleared); the name holds until the block's Free.
// FreeOnHost: a block freed while its bytes were on the host (swapped out): they are dropped there
// (bytes: its size), just before its Free. A trace that begins after the block's eviction sees
// its bytes leave the host here (no swap_in ever comes). ScopeName: a step scope's name
// (address: the scope, tag: its name; tag 0: cleared), recorded when it is named and again
// just before each of its steps' marks, so that a trace whose start was dropped still has it.
enum class EventKind : std::uint8_t {
  Alloc, Free, Map, Unmap, Pin, Unpin, SwapOut, SwapIn, Prefetch, Evict, Stall, Oom, Mark,
  HostAlloc, HostFree, Name, FreeOnHost, ScopeName,
};
inline constexpr int kEventKindCount = static_cast<int>(EventKind::ScopeName) + 1;

const char* to_string(EventKind kind);

// The `stream` of events that happen on the host rather than on a device stream (the host
// waiting for swap-outs, for instance).
inline constexpr std::uint64_t kHostStream = ~std::uint64_t{0};

// Where event times come from when not from the host's steady clock: a simulated device's
// clock (SimDevice::trace_now_ns), set by the runtime that drives it. `now_ns(ctx)` gives the
// calling thread's time on that clock in nanoseconds; `name` says which clock it is in traces.
struct TraceClock {
  std::uint64_t (*now_ns)(const void* ctx) = nullptr;
  const void* ctx = nullptr;
  std::string name;
};

struct TraceEvent {
  std::uint64_t time_ns = 0;  // on the recorder's clock (TraceRecorder::clock_name); span start
  std::uint64_t duration_ns = 0;  // 0 for instant events
  EventKind kind = EventKind::Mark;
  std::uint64_t address = 0;
  std::uint64_t bytes = 0;
  std::uint64_t stream = 0;   // the stream handle's value, 0 for the default stream
  std::int32_t device = 0;
  std::uint32_t tag = 0;      // an interned string (op name, reason), 0 for none
  std::uint32_t thread = 0;   // recorder-assigned thread number
  std::uint64_t order = 0;    // when it was recorded among all threads' events (ties of time)
};

class TraceRecorder {
 public:
  explicit TraceRecorder(std::size_t ring_capacity = 1u << 16);
  ~TraceRecorder();
  TraceRecorder(const TraceRecorder&) = delete;
  TraceRecorder& operator=(const TraceRecorder&) = delete;

  // The process-wide recorder that spill's layers emit to.
  static TraceRecorder& global();

  // Registers fork handlers that hold every recorder's locks across fork(), so that a child
  // never inherits one another thread held (it hung in exit(), retiring its thread's ring).
  // Idempotent. Their prepare takes the recorders' locks, so a layer whose own prepare
  // handler takes a lock that is held while recording (the C API's) must call this before
  // it registers its handler: prepare handlers run in reverse order of registration.
  static void install_fork_handlers();

  void set_enabled(bool on) { enabled_.store(on, std::memory_order_relaxed); }
  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }

  void record(EventKind kind, std::uint64_t address, std::uint64_t bytes,
              std::uint64_t stream = 0, std::int32_t device = 0, std::uint32_t tag = 0) {
    if (!enabled()) return;
    record_always(kind, address, bytes, stream, device, tag, now(), 0);
  }
  // A span that started at `start` (a value of now()) and lasts until now.
  void record_span(EventKind kind, std::uint64_t start, std::uint64_t address,
                   std::uint64_t bytes, std::uint64_t stream = 0, std::int32_t device = 0,
                   std::uint32_t tag = 0) {
    if (!enabled()) return;
    std::uint64_t end = now();
    record_always(kind, address, bytes, stream, device, tag, start, end > start ? end - start : 0);
  }
  // `time` and `duration` are in now()'s ticks; collect() converts them to nanoseconds.
  void record_always(EventKind kind, std::uint64_t address, std::uint64_t bytes,
                     std::uint64_t stream, std::int32_t device, std::uint32_t tag,
                     std::uint64_t time, std::uint64_t duration);

  // Where a peek() ended in each thread's events: take(mark) then takes exactly what it saw.
  struct Mark {
    struct Seen {
      std::uint64_t valid_from;  // the thread's first event the peek could still read
      std::uint64_t end;         // one past its last
    };
    std::unordered_map<std::uint32_t, Seen> threads;  // by thread number
    // Events the peek found lost to full rings (overwritten before it read them): what
    // take(mark) adds to dropped(), so an export can say so before it takes.
    std::uint64_t lost = 0;
  };

  // Takes every event recorded since the last collect, from all threads, ordered by time.
  std::vector<TraceEvent> collect();
  // A copy of every event not yet taken, without taking them (for OOM dumps). With `mark`,
  // also where it ended, so that a caller can take them once it has stored them (an export
  // whose write fails keeps them).
  std::vector<TraceEvent> peek(Mark* mark = nullptr);
  // Takes the events a peek(&mark) saw (events recorded since stay), counting those lost to
  // full rings before it as dropped.
  void take(const Mark& mark);
  // Events lost to full rings (or a full store of exited threads' events) so far.
  std::uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }
  // Per-thread rings alive: one per live thread that has recorded (exited threads' are freed).
  std::size_t ring_count() const;

  // Interns `name` as a tag (0 is reserved for "no tag"); thread-safe, stable ids. Each
  // distinct name is kept for the recorder's life (block names included: a program that names
  // blocks with ever new names grows the table).
  std::uint32_t intern(std::string_view name);
  std::string tag_name(std::uint32_t tag) const;

  // A cheap timestamp in ticks (the invariant TSC on x86, else steady-clock nanoseconds);
  // collect() turns ticks into nanoseconds since the recorder's epoch. While a TraceClock is
  // set, it is that clock's nanoseconds instead (and collect() keeps them as they are).
  static std::uint64_t now();
  // Nanoseconds on the host's steady clock since the recorder's epoch (for measuring host
  // work; event times follow the TraceClock when one is set).
  std::uint64_t now_ns() const;

  // Puts every recorder's event times on `clock` (process-wide, like now()). The clock's
  // context must stay valid until clear_clock(); set it before recording starts, clear it
  // after the last event of that device. The trace then says so (clock_name()).
  static void set_clock(TraceClock clock);
  // Back to the host's steady clock, if `ctx` is the clock's context (or always for nullptr).
  static void clear_clock(const void* ctx = nullptr);
  // "host steady clock", or the name of the clock set.
  static std::string clock_name();
  // Seconds on the trace's clock: the TraceClock's (simulated time on SimDevice) when one is
  // set, else the host's steady clock. For durations the run reports (e.g. stalls).
  static double clock_seconds();

  struct Ring;
  // Called at the exit of the thread that owns `ring`: moves its unread events to the store of
  // exited threads' events and frees the ring.
  void retire(const Ring& ring);

 private:
  // An event as the ring holds it (the words) and the thread that recorded it.
  struct Stored {
    std::uint64_t words[7];  // the ring's words: time ... duration, then the order
    std::uint32_t thread;
    std::uint64_t seq;  // its position in its thread's ring (what a Mark counts)
  };

  // Null once the calling thread's exit has begun (its ring is gone).
  Ring* ring_for_this_thread();
  static void lock_for_fork();      // pthread_atfork's prepare
  static void unlock_after_fork();  // its parent and child handlers
  void store_locked(const Stored& event);
  TraceEvent decode(const Stored& event) const;
  std::vector<TraceEvent> drain(bool take, Mark* mark);

  std::atomic<bool> enabled_{true};
  std::size_t ring_capacity_;
  std::uint32_t id_;  // distinguishes recorders in thread-local caches
  mutable std::mutex mu_;
  std::vector<std::shared_ptr<Ring>> rings_;
  // Unread events of exited threads, oldest first, at most ring_capacity_ of them.
  std::deque<Stored> exited_;
  std::vector<std::string> tags_{""};
  std::unordered_map<std::string, std::uint32_t> tag_ids_;  // tags_ by name (not "")
  std::atomic<std::uint64_t> dropped_{0};
  std::atomic<std::uint64_t> order_{0};  // the next event's TraceEvent::order
  std::uint32_t next_thread_ = 0;
  // Tick-to-nanosecond calibration: two (ticks, steady ns) points, refined at every collect.
  std::uint64_t tick0_ = 0, ns0_ = 0;
  double ns_per_tick_ = 1.0;
  double to_ns(std::uint64_t ticks) const;
  void calibrate();
};

}  // namespace spill::profiling

#include <gtest/gtest.h>

#include <unistd.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <fstream>
#include <set>
#include <thread>
#include <vector>

#include "profiling/events.hpp"

namespace spill::profiling {
namespace {

TEST(TraceRecorder, RecordsAndCollectsInTimeOrder) {
  TraceRecorder rec(1024);
  std::uint32_t tag = rec.intern("conv1");
  rec.record(EventKind::Alloc, 0x1000, 4096, 7, 0, tag);
  rec.record(EventKind::Free, 0x1000, 4096, 7, 0, tag);
  auto events = rec.collect();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].kind, EventKind::Alloc);
  EXPECT_EQ(events[1].kind, EventKind::Free);
  EXPECT_EQ(events[0].address, 0x1000u);
  EXPECT_EQ(events[0].bytes, 4096u);
  EXPECT_EQ(events[0].stream, 7u);
  EXPECT_EQ(rec.tag_name(events[0].tag), "conv1");
  EXPECT_LE(events[0].time_ns, events[1].time_ns);
  EXPECT_TRUE(rec.collect().empty()) << "collect drains";
}

TEST(TraceRecorder, NegativeDevicesAndLargeTagsSurvivePacking) {
  TraceRecorder rec(64);
  rec.record(EventKind::Oom, 1, 2, 3, -1, 0xFFFFFFF0u);
  auto e = rec.collect();
  ASSERT_EQ(e.size(), 1u);
  EXPECT_EQ(e[0].device, -1);
  EXPECT_EQ(e[0].tag, 0xFFFFFFF0u);
  EXPECT_EQ(e[0].kind, EventKind::Oom);
}

TEST(TraceRecorder, DisabledRecordsNothing) {
  TraceRecorder rec(64);
  rec.set_enabled(false);
  rec.record(EventKind::Pin, 1, 1);
  EXPECT_TRUE(rec.collect().empty());
  rec.set_enabled(true);
  rec.record(EventKind::Pin, 1, 1);
  EXPECT_EQ(rec.collect().size(), 1u);
}

TEST(TraceRecorder, FullRingKeepsTheNewestAndCountsDrops) {
  TraceRecorder rec(16);
  for (std::uint64_t i = 0; i < 40; ++i) rec.record(EventKind::Mark, i, 0);
  auto events = rec.collect();
  ASSERT_EQ(events.size(), 16u);
  EXPECT_EQ(events.front().address, 24u);
  EXPECT_EQ(events.back().address, 39u);
  EXPECT_EQ(rec.dropped(), 24u);
}

TEST(TraceRecorder, APeekSaysHowManyEventsTheTakeWillCountAsDropped) {
  // An export writes its file between the peek and the take: the mark says how many events
  // the full ring lost, so that the file can say so (audit 31b #2).
  TraceRecorder rec(16);
  for (std::uint64_t i = 0; i < 40; ++i) rec.record(EventKind::Alloc, i, 1);
  TraceRecorder::Mark mark;
  EXPECT_EQ(rec.peek(&mark).size(), 16u);
  EXPECT_EQ(mark.lost, 24u);
  EXPECT_EQ(rec.dropped(), 0u) << "counted by the take";
  rec.take(mark);
  EXPECT_EQ(rec.dropped(), 24u);
  rec.record(EventKind::Alloc, 99, 1);
  rec.peek(&mark);
  EXPECT_EQ(mark.lost, 0u) << "nothing lost since";
}

TEST(TraceRecorder, ManyThreadsRecordWithoutLoss) {
  TraceRecorder rec(1 << 14);
  const int threads = 8, per_thread = 5000;
  // The writers stay alive until the last collect: an exited thread's events go to a store of
  // one ring's capacity for all exited threads (ExitedThreadsFreeTheirRings...).
  std::atomic<int> done{0};
  std::atomic<bool> release{false};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i)
        rec.record(EventKind::Alloc, static_cast<std::uint64_t>(t) << 32 | i, 1);
      ++done;
      while (!release) std::this_thread::yield();
    });
  }
  // Collect concurrently with the writers; nothing may be lost or duplicated.
  std::vector<TraceEvent> all;
  for (int k = 0; k < 20; ++k) {
    auto part = rec.collect();
    all.insert(all.end(), part.begin(), part.end());
  }
  while (done < threads) std::this_thread::yield();
  auto rest = rec.collect();
  all.insert(all.end(), rest.begin(), rest.end());
  release = true;
  for (auto& th : pool) th.join();
  std::set<std::uint64_t> seen;
  for (const TraceEvent& e : all) seen.insert(e.address);
  EXPECT_EQ(rec.dropped(), 0u);
  EXPECT_EQ(all.size(), static_cast<std::size_t>(threads * per_thread));
  EXPECT_EQ(seen.size(), all.size());
}

TEST(TraceRecorder, ExitedThreadsFreeTheirRingsAndKeepTheirNewestEvents) {
  TraceRecorder rec(64);
  const int threads = 50;  // 100 events: more than the store of exited threads' events holds
  for (int t = 0; t < threads; ++t) {
    std::thread([&rec, t] {
      rec.record(EventKind::Alloc, static_cast<std::uint64_t>(t), 1);
      rec.record(EventKind::Free, static_cast<std::uint64_t>(t), 1);
    }).join();
    EXPECT_EQ(rec.ring_count(), 0u) << "thread " << t << " has exited; its ring must be freed";
  }
  auto events = rec.collect();
  ASSERT_EQ(events.size(), 64u) << "the store keeps one ring's capacity";
  EXPECT_EQ(rec.dropped(), 36u) << "the oldest events were dropped, and counted";
  EXPECT_EQ(events.front().address, 18u);
  EXPECT_EQ(events.back().address, static_cast<std::uint64_t>(threads - 1));
  EXPECT_EQ(events.back().kind, EventKind::Free);
  EXPECT_TRUE(rec.collect().empty()) << "collect drains the store too";
}

// The process's resident memory, from /proc/self/statm (0 where that file is missing).
std::uint64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::uint64_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<std::uint64_t>(sysconf(_SC_PAGESIZE));
}

TEST(TraceRecorder, AThreadThatRecordsAFewEventsCostsAFewPagesNotItsWholeRing) {
  if (resident_bytes() == 0) GTEST_SKIP() << "no /proc/self/statm";
  TraceRecorder rec;  // the default ring: 65536 events, 3 MiB each
  const int threads = 32;
  std::barrier all_recorded(threads + 1);
  std::barrier measured(threads + 1);
  std::vector<std::thread> pool;
  const std::uint64_t before = resident_bytes();
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      rec.record(EventKind::Alloc, 1, 1);
      all_recorded.arrive_and_wait();
      measured.arrive_and_wait();  // the ring lives until the thread exits
    });
  }
  all_recorded.arrive_and_wait();
  const std::uint64_t grown = resident_bytes() - std::min(before, resident_bytes());
  EXPECT_EQ(rec.ring_count(), static_cast<std::size_t>(threads));
  measured.arrive_and_wait();
  for (auto& thread : pool) thread.join();
  // Each live ring was 3 MiB of written memory (96 MiB for 32 threads); now a page or two each
  // (plus the threads' stacks, touched only as deep as they ran).
  EXPECT_LT(grown, 24u << 20) << "32 threads that recorded one event each grew the resident "
                                 "memory by " << grown / 1024 << " KiB";
  EXPECT_EQ(rec.collect().size(), static_cast<std::size_t>(threads));
}

// A thread_local whose destructor records after the thread's ring was handed back (a user's
// per-thread cache freeing its blocks at thread exit).
struct RecordsAtExit {
  TraceRecorder* rec = nullptr;
  ~RecordsAtExit() {
    if (rec != nullptr) rec->record(EventKind::Free, 0xE, 1);
  }
};
thread_local RecordsAtExit t_records_at_exit;

TEST(TraceRecorder, EventsRecordedDuringThreadExitAreKept) {
  TraceRecorder rec(64);
  std::thread([&rec] {
    t_records_at_exit.rec = &rec;  // constructed before the recorder's per-thread state
    rec.record(EventKind::Alloc, 0xE, 1);
  }).join();
  EXPECT_EQ(rec.ring_count(), 0u);
  auto events = rec.collect();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[1].kind, EventKind::Free);
  EXPECT_EQ(events[0].thread, events[1].thread) << "one thread, one number";
}

// An export writes what peek(&mark) gave, then take(mark) takes exactly that: events recorded
// meanwhile stay, also those of a thread that exited meanwhile (moved to the store).
TEST(TraceRecorder, TakeTakesWhatThePeekSawAndNothingElse) {
  TraceRecorder rec(64);
  std::atomic<int> step{0};
  std::thread other([&] {
    rec.record(EventKind::Alloc, 1, 1);
    step = 1;
    while (step != 2) std::this_thread::yield();
    rec.record(EventKind::Alloc, 2, 1);  // after the peek; the thread then exits
  });
  while (step != 1) std::this_thread::yield();
  rec.record(EventKind::Mark, 10, 0);
  TraceRecorder::Mark mark;
  ASSERT_EQ(rec.peek(&mark).size(), 2u);
  EXPECT_EQ(rec.peek().size(), 2u) << "a peek takes nothing";
  rec.record(EventKind::Mark, 11, 0);
  step = 2;
  other.join();
  rec.take(mark);
  auto rest = rec.collect();
  std::set<std::uint64_t> left;
  for (const TraceEvent& e : rest) left.insert(e.address);
  EXPECT_EQ(left, (std::set<std::uint64_t>{2, 11}));
  EXPECT_EQ(rec.dropped(), 0u);
}

TEST(TraceRecorder, InternIsStable) {
  TraceRecorder rec;
  EXPECT_EQ(rec.intern(""), 0u);
  std::uint32_t a = rec.intern("a"), b = rec.intern("b");
  EXPECT_NE(a, b);
  EXPECT_EQ(rec.intern("a"), a);
  EXPECT_EQ(rec.tag_name(b), "b");
  EXPECT_ANY_THROW(rec.tag_name(999));
}

TEST(EventKind, HasNames) {
  EXPECT_STREQ(to_string(EventKind::SwapOut), "swap_out");
  EXPECT_STREQ(to_string(EventKind::Mark), "mark");
}

}  // namespace
}  // namespace spill::profiling

namespace spill::profiling {
namespace {

TEST(TraceRecorder, SpansCarryTheirDuration) {
  TraceRecorder rec(64);
  std::uint64_t before_ns = rec.now_ns();
  std::uint64_t start = rec.now();
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  rec.record_span(EventKind::SwapOut, start, 0x2000, 1 << 20, 3);
  std::uint64_t after_ns = rec.now_ns();
  auto e = rec.collect();
  ASSERT_EQ(e.size(), 1u);
  // Timestamps come out in nanoseconds on the steady clock's scale (within calibration error).
  EXPECT_GE(e[0].time_ns + 200'000, before_ns);
  EXPECT_LE(e[0].time_ns, after_ns + 200'000);
  EXPECT_GE(e[0].duration_ns, 4'500'000u) << "a 5 ms sleep inside the span";
  EXPECT_LE(e[0].duration_ns, after_ns - before_ns + 200'000);
  EXPECT_EQ(e[0].kind, EventKind::SwapOut);
  EXPECT_STREQ(to_string(EventKind::HostFree), "host_free");
}

TEST(TraceRecorder, AClockPutsEventTimesOnItsTimeLine) {
  static std::atomic<std::uint64_t> fake_ns{1ull << 60};  // far beyond any steady time
  TraceRecorder rec(64);
  EXPECT_EQ(TraceRecorder::clock_name(), "host steady clock");
  TraceRecorder::set_clock(
      {[](const void*) { return fake_ns.load(); }, &fake_ns, "simulated (test)"});
  EXPECT_EQ(TraceRecorder::clock_name(), "simulated (test)");
  rec.record(EventKind::Alloc, 0x10, 4096);
  std::uint64_t start = TraceRecorder::now();
  fake_ns += 1'500;
  rec.record_span(EventKind::SwapOut, start, 0x10, 4096);
  TraceRecorder::clear_clock(&fake_ns);
  EXPECT_EQ(TraceRecorder::clock_name(), "host steady clock");
  rec.record(EventKind::Free, 0x10, 4096);
  auto events = rec.collect();
  ASSERT_EQ(events.size(), 3u);
  auto of = [&](EventKind k) {
    for (const TraceEvent& e : events)
      if (e.kind == k) return e;  // the clock bit does not leak into the kind
    ADD_FAILURE() << "no " << to_string(k);
    return TraceEvent{};
  };
  EXPECT_EQ(of(EventKind::Alloc).time_ns, 1ull << 60) << "the clock's ns, not ticks";
  EXPECT_EQ(of(EventKind::SwapOut).time_ns, 1ull << 60);
  EXPECT_EQ(of(EventKind::SwapOut).duration_ns, 1'500u);
  EXPECT_LT(of(EventKind::Free).time_ns, 1ull << 60) << "the steady clock again";
  TraceRecorder::clear_clock(&start);  // another context's clear changes nothing
  EXPECT_EQ(TraceRecorder::clock_name(), "host steady clock");
}

// On a clock that moves in steps (the simulated device's host clock), events of several threads
// share a time: they come out in the order they were recorded, whatever their threads. Before,
// by thread: the events of a thread that had exited came first, so a block's free there
// (a backward thread's) preceded its allocation on the thread that made it.
TEST(TraceRecorder, EventsOfEqualTimesKeepTheOrderTheyWereRecordedInAcrossThreads) {
  static std::atomic<std::uint64_t> fixed_ns{1000};
  TraceRecorder rec(64);
  TraceRecorder::set_clock({[](const void*) { return fixed_ns.load(); }, &fixed_ns, "stepped"});
  rec.record(EventKind::Alloc, 0x10, 4096);  // this thread
  std::thread([&rec] {
    rec.record(EventKind::Free, 0x10, 4096);  // another, which exits
    rec.record(EventKind::Alloc, 0x20, 4096);
  }).join();
  rec.record(EventKind::Free, 0x20, 4096);
  TraceRecorder::clear_clock(&fixed_ns);
  auto events = rec.collect();
  ASSERT_EQ(events.size(), 4u);
  const std::vector<std::pair<EventKind, std::uint64_t>> expected = {
      {EventKind::Alloc, 0x10}, {EventKind::Free, 0x10}, {EventKind::Alloc, 0x20},
      {EventKind::Free, 0x20}};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(events[i].kind, expected[i].first) << i;
    EXPECT_EQ(events[i].address, expected[i].second) << i;
    EXPECT_EQ(events[i].time_ns, 1000u) << i;
  }
}

}  // namespace
}  // namespace spill::profiling

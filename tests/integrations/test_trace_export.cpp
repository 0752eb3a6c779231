// spill_trace_export (what Python's spill.trace() calls) writes the events since the last
// export. Its metadata says what a reader cannot know from them (audit 31b, findings 1, 2 and
// 10): the counters when the first event happened (`baseline`), the events lost to full rings
// since the last export (`dropped_events`) and the budget, so that a trace exported mid-run
// replays to the runtime's own figures.
#include <gtest/gtest.h>
#include <spill/spill.h>
#include <unistd.h>

#include <cstdio>
#include <set>
#include <string>

#include "profiling/chrome_trace.hpp"
#include "profiling/counters.hpp"
#include "profiling/report.hpp"

namespace spill::profiling {
namespace {

constexpr std::size_t MiB = 1 << 20;

ParsedTrace export_trace() {
  char path[] = "/tmp/spill_trace_export_XXXXXX";
  const int fd = mkstemp(path);
  EXPECT_GE(fd, 0);
  close(fd);
  EXPECT_EQ(spill_trace_export(path), SPILL_OK) << spill_last_error();
  ParsedTrace t = read_chrome_trace(path);  // refuses an impossible trace
  std::remove(path);
  return t;
}

spill_stats stats() {
  spill_stats st{};
  st.struct_size = sizeof st;
  EXPECT_EQ(spill_get_stats(0, &st), SPILL_OK);
  return st;
}

// A swappable block that has been written (a fresh one is never evicted).
void* written_block(std::size_t bytes) {
  void* p = nullptr;
  EXPECT_EQ(spill_malloc(&p, bytes, 0, nullptr), SPILL_OK);
  EXPECT_EQ(spill_set_swappable(p, 1), SPILL_OK);
  spill_pin_token t{};
  EXPECT_EQ(spill_pin(p, nullptr, &t), SPILL_OK);
  EXPECT_EQ(spill_unpin(&t, nullptr, 1), SPILL_OK);
  return p;
}

// Evicts `p` and waits until it is on the host (its device memory given back).
void evict(void* p) {
  ASSERT_EQ(spill_evict(p), SPILL_OK);
  // The copy runs on spill's own stream: the residence query completes it once it has landed.
  spill_residence r = SPILL_SWAPPING_OUT;
  for (int i = 0; i < 5000 && r != SPILL_ON_HOST; ++i) {
    ASSERT_EQ(spill_get_residence(p, &r), SPILL_OK);
    if (r != SPILL_ON_HOST) usleep(1000);
  }
  ASSERT_EQ(r, SPILL_ON_HOST);
}

TEST(TraceExport, AMidRunExportReplaysToTheRuntimesStats) {
  ASSERT_EQ(spill_init("device:sim,sim_capacity:256MiB,budget:32MiB,swap_threshold:1MiB"), SPILL_OK);
  void* a = written_block(8 * MiB);
  void* b = written_block(4 * MiB);
  evict(a);
  export_trace();  // everything so far: the next export begins mid-run
  const spill_stats at_start = stats();
  ASSERT_GT(at_start.swapped_out_bytes, 0u);
  ASSERT_GT(at_start.host_pinned_bytes, 0u);

  void* c = written_block(6 * MiB);
  spill_pin_token t{};
  ASSERT_EQ(spill_pin(a, nullptr, &t), SPILL_OK);  // back from the host, evicted before the trace
  ASSERT_EQ(spill_unpin(&t, nullptr, 1), SPILL_OK);
  ASSERT_EQ(spill_free(b, 0, nullptr), SPILL_OK);
  evict(c);
  ASSERT_EQ(spill_stream_synchronize(0, nullptr), SPILL_OK);
  const ParsedTrace trace = export_trace();
  const spill_stats now = stats();

  ASSERT_TRUE(trace.has_baseline);
  EXPECT_EQ(trace.baseline.allocated, static_cast<std::int64_t>(at_start.allocated_bytes));
  EXPECT_EQ(trace.baseline.mapped, static_cast<std::int64_t>(at_start.reserved_bytes));
  EXPECT_EQ(trace.baseline.on_host, static_cast<std::int64_t>(at_start.swapped_out_bytes));
  EXPECT_EQ(trace.baseline.host_pinned, static_cast<std::int64_t>(at_start.host_pinned_bytes));
  EXPECT_EQ(trace.dropped_events, 0u);
  EXPECT_EQ(trace.budget_bytes, std::optional<std::uint64_t>(32 * MiB));

  // Replayed from its baseline, the trace ends at the runtime's figures.
  CounterReplay replay(trace.baseline);
  for (const TraceEvent& e : trace.events) replay.apply(e);
  EXPECT_EQ(replay.current().allocated, static_cast<std::int64_t>(now.allocated_bytes));
  EXPECT_EQ(replay.current().mapped, static_cast<std::int64_t>(now.reserved_bytes));
  EXPECT_EQ(replay.current().on_host, static_cast<std::int64_t>(now.swapped_out_bytes));
  EXPECT_EQ(replay.current().host_pinned, static_cast<std::int64_t>(now.host_pinned_bytes));

  // The report's peak counts what was there before: a, b and c were live together.
  const ReportSummary s = summarize(trace);
  EXPECT_EQ(s.peak.allocated, static_cast<std::int64_t>(at_start.allocated_bytes + 6 * MiB));
  EXPECT_GE(s.peak.mapped, static_cast<std::int64_t>(at_start.reserved_bytes));
  const std::string html = render_report(trace, "t.json");
  EXPECT_NE(html.find("begins mid-run"), std::string::npos);
  EXPECT_NE(html.find("budget 32.00 MiB"), std::string::npos);
  EXPECT_EQ(spill_free(a, 0, nullptr), SPILL_OK);
  EXPECT_EQ(spill_free(c, 0, nullptr), SPILL_OK);
  EXPECT_EQ(spill_shutdown(), SPILL_OK);
}

// A block evicted before the trace and freed in it: its bytes leave the host at its free (a
// `free_on_host` event before the `free`), so the trace begins with them on the host and ends
// without them. Before, the free of a block on the host said nothing of the host: the replay
// never saw its bytes leave, and the export's baseline left them out (0 on the host at the
// start, where 8 MiB were).
TEST(TraceExport, ABlockEvictedBeforeTheTraceAndFreedInItLeavesTheHost) {
  ASSERT_EQ(spill_init("device:sim,sim_capacity:256MiB,budget:32MiB,swap_threshold:1MiB"), SPILL_OK);
  void* a = written_block(8 * MiB);
  evict(a);
  ASSERT_EQ(spill_stream_synchronize(0, nullptr), SPILL_OK);
  export_trace();  // the next export begins with `a` on the host
  ASSERT_EQ(stats().swapped_out_bytes, 8 * MiB);
  void* b = written_block(2 * MiB);  // something before the free, to replay over
  ASSERT_EQ(spill_free(a, 0, nullptr), SPILL_OK);
  ASSERT_EQ(spill_stream_synchronize(0, nullptr), SPILL_OK);
  const ParsedTrace trace = export_trace();
  ASSERT_EQ(stats().swapped_out_bytes, 0u);
  ASSERT_TRUE(trace.has_baseline);
  EXPECT_EQ(trace.baseline.on_host, static_cast<std::int64_t>(8 * MiB));
  CounterReplay replay(trace.baseline);
  bool dropped = false;
  for (const TraceEvent& e : trace.events) {
    if (e.kind == EventKind::Free && e.address == reinterpret_cast<std::uintptr_t>(a)) {
      EXPECT_TRUE(dropped) << "free_on_host comes before the free";
      EXPECT_EQ(replay.current().on_host, 0) << "free_on_host took the bytes off the host";
    }
    replay.apply(e);
    if (e.kind == EventKind::FreeOnHost && e.address == reinterpret_cast<std::uintptr_t>(a))
      dropped = true;
  }
  EXPECT_TRUE(dropped);
  EXPECT_EQ(replay.current().on_host, 0);
  EXPECT_EQ(replay.peak().on_host, static_cast<std::int64_t>(8 * MiB));
  EXPECT_EQ(spill_free(b, 0, nullptr), SPILL_OK);
  EXPECT_EQ(spill_shutdown(), SPILL_OK);
}

// The swapper's and the host pool's events carry their device, as the allocator's do: before,
// pins, copies, evictions, step marks and pinned host chunks said device 0 whatever the device.
TEST(TraceExport, TheSwappersEventsCarryTheirDevice) {
  ASSERT_EQ(spill_init("device:sim,sim_capacity:256MiB,budget:32MiB,swap_threshold:1MiB"), SPILL_OK);
  export_trace();  // (the events of earlier tests)
  void* p = nullptr;
  ASSERT_EQ(spill_malloc(&p, 4 * MiB, 1, nullptr), SPILL_OK);
  ASSERT_EQ(spill_set_swappable(p, 1), SPILL_OK);
  ASSERT_EQ(spill_begin_step(1, 77), SPILL_OK);
  spill_pin_token t{};
  ASSERT_EQ(spill_pin(p, nullptr, &t), SPILL_OK);
  ASSERT_EQ(spill_unpin(&t, nullptr, 1), SPILL_OK);
  ASSERT_EQ(spill_end_step(1, 77), SPILL_OK);
  evict(p);
  ASSERT_EQ(spill_pin(p, nullptr, &t), SPILL_OK);  // back from the host
  ASSERT_EQ(spill_unpin(&t, nullptr, 0), SPILL_OK);
  ASSERT_EQ(spill_stream_synchronize(1, nullptr), SPILL_OK);
  const ParsedTrace trace = export_trace();
  std::set<EventKind> seen;
  for (const TraceEvent& e : trace.events) {
    if (e.kind == EventKind::HostAlloc) EXPECT_EQ(e.device, 1) << "device 1's pinned host chunk";
    if (e.kind == EventKind::HostAlloc) seen.insert(e.kind);
    const bool ours = e.address == reinterpret_cast<std::uintptr_t>(p) ||
                      (e.kind == EventKind::Mark && e.address == 77);
    if (!ours || e.kind == EventKind::Map || e.kind == EventKind::Unmap) continue;
    EXPECT_EQ(e.device, 1) << to_string(e.kind) << " of the device 1 block";
    seen.insert(e.kind);
  }
  for (EventKind k : {EventKind::HostAlloc, EventKind::Alloc, EventKind::Pin, EventKind::Unpin, EventKind::Evict,
                      EventKind::SwapOut, EventKind::SwapIn, EventKind::Mark})
    EXPECT_TRUE(seen.count(k)) << to_string(k) << " not in the trace";
  EXPECT_EQ(spill_free(p, 1, nullptr), SPILL_OK);
  EXPECT_EQ(spill_shutdown(), SPILL_OK);
}

// What spill_shutdown releases is traced (audit 31b #7): a trace exported after it replays to
// nothing allocated, mapped, on the host or pinned. Before, shutdown recorded no frees, unmaps
// or host frees, and such a trace ended with the blocks still live.
TEST(TraceExport, AShutdownIsTracedAsReleasingEverything) {
  ASSERT_EQ(spill_init("device:sim,sim_capacity:256MiB,budget:32MiB,swap_threshold:1MiB"), SPILL_OK);
  export_trace();  // (the events of earlier tests)
  void* a = written_block(8 * MiB);
  written_block(4 * MiB);
  void* small = nullptr;
  ASSERT_EQ(spill_malloc(&small, 4096, 0, nullptr), SPILL_OK);
  evict(a);
  ASSERT_EQ(spill_stream_synchronize(0, nullptr), SPILL_OK);
  ASSERT_GT(stats().host_pinned_bytes, 0u);
  ASSERT_EQ(spill_shutdown(), SPILL_OK);  // a, the 4 MiB block and `small` still allocated
  const ParsedTrace trace = export_trace();
  CounterReplay replay(trace.baseline);
  for (const TraceEvent& e : trace.events) replay.apply(e);
  EXPECT_EQ(replay.current(), MemoryCounters{}) << "allocated " << replay.current().allocated
                                                << ", mapped " << replay.current().mapped
                                                << ", on host " << replay.current().on_host
                                                << ", pinned " << replay.current().host_pinned;
  EXPECT_GT(replay.peak().allocated, static_cast<std::int64_t>(12 * MiB));
}

TEST(TraceExport, DroppedEventsAreCountedOnceAndTheTraceStillReads) {
  ASSERT_EQ(spill_init("device:sim,sim_capacity:256MiB,budget:32MiB"), SPILL_OK);
  void* keep = nullptr;
  ASSERT_EQ(spill_malloc(&keep, 4096, 0, nullptr), SPILL_OK);
  export_trace();
  // More alloc and free events than this thread's ring (65,536) holds.
  const int pairs = 40000;
  for (int i = 0; i < pairs; ++i) {
    void* p = nullptr;
    ASSERT_EQ(spill_malloc(&p, 4096, 0, nullptr), SPILL_OK);
    ASSERT_EQ(spill_free(p, 0, nullptr), SPILL_OK);
  }
  const ParsedTrace trace = export_trace();
  EXPECT_GE(trace.dropped_events, 2u * pairs - 65536u);
  EXPECT_FALSE(trace.complete());
  CounterReplay replay(trace.baseline);
  for (const TraceEvent& e : trace.events) replay.apply(e);
  EXPECT_EQ(replay.current().allocated, static_cast<std::int64_t>(stats().allocated_bytes));
  EXPECT_NE(render_report(trace, "t.json").find("events were lost"), std::string::npos);
  EXPECT_EQ(export_trace().dropped_events, 0u) << "each drop is told once";
  EXPECT_EQ(spill_free(keep, 0, nullptr), SPILL_OK);
  EXPECT_EQ(spill_shutdown(), SPILL_OK);
}

}  // namespace
}  // namespace spill::profiling

// memory_viz snapshots: the layout memory_viz reads, consistent sizes, history from events,
// and clear errors for bad files. tools/snapshot_to_pickle.py is exercised by a CTest.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "core/errors.hpp"
#include "profiling/snapshot.hpp"
#include "tests/file_size_limit.hpp"
#include "tests/hostile_helpers.hpp"
#include "tests/profiling/synthetic_trace.hpp"

namespace spill::profiling {
namespace {

MemoryState sample_state() {
  using S = SnapshotBlock::State;
  MemoryState m;
  m.segments.push_back({0x1000000, 8 << 20, 0x100, true,
                        {{0x1000000, 4 << 20, (4 << 20) - 100, S::Allocated, 1, false},
                         {0x1400000, 2 << 20, 2 << 20, S::Allocated, 2, true},
                         {0x1600000, 2 << 20, 0, S::Free, 0, false}}});
  m.segments.push_back({0x9000000, 2 << 20, 0, false,
                        {{0x9000000, 512, 500, S::PendingFree, 0, false},
                         {0x9000200, (2 << 20) - 512, 0, S::Free, 0, false}}});
  return m;
}

TEST(Snapshot, HasMemoryVizLayout) {
  nlohmann::json j = to_memory_viz(sample_state(), test::synthetic_step(), [](std::uint32_t t) {
    return "layer" + std::to_string(t);
  });
  ASSERT_EQ(j["segments"].size(), 2u);
  const auto& seg = j["segments"][0];
  for (const char* key : {"device", "address", "total_size", "allocated_size", "active_size",
                          "requested_size", "stream", "segment_type", "segment_pool_id",
                          "is_expandable", "frames", "blocks"})
    EXPECT_TRUE(seg.contains(key)) << key;
  EXPECT_EQ(seg["allocated_size"], 6u << 20);
  EXPECT_EQ(seg["segment_type"], "large");
  EXPECT_EQ(seg["blocks"][1]["frames"][0]["name"], "[on host]");
  EXPECT_EQ(seg["blocks"][0]["frames"][0]["name"], "layer1");
  EXPECT_EQ(j["segments"][1]["active_size"], 512u);
  EXPECT_EQ(j["segments"][1]["blocks"][0]["state"], "active_pending_free");
  // Every block tiles its segment.
  for (const auto& s : j["segments"]) {
    std::uint64_t at = s["address"], total = 0;
    for (const auto& b : s["blocks"]) {
      EXPECT_EQ(b["address"].get<std::uint64_t>(), at);
      at += b["size"].get<std::uint64_t>();
      total += b["size"].get<std::uint64_t>();
    }
    EXPECT_EQ(total, s["total_size"].get<std::uint64_t>());
  }
  const auto& trace = j["device_traces"][0];
  std::size_t allocs = 0, frees = 0;
  for (const auto& e : trace) {
    allocs += e["action"] == "alloc";
    frees += e["action"] == "free_completed";
  }
  EXPECT_EQ(allocs, 12u);
  EXPECT_EQ(frees, 12u);
}

// An out-of-memory entry carries what torch's memory_viz reads of it (`trace()` prints "N
// requested, M free in CUDA" from "size" and "device_free"; a missing key raised KeyError):
// the request, and the bytes the budget still had unmapped, which the allocator records as
// the event's address.
TEST(Snapshot, AnOutOfMemoryEntryGivesTheRequestAndWhatWasFree) {
  std::vector<TraceEvent> history = test::synthetic_step(2, 2);
  TraceEvent oom;
  oom.kind = EventKind::Oom;
  oom.address = 3 << 20;  // free under the budget
  oom.bytes = 64 << 20;   // requested
  oom.time_ns = history.back().time_ns + 1000;
  history.push_back(oom);
  nlohmann::json j = to_memory_viz(sample_state(), history);
  const auto& trace = j["device_traces"][0];
  ASSERT_FALSE(trace.empty());
  const auto& e = trace.back();
  EXPECT_EQ(e["action"], "oom");
  EXPECT_EQ(e["size"], 64u << 20);
  EXPECT_EQ(e["device_free"], 3u << 20);
  EXPECT_EQ(e["addr"], 0u) << "an out-of-memory has no address";
  for (const char* key : {"stream", "time_us", "frames"}) EXPECT_TRUE(e.contains(key)) << key;
}

// A named block: its name is its first frame and a "name" field; in the history a Name event
// names the block's alloc action after the fact and its frees, a cleared name (tag 0) ends it
// (the alloc action keeps the name it had), and a later block at the address starts unnamed.
TEST(Snapshot, NamedBlocksAndTheirHistoryCarryTheName) {
  using test::make_event;
  MemoryState m = sample_state();
  m.segments[0].blocks[1].name = "fc1.weight (param)";
  const std::vector<TraceEvent> history = {
      make_event(1000, EventKind::Alloc, 0x1400000, 2 << 20),
      make_event(2000, EventKind::Name, 0x1400000, 2 << 20, 0, 0, 7),
      make_event(3000, EventKind::Free, 0x1400000, 2 << 20),
      make_event(4000, EventKind::Alloc, 0x1400000, 2 << 20),
      make_event(5000, EventKind::Name, 0x1400000, 2 << 20, 0, 0, 7),
      make_event(6000, EventKind::Name, 0x1400000, 2 << 20, 0, 0, 0),
      make_event(7000, EventKind::Free, 0x1400000, 2 << 20),
      make_event(8000, EventKind::Alloc, 0x1400000, 2 << 20)};
  nlohmann::json j = to_memory_viz(m, history, [](std::uint32_t t) {
    return t == 7 ? std::string("fc1.weight (param)") : "tag" + std::to_string(t);
  });
  const auto& block = j["segments"][0]["blocks"][1];
  EXPECT_EQ(block["name"], "fc1.weight (param)");
  ASSERT_EQ(block["frames"].size(), 3u);  // the name, "[on host]", its tag
  EXPECT_EQ(block["frames"][0]["name"], "fc1.weight (param)");
  EXPECT_EQ(block["frames"][1]["name"], "[on host]");
  EXPECT_FALSE(j["segments"][0]["blocks"][0].contains("name"));
  const auto& trace = j["device_traces"][0];
  ASSERT_EQ(trace.size(), 7u);  // alloc, free_requested, free_completed, twice; an alloc
  auto named = [&](std::size_t i) {
    return !trace[i]["frames"].empty() && trace[i]["frames"][0]["name"] == "fc1.weight (param)";
  };
  for (std::size_t i : {0, 1, 2, 3}) EXPECT_TRUE(named(i)) << i << ": " << trace[i];
  for (std::size_t i : {4, 5, 6}) EXPECT_FALSE(named(i)) << i << ": " << trace[i];
  EXPECT_EQ(trace[3]["action"], "alloc");
}

// A block's swap out and back (Unmap and Map at an allocated block's address) are "swap_out"
// and "swap_in" actions, which memory_viz lists and does not replay; a segment's own mapping
// and release stay segment_alloc and segment_free. Before, a swap was a segment_free and a
// segment_alloc at the block: memory_viz's segment view, stepping back over the swap-in,
// dropped the segment of a block still allocated there (audit 31b #6).
TEST(Snapshot, SwapsAreTheirOwnActionsNotSegmentEvents) {
  using test::make_event;
  MemoryState m = sample_state();  // 0x1000000 and 0x1400000 allocated now
  const std::vector<TraceEvent> history = {
      make_event(500, EventKind::Unmap, 0x1000000, 4 << 20),  // allocated before the history
      make_event(600, EventKind::Map, 0x1000000, 4 << 20),
      make_event(700, EventKind::Map, 0x5000000, 2 << 20),    // a segment of its own
      make_event(800, EventKind::Alloc, 0x5000000, 2 << 20),
      make_event(900, EventKind::Unmap, 0x5000000, 2 << 20),  // swapped out
      make_event(1000, EventKind::Map, 0x5000000, 2 << 20),   // and back
      make_event(1100, EventKind::Free, 0x5000000, 2 << 20),
      make_event(1200, EventKind::Unmap, 0x5000000, 2 << 20),  // the segment released
      make_event(1300, EventKind::Free, 0x7000000, 2 << 20),   // allocated before, freed
      make_event(1400, EventKind::Unmap, 0x7000000, 2 << 20)};
  nlohmann::json j = to_memory_viz(m, history, {});
  std::vector<std::string> actions;
  for (const auto& a : j["device_traces"][0]) actions.push_back(a["action"]);
  const std::vector<std::string> expected = {
      "swap_out",      "swap_in",        "segment_alloc",  "alloc",        "swap_out",
      "swap_in",       "free_requested", "free_completed", "segment_free", "free_requested",
      "free_completed", "segment_free"};
  EXPECT_EQ(actions, expected);
}

TEST(Snapshot, RoundTripsAndConvertsToAPickle) {
  std::string path = ::testing::TempDir() + "spill_snapshot.json";
  write_snapshot(path, sample_state(), test::synthetic_step());
  nlohmann::json j = read_snapshot(path);
  EXPECT_EQ(j["segments"].size(), 2u);
  {
    std::ifstream in(path, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(text.back(), '\n') << "a snapshot ends with a newline (a log it joins goes on)";
  }
  std::remove(path.c_str());
}

// The snapshot was written in place (audit 37b, F1): a full disk destroyed the previous one.
TEST(Snapshot, AFailedWriteKeepsThePreviousFile) {
  const std::string dir = ::testing::TempDir() + "spill_snapshot_full_disk";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/s.json";
  std::ofstream(path) << "PRECIOUS\n";
  const std::string message = spill::test::with_a_full_disk(
      64, [&] { write_snapshot(path, sample_state(), test::synthetic_step()); });
  EXPECT_NE(message.find("writing '" + path + "' failed"), std::string::npos) << message;
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "PRECIOUS");
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir),
                          std::filesystem::directory_iterator()), 1)
      << "a temporary was left";
  std::filesystem::remove_all(dir);
}

TEST(Snapshot, BadFilesGetClearErrors) {
  std::string path = ::testing::TempDir() + "spill_bad_snapshot.json";
  std::string good = to_memory_viz(sample_state(), {}).dump();
  auto expect = [&](const std::string& text, const std::string& mention) {
    std::ofstream(path) << text;
    try {
      read_snapshot(path);
      FAIL() << "accepted " << text.substr(0, 40);
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(mention), std::string::npos) << e.what();
    }
  };
  expect(good.substr(0, good.size() - 10), "truncated");
  expect("{]", "not valid JSON");
  expect(R"({"segments": []})", "not a spill snapshot");
  expect(R"({"spill": {"format": "spill-snapshot", "version": 3}})", "version 3");
  std::remove(path.c_str());
  if (const char* out = std::getenv("SPILL_WRITE_SNAPSHOT"))
    write_snapshot(out, sample_state(), test::synthetic_step());
}

// The snapshot reader on mutated snapshots (issue 11): a snapshot or a clean error, never a
// crash; what reads is a spill snapshot of the supported version.
TEST(Snapshot, FuzzedFilesReadCleanly) {
  const std::string path = ::testing::TempDir() + "spill_fuzz_snapshot.json";
  const std::string good = to_memory_viz(sample_state(), test::synthetic_step(2, 2)).dump();
  spill::test::FuzzCounts n =
      spill::test::fuzz_reader({good}, 5, 2000, 3.0, [&](const std::string& text) {
        std::ofstream(path, std::ios::trunc | std::ios::binary) << text;
        nlohmann::json j = read_snapshot(path);
        EXPECT_EQ(j["spill"]["format"], "spill-snapshot");
      });
  std::remove(path.c_str());
  EXPECT_GT(n.accepted, 0);
  EXPECT_GT(n.rejected, 0);
}

}  // namespace
}  // namespace spill::profiling

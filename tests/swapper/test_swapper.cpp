// The swapper over a simple backend on SimDevice (chaos on where it matters): data survives at
// the same address, budgets hold, pinned blocks stay, clean blocks cost no copy, misuse gets
// clear errors, and nothing leaks.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

#include "core/pattern.hpp"
#include "core/units.hpp"
#include "device/sim_device.hpp"
#include "profiling/events.hpp"
#include "swapper/swapper.hpp"
#include "tests/swapper/test_backend.hpp"

namespace spill::test {
namespace {

struct Rig {
  explicit Rig(std::size_t budget, std::size_t host_cap = 1 * GiB, bool chaos = false,
               SwapPolicy policy = SwapPolicy::Lru, bool simulated_queries = false)
      : dev(SimOptions{.capacity = 512 * MiB,
                       .simulated_queries = simulated_queries,
                       .chaos_seed = chaos ? std::optional<std::uint64_t>(3) : std::nullopt,
                       .chaos_probability = 0.3,
                       .chaos_max_delay = std::chrono::microseconds(200)}),
        backend(dev, budget),
        host(dev, host_cap),
        swapper(dev, backend, host, options(policy, budget)) {
    backend.evict_hook = [this](std::size_t n) { return swapper.evict_bytes(n); };
    stream = dev.create_stream();
  }
  ~Rig() {
    dev.synchronize();
    dev.destroy_stream(stream);
  }
  static SwapperOptions options(SwapPolicy p, std::size_t budget) {
    SwapperOptions o;
    o.policy = p;
    o.budget = budget;
    o.chunk_bytes = 1 * MiB;
    return o;
  }

  // Writes the pattern of `seed` into the block through the pin protocol.
  void write(void* p, std::size_t n, std::uint64_t seed) {
    std::vector<unsigned char> in(n);
    fill_pattern(in.data(), n, seed);
    swapper.pin(p, stream);
    dev.copy_async(p, in.data(), n, CopyKind::HostToDevice, stream);
    swapper.unpin(p, stream, true);
    dev.synchronize(stream);  // `in` goes out of scope
  }
  bool holds(void* p, std::size_t n, std::uint64_t seed) {
    std::vector<unsigned char> out(n);
    swapper.pin(p, stream);
    dev.copy_async(out.data(), p, n, CopyKind::DeviceToHost, stream);
    swapper.unpin(p, stream, false);
    dev.synchronize(stream);
    return find_pattern_mismatch(out.data(), n, seed) == n;
  }

  SimDevice dev;
  TestBackend backend;
  TestHost host;
  Swapper swapper;
  Stream stream = nullptr;
};

TEST(Swapper, DataSurvivesSwappingAtTheSameAddress) {
  Rig r(4 * 4 * MiB);
  std::vector<void*> blocks;
  for (int i = 0; i < 8; ++i) {
    blocks.push_back(r.backend.allocate(4 * MiB));
    r.write(blocks.back(), 4 * MiB, 100 + i);
  }
  for (int round = 0; round < 2; ++round)
    for (int i = 0; i < 8; ++i) EXPECT_TRUE(r.holds(blocks[i], 4 * MiB, 100 + i)) << i;
  SwapStats s = r.swapper.stats();
  EXPECT_GT(s.swap_outs, 0u);
  EXPECT_GT(s.demand_fetches, 0u);
  EXPECT_EQ(s.bytes_out, s.swap_outs * 4 * MiB);
  EXPECT_LE(r.backend.peak_mapped(), r.backend.budget());
  for (void* b : blocks) {
    r.swapper.release(b, r.stream);
    r.dev.synchronize(r.stream);
    r.backend.free(b);
  }
  r.swapper.quiesce();
  EXPECT_EQ(r.host.in_use(), 0u);
  EXPECT_EQ(r.backend.mapped(), 0u);
}

TEST(Swapper, InteriorPointersAndNestedPins) {
  Rig r(2 * 4 * MiB);
  char* a = static_cast<char*>(r.backend.allocate(4 * MiB));
  r.write(a, 4 * MiB, 7);
  r.swapper.pin(a + 1000, r.stream);
  r.swapper.pin(a + 2 * MiB, r.stream);  // a view into the same block
  r.swapper.unpin(a + 2 * MiB, r.stream, false);
  // Still pinned once: it must not move.
  void* b = r.backend.allocate(4 * MiB);
  r.write(b, 4 * MiB, 8);
  void* c = r.backend.allocate(4 * MiB);  // evicts b, never the pinned a
  r.write(c, 4 * MiB, 9);
  EXPECT_EQ(r.swapper.residence(a), Residence::Resident);
  r.swapper.unpin(a + 1000, r.stream, false);
  EXPECT_TRUE(r.holds(a, 4 * MiB, 7));
  EXPECT_TRUE(r.holds(b, 4 * MiB, 8));
  EXPECT_TRUE(r.holds(c, 4 * MiB, 9));
  EXPECT_LE(r.backend.peak_mapped(), r.backend.budget());
}

TEST(Swapper, CleanBlocksAreEvictedWithoutACopy) {
  Rig r(2 * 4 * MiB);
  void* a = r.backend.allocate(4 * MiB);
  void* b = r.backend.allocate(4 * MiB);
  r.write(a, 4 * MiB, 1);
  r.write(b, 4 * MiB, 2);
  r.swapper.evict(a);  // dirty: copies
  r.swapper.quiesce();
  EXPECT_EQ(r.swapper.residence(a), Residence::OnHost);
  EXPECT_TRUE(r.holds(a, 4 * MiB, 1));  // back, read only: the host copy stays valid
  std::uint64_t outs = r.swapper.stats().swap_outs;
  r.swapper.evict(a);
  r.swapper.quiesce();
  EXPECT_EQ(r.swapper.residence(a), Residence::OnHost);
  EXPECT_EQ(r.swapper.stats().swap_outs, outs) << "a clean eviction copies nothing";
  EXPECT_EQ(r.swapper.stats().clean_evictions, 1u);
  EXPECT_TRUE(r.holds(a, 4 * MiB, 1));
  r.write(a, 4 * MiB, 3);  // written: the host copy is stale now
  r.swapper.evict(a);
  r.swapper.quiesce();
  EXPECT_EQ(r.swapper.stats().swap_outs, outs + 1);
  EXPECT_TRUE(r.holds(a, 4 * MiB, 3));
}

// An eviction's copy that has finished leaves the block SwappingOut, its device memory mapped,
// until spill looks: residence() leaves it so (the trainer's executor cancels such a swap-out
// instead of copying back); settle() (spill_get_residence) and reap() (spill_evict) complete
// it, so a block evicted between steps settles on the host.
TEST(Swapper, SettleAndReapCompleteAFinishedSwapOutThatResidenceLeaves) {
  Rig r(2 * 4 * MiB);
  void* a = r.backend.allocate(4 * MiB);
  void* b = r.backend.allocate(4 * MiB);
  r.write(a, 4 * MiB, 1);
  r.write(b, 4 * MiB, 2);
  r.swapper.evict(a);
  r.swapper.evict(b);
  r.dev.synchronize();  // both copies have finished
  EXPECT_EQ(r.swapper.residence(a), Residence::SwappingOut);
  EXPECT_EQ(r.backend.mapped(), 8 * MiB);
  EXPECT_EQ(r.swapper.settle(a), Residence::OnHost);
  EXPECT_EQ(r.backend.mapped(), 4 * MiB) << "settle gives the block's memory back";
  EXPECT_EQ(r.swapper.residence(b), Residence::SwappingOut);
  EXPECT_EQ(r.swapper.reap(), 4 * MiB);
  EXPECT_EQ(r.swapper.residence(b), Residence::OnHost);
  EXPECT_EQ(r.backend.mapped(), 0u);
  EXPECT_EQ(r.swapper.settle(b), Residence::OnHost);
  EXPECT_TRUE(r.holds(a, 4 * MiB, 1));
  EXPECT_TRUE(r.holds(b, 4 * MiB, 2));
}

TEST(Swapper, PrefetchLandsBeforeUse) {
  Rig r(3 * 4 * MiB);
  void* a = r.backend.allocate(4 * MiB);
  r.write(a, 4 * MiB, 5);
  r.swapper.evict(a);
  r.swapper.quiesce();
  r.swapper.prefetch(a);
  r.swapper.quiesce();
  EXPECT_TRUE(r.holds(a, 4 * MiB, 5));
  SwapStats s = r.swapper.stats();
  EXPECT_EQ(s.prefetches, 1u);
  EXPECT_EQ(s.prefetch_hits, 1u);
  EXPECT_EQ(s.demand_fetches, 0u);
}

// A host pin of a block on the host stalls from the pin until its bytes have landed, however
// the host learns of each copy it waits for. Here the room it needs is a swap-out the copy
// thread finished long ago on the wall clock: in wall-query mode the eviction hook's query
// finds it done and moves the host's simulated clock to its end without a wait. The pin still
// waited for it in simulated time (the host's clock was at its start), so the stall counts
// the swap-out and the swap-in, not the swap-in alone.
TEST(Swapper, AHostDemandFetchStallsForTheRoomItWaitedForHoweverItWasObserved) {
  constexpr std::size_t kBlock = 2 * MiB;
  Rig r(2 * kBlock);
  profiling::TraceRecorder::set_clock(
      {[](const void* d) { return static_cast<const SimDevice*>(d)->trace_now_ns(); }, &r.dev,
       "simulated (test)"});
  void* a = r.backend.allocate(kBlock);
  void* b = r.backend.allocate(kBlock);
  r.write(a, kBlock, 1);
  r.write(b, kBlock, 2);
  r.swapper.evict(b);
  r.swapper.quiesce();
  ASSERT_EQ(r.swapper.residence(b), Residence::OnHost);
  void* c = r.backend.allocate(kBlock);  // the budget is full: a and c
  r.write(c, kBlock, 3);
  r.swapper.evict(a);  // a's swap-out starts at the host's simulated time now
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // done on the wall clock
  const LinkModel& link = r.dev.options().link;
  const double chunks = double(kBlock / Rig::options(SwapPolicy::Lru, 0).chunk_bytes);
  const double copy_out = chunks * link.latency_us * 1e-6 + double(kBlock) / (link.d2h_gbps * 1e9);
  const double copy_in = chunks * link.latency_us * 1e-6 + double(kBlock) / (link.h2d_gbps * 1e9);
  const SwapStats before = r.swapper.stats();
  PinToken t = r.swapper.pin_for_host(b);  // needs a's room, then b's copy
  const SwapStats after = r.swapper.stats();
  EXPECT_EQ(after.demand_fetches, before.demand_fetches + 1);
  EXPECT_EQ(r.swapper.residence(a), Residence::OnHost);
  EXPECT_GE(after.stall_s - before.stall_s, 0.99 * (copy_out + copy_in));
  EXPECT_LE(after.stall_s - before.stall_s, 1.01 * (copy_out + copy_in));
  EXPECT_TRUE(find_pattern_mismatch(b, kBlock, 2) == kBlock);
  r.swapper.unpin(t, nullptr, false);
  EXPECT_TRUE(r.holds(a, kBlock, 1));
  profiling::TraceRecorder::clear_clock(&r.dev);
}

// A prefetch that waits for room waits for the swap-outs in flight in the order they were
// issued (the D2H stream's order): the first issued frees its room first. Here the first issued
// has the higher address, so waiting by address would wait for the second, i.e. for both
// copies. Simulated queries: a swap-out is done only once the host's simulated clock passed it.
TEST(Swapper, PrefetchWaitsForSwapOutsInTheOrderTheyWereIssued) {
  constexpr std::size_t kBlock = 4 * MiB;
  Rig r(3 * kBlock, 1 * GiB, false, SwapPolicy::Lru, true);
  void* d = r.backend.allocate(kBlock);
  r.write(d, kBlock, 7);
  r.swapper.evict(d);  // on the host once the blocks below need its room
  std::vector<void*> v;
  for (int i = 0; i < 3; ++i) v.push_back(r.backend.allocate(kBlock));
  std::sort(v.begin(), v.end());
  for (int i = 0; i < 3; ++i) r.write(v[i], kBlock, 10 + i);
  ASSERT_EQ(r.swapper.residence(d), Residence::OnHost);
  void* first = v[2];   // issued first, higher address
  void* second = v[0];  // issued second, lower address
  r.swapper.evict(first);
  r.swapper.evict(second);
  const SwapStats before = r.swapper.stats();
  const std::uint64_t t0 = r.dev.trace_now_ns();  // the host's simulated clock
  r.swapper.prefetch(d, /*wait_for_room=*/true);
  const double waited = double(r.dev.trace_now_ns() - t0) * 1e-9;
  const SwapStats after = r.swapper.stats();
  EXPECT_EQ(after.prefetches_skipped, before.prefetches_skipped);
  EXPECT_EQ(r.swapper.residence(first), Residence::OnHost) << "its room was the one waited for";
  EXPECT_EQ(r.swapper.residence(second), Residence::SwappingOut)
      << "the prefetch waited for the later swap-out too";
  // It waited for one copy, not two (the two take at least twice a block at the link's speed).
  const double one_copy = double(kBlock) / (r.dev.options().link.d2h_gbps * 1e9);
  EXPECT_GT(waited, 0.5 * one_copy);
  EXPECT_LT(waited, 1.5 * one_copy);
  EXPECT_TRUE(r.holds(d, kBlock, 7));
  EXPECT_TRUE(r.holds(first, kBlock, 12));
  EXPECT_TRUE(r.holds(second, kBlock, 10));
}

// It waits only for the room it lacks: part of the block's size may be free already. Here half
// of it is, and one swap-out frees the rest; it used to wait for swap-outs worth the whole
// block (both copies here), holding the host back for a copy it did not need.
TEST(Swapper, PrefetchWaitsOnlyForTheRoomItLacks) {
  constexpr std::size_t kBlock = 4 * MiB;
  Rig r(4 * kBlock, 1 * GiB, false, SwapPolicy::Lru, true);
  void* d = r.backend.allocate(2 * kBlock);
  r.write(d, 2 * kBlock, 7);
  r.swapper.evict(d);  // on the host once the blocks below need its room
  std::vector<void*> v;
  for (int i = 0; i < 3; ++i) v.push_back(r.backend.allocate(kBlock));
  for (int i = 0; i < 3; ++i) r.write(v[i], kBlock, 10 + i);
  ASSERT_EQ(r.swapper.residence(d), Residence::OnHost);
  ASSERT_EQ(r.backend.room(), kBlock) << "half the prefetch's room is free";
  r.swapper.evict(v[0]);
  r.swapper.evict(v[1]);
  const SwapStats before = r.swapper.stats();
  const std::uint64_t t0 = r.dev.trace_now_ns();  // the host's simulated clock
  r.swapper.prefetch(d, /*wait_for_room=*/true);
  const double waited = double(r.dev.trace_now_ns() - t0) * 1e-9;
  const SwapStats after = r.swapper.stats();
  EXPECT_EQ(after.prefetches - before.prefetches, 1u);
  EXPECT_EQ(after.prefetches_skipped, before.prefetches_skipped);
  EXPECT_EQ(r.swapper.residence(v[0]), Residence::OnHost);
  EXPECT_EQ(r.swapper.residence(v[1]), Residence::SwappingOut)
      << "the prefetch waited for a swap-out whose room it did not need";
  const double one_copy = double(kBlock) / (r.dev.options().link.d2h_gbps * 1e9);
  EXPECT_LT(waited, 1.5 * one_copy);
  EXPECT_TRUE(r.holds(d, 2 * kBlock, 7));
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(r.holds(v[i], kBlock, 10 + i)) << "block " << i;
}

TEST(Swapper, PinnedWorkingSetOverTheBudgetNamesTheBlocks) {
  Rig r(2 * 4 * MiB);
  void* a = r.backend.allocate(4 * MiB);
  void* b = r.backend.allocate(4 * MiB);
  r.write(a, 4 * MiB, 1);
  r.write(b, 4 * MiB, 2);
  void* c = r.backend.allocate(4 * MiB);  // evicts a
  r.write(c, 4 * MiB, 3);
  r.swapper.pin(b, r.stream);
  r.swapper.pin(c, r.stream);
  try {
    r.swapper.pin(a, r.stream);  // needs a's 4 MiB back while b and c are pinned
    FAIL() << "expected OutOfMemory";
  } catch (const OutOfMemory& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("pinned"), std::string::npos) << msg;
    EXPECT_NE(msg.find(format_address(b)), std::string::npos) << msg;
  }
  r.swapper.unpin(b, r.stream, false);
  r.swapper.unpin(c, r.stream, false);
  EXPECT_TRUE(r.holds(a, 4 * MiB, 1)) << "the failed pin lost nothing";
  EXPECT_TRUE(r.holds(b, 4 * MiB, 2));
  EXPECT_TRUE(r.holds(c, 4 * MiB, 3));
}

TEST(Swapper, HostCapExhaustedKeepsDataWhereItWas) {
  Rig r(2 * 4 * MiB, 4 * MiB);  // host room for one block
  void* a = r.backend.allocate(4 * MiB);
  void* b = r.backend.allocate(4 * MiB);
  r.write(a, 4 * MiB, 1);
  r.write(b, 4 * MiB, 2);
  void* c = r.backend.allocate(4 * MiB);  // a goes to the host (the only host room)
  r.write(c, 4 * MiB, 3);
  EXPECT_THROW(r.backend.allocate(4 * MiB), OutOfMemory) << "no host room to evict b or c";
  // The out-of-memory message learns why (it blamed pins or the swapper's setup: audit 42b #3).
  EXPECT_NE(r.swapper.unevictable().host_refusal.find("test host: cap 4.00 MiB reached"),
            std::string::npos)
      << r.swapper.unevictable().host_refusal;
  EXPECT_TRUE(r.holds(b, 4 * MiB, 2));
  EXPECT_TRUE(r.holds(c, 4 * MiB, 3));
  // Free one block: the job continues.
  r.swapper.release(c, r.stream);
  r.dev.synchronize(r.stream);
  r.backend.free(c);
  EXPECT_TRUE(r.holds(a, 4 * MiB, 1));
  EXPECT_TRUE(r.holds(b, 4 * MiB, 2));
}

TEST(Swapper, ReleaseIsSafeAnywhere) {
  Rig r(2 * 4 * MiB, 1 * GiB, true);
  std::vector<void*> v;
  for (int i = 0; i < 6; ++i) {
    v.push_back(r.backend.allocate(4 * MiB));
    r.write(v.back(), 4 * MiB, i);
  }
  r.swapper.evict(v[5]);                 // in flight
  r.swapper.prefetch(v[0]);              // swapping in (maybe)
  for (void* p : v) {
    r.swapper.release(p, r.stream);
    r.dev.synchronize(r.stream);  // the allocator's free is stream-ordered; this one is not
    r.backend.free(p);
  }
  r.swapper.quiesce();
  r.dev.synchronize();
  EXPECT_EQ(r.host.in_use(), 0u);
  EXPECT_EQ(r.backend.mapped(), 0u);
  auto c = r.dev.counts();
  EXPECT_EQ(c.chunks, 0u);
}

TEST(Swapper, MisuseIsAClearError) {
  Rig r(2 * 4 * MiB);
  std::vector<char> host(64);
  EXPECT_THROW(r.swapper.pin(host.data(), r.stream), InvalidArgument);
  void* a = r.backend.allocate(4 * MiB);
  try {
    r.swapper.unpin(a, r.stream);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("unpin without pin"), std::string::npos);
  }
  r.swapper.pin(a, r.stream);
  r.swapper.unpin(a, r.stream);
  EXPECT_THROW(r.swapper.unpin(a, r.stream), InvalidArgument);
}

}  // namespace
}  // namespace spill::test

namespace spill::test {
namespace {

// A copy that fails surfaces as the CUDA error and leaves the block valid where it was.
TEST(Swapper, FailedCopiesLeaveTheBlockInItsLastGoodPlace) {
  Rig r(2 * 4 * MiB);
  void* a = r.backend.allocate(4 * MiB);
  r.swapper.track(a, 4 * MiB);
  r.write(a, 4 * MiB, 11);
  r.dev.fail_next_copies(1);
  EXPECT_THROW(r.swapper.evict(a), CudaError);  // swap-out fails: a stays resident
  EXPECT_EQ(r.swapper.residence(a), Residence::Resident);
  EXPECT_TRUE(r.holds(a, 4 * MiB, 11));
  r.swapper.evict(a);
  r.swapper.quiesce();
  ASSERT_EQ(r.swapper.residence(a), Residence::OnHost);
  r.dev.fail_next_copies(1);
  EXPECT_THROW(r.swapper.pin(a, r.stream), CudaError);  // swap-in fails: a stays on the host
  EXPECT_EQ(r.swapper.residence(a), Residence::OnHost);
  EXPECT_EQ(r.backend.mapped(), 0u) << "the memory mapped for the failed swap-in was returned";
  EXPECT_TRUE(r.holds(a, 4 * MiB, 11)) << "the next pin brings the bytes back";
}

}  // namespace
}  // namespace spill::test

// The residency rules a framework needs (swapper/swapper.hpp): fresh blocks are protected
// until declared swappable and their allocation is a use by the allocating stream; no silent
// data loss (declaring a block swappable makes it dirty); pins of blocks that never move are
// no-ops; stale pin tokens are harmless; step scopes are separate; a runtime torn down with
// live blocks is safe. Each runs the full stack (caching allocator + swapper) on SimDevice.
#include <gtest/gtest.h>

#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

#include "core/errors.hpp"
#include "core/pattern.hpp"
#include "core/units.hpp"
#include "device/sim_device.hpp"
#include "swapper/runtime.hpp"

namespace spill::test {
namespace {

constexpr std::size_t kBlock = 8 * MiB;

struct Stack {
  explicit Stack(std::size_t budget, bool opt_in, std::string extra = "policy:lru")
      : rt(conf(budget, extra), RuntimeOptions{.opt_in_swappable = opt_in}),
        sw(*rt.swapper()),
        dev(rt.device()) {
    stream = dev.create_stream();
  }
  ~Stack() {
    dev.synchronize();
    rt.allocator().forget_stream(stream);
    dev.destroy_stream(stream);
  }
  static Config conf(std::size_t budget, const std::string& extra) {
    Config c = Config::parse("device:sim,sim_capacity:512MiB,trace:off," + extra);
    c.budget = budget;
    return c;
  }
  // Host access through the host pin (simulated device memory is host memory while resident).
  void write_host(void* p, std::size_t n, std::uint64_t seed) {
    PinToken t = sw.pin_for_host(p);
    fill_pattern(p, n, seed);
    sw.unpin(t, nullptr, true);
  }
  bool holds(void* p, std::size_t n, std::uint64_t seed) {
    PinToken t = sw.pin_for_host(p);
    bool ok = find_pattern_mismatch(p, n, seed) == n;
    sw.unpin(t, nullptr, false);
    return ok;
  }

  Runtime rt;
  Swapper& sw;
  Device& dev;
  Stream stream = nullptr;
};

// Rule 1 (opt-in): a fresh block is not evictable until it is declared swappable, however
// often it was pinned and unpinned, and however short the budget runs.
TEST(Residency, FreshBlocksAreProtectedUntilDeclared) {
  Stack s(3 * kBlock, true);
  void* a = s.rt.allocator().allocate(kBlock, s.stream);
  void* b = s.rt.allocator().allocate(kBlock, s.stream);
  void* c = s.rt.allocator().allocate(kBlock, s.stream);
  EXPECT_EQ(s.sw.stats().unswappable_bytes, 3 * kBlock);
  // Nothing can make room: no block is declared (its producer may not have written it yet).
  EXPECT_THROW(s.rt.allocator().allocate(kBlock, s.stream), OutOfMemory);
  s.write_host(a, kBlock, 1);  // pinned and unpinned: still not swappable
  EXPECT_THROW(s.rt.allocator().allocate(kBlock, s.stream), OutOfMemory);
  EXPECT_EQ(s.sw.residence(a), Residence::Resident);
  s.sw.set_swappable(a, true);
  void* d = s.rt.allocator().allocate(kBlock, s.stream);  // evicts a, the only candidate
  s.sw.quiesce();
  EXPECT_EQ(s.sw.residence(a), Residence::OnHost);
  EXPECT_EQ(s.sw.residence(b), Residence::Resident);
  EXPECT_EQ(s.sw.residence(c), Residence::Resident);
  // Bringing a back needs room that only undeclared blocks hold: a clear error naming them.
  try {
    s.holds(a, kBlock, 1);
    FAIL() << "expected OutOfMemory";
  } catch (const OutOfMemory& e) {
    EXPECT_NE(std::string(e.what()).find("not declared swappable 24.00 MiB in 3 blocks"),
              std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(format_address(b)), std::string::npos) << e.what();
  }
  s.write_host(d, kBlock, 4);
  s.sw.set_swappable(d, true);
  EXPECT_TRUE(s.holds(a, kBlock, 1));
  EXPECT_TRUE(s.holds(d, kBlock, 4));
  for (void* p : {a, b, c, d}) s.rt.allocator().deallocate(p, s.stream);
}

// The out-of-memory message's "cannot evict" figures count a block once: a block both pinned
// and never declared swappable is pinned (they were added before: 16 MiB "cannot evict" out
// of 12 MiB resident, audit 31b).
TEST(Residency, APinnedUndeclaredBlockCountsOnceInTheOutOfMemoryMessage) {
  Stack s(2 * kBlock, true);
  void* a = s.rt.allocator().allocate(kBlock, s.stream);
  void* b = s.rt.allocator().allocate(kBlock, s.stream);
  PinToken t = s.sw.pin_for_host(a);  // pinned, never declared
  const auto u = s.sw.unevictable();
  EXPECT_EQ(u.pinned, kBlock);
  EXPECT_EQ(u.unswappable, kBlock);  // b alone
  try {
    s.rt.allocator().allocate(kBlock, s.stream);
    FAIL() << "expected OutOfMemory";
  } catch (const OutOfMemory& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cannot evict " + format_bytes(kBlock) + " pinned and " +
                     format_bytes(kBlock) + " more never declared swappable"),
              std::string::npos) << m;
  }
  s.sw.unpin(t, nullptr, false);
  for (void* p : {a, b}) s.rt.allocator().deallocate(p, s.stream);
}

// Rule 1: the allocation is a use by the allocating stream, so an eviction waits for the
// work its producer enqueued there, even when that work was never pinned.
TEST(Residency, AnEvictionWaitsForTheAllocatingStream) {
  Stack s(4 * kBlock, true);
  auto& sim = dynamic_cast<SimDevice&>(s.dev);
  std::vector<unsigned char> data(kBlock);
  fill_pattern(data.data(), kBlock, 77);
  void* a = s.rt.allocator().allocate(kBlock, s.stream);
  HoldToken hold = sim.hold(s.stream);  // the producer's write waits behind the hold
  s.dev.copy_async(a, data.data(), kBlock, CopyKind::HostToDevice, s.stream);
  s.sw.set_swappable(a, true);  // declared once the write is enqueued (as documented)
  s.sw.evict(a);                // the swap-out's copy must order after the write
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(s.sw.residence(a), Residence::SwappingOut) << "waits for the held stream";
  sim.release(hold);
  s.sw.quiesce();
  ASSERT_EQ(s.sw.residence(a), Residence::OnHost);
  EXPECT_TRUE(s.holds(a, kBlock, 77)) << "the bytes the producer wrote came back";
  s.rt.allocator().deallocate(a, s.stream);
}

// A block freed while its swap-out still copies it keeps its host buffer until the copy has
// landed, and no longer: once the device is synchronised the stats count none of it, though
// nothing since moved the swapper to free it (before, host_bytes kept the buffer after
// everything was freed, synchronised and the cache emptied, audit 29b #11).
TEST(Residency, AFreedBlocksHostBufferIsNotCountedOnceItsCopyLanded) {
  Stack s(4 * kBlock, true);
  auto& sim = dynamic_cast<SimDevice&>(s.dev);
  void* a = s.rt.allocator().allocate(kBlock, s.stream);
  s.sw.set_swappable(a, true);
  HoldToken hold = sim.hold(s.stream);  // the swap-out waits for the allocating stream
  s.sw.evict(a);
  ASSERT_EQ(s.sw.residence(a), Residence::SwappingOut);
  EXPECT_EQ(s.sw.stats().host_bytes, kBlock);
  s.rt.allocator().deallocate(a, s.stream);  // the copy still reads the block
  sim.release(hold);
  s.dev.synchronize();
  s.rt.allocator().empty_cache();
  const SwapStats st = s.sw.stats();
  EXPECT_EQ(st.host_bytes, 0u) << "the landed copy's host buffer is still counted";
  EXPECT_EQ(st.on_host_bytes, 0u);
  EXPECT_EQ(st.resident_bytes, 0u);
}

// Rule 2: declaring a block swappable makes it dirty: bytes written outside the hooks before
// the declaration are copied, never dropped as "clean".
TEST(Residency, DeclaringABlockSwappableMakesItDirty) {
  Stack s(4 * kBlock, true);
  void* a = s.rt.allocator().allocate(kBlock, s.stream);
  s.sw.set_swappable(a, true);
  s.write_host(a, kBlock, 1);
  s.sw.evict(a);
  s.sw.quiesce();
  EXPECT_EQ(s.sw.stats().swap_outs, 1u);
  EXPECT_TRUE(s.holds(a, kBlock, 1));  // back, read only: the host copy stays current
  s.sw.evict(a);
  s.sw.quiesce();
  EXPECT_EQ(s.sw.stats().clean_evictions, 1u) << "a read-only use keeps the host copy";
  // Now code outside the hooks writes it: the integration takes it back, writes, declares.
  s.sw.set_swappable(a, false);  // brings it back and returns once the host may touch it
  EXPECT_EQ(s.sw.residence(a), Residence::Resident);
  fill_pattern(a, kBlock, 2);  // no pin: the block is not swappable
  s.sw.set_swappable(a, true);
  s.sw.evict(a);
  s.sw.quiesce();
  SwapStats st = s.sw.stats();
  EXPECT_EQ(st.clean_evictions, 1u) << "no free eviction after a declaration";
  EXPECT_EQ(st.swap_outs, 2u);
  EXPECT_TRUE(s.holds(a, kBlock, 2)) << "the unpinned write survived";
  s.rt.allocator().deallocate(a, s.stream);
}

// Rule 2: a block moves with no copy as "never written" only in C++ mode, where every write,
// the first included, is pinned by contract; in opt-in mode never.
TEST(Residency, OnlyCppModeMovesNeverWrittenBlocksWithoutACopy) {
  for (bool opt_in : {false, true}) {
    SCOPED_TRACE(opt_in ? "opt-in" : "C++ mode");
    Stack s(4 * kBlock, opt_in);
    void* a = s.rt.allocator().allocate(kBlock, s.stream);
    if (opt_in) {
      fill_pattern(a, kBlock, 9);  // model init, outside the hooks: allowed before declaring
      s.sw.set_swappable(a, true);
    }
    s.sw.evict(a);
    s.sw.quiesce();
    ASSERT_EQ(s.sw.residence(a), Residence::OnHost);
    SwapStats st = s.sw.stats();
    EXPECT_EQ(st.clean_evictions, opt_in ? 0u : 1u);
    EXPECT_EQ(st.swap_outs, opt_in ? 1u : 0u);
    if (opt_in) {
      EXPECT_TRUE(s.holds(a, kBlock, 9)) << "came back with its bytes, not zeros";
    }
    s.rt.allocator().deallocate(a, s.stream);
  }
}

// A swap-out may start on a block whose swap-in is still landing; cancelling it (a prefetch
// hint, a pin, or a declaration as unswappable) must leave users waiting for that swap-in.
// Found by the C API fuzz: a prefetch cancelled such a swap-out and marked the block resident,
// and a host pin read it half copied. time_scale makes the copies take wall time.
TEST(Residency, CancellingASwapOutWaitsForTheSwapInItStartedOn) {
  for (int how = 0; how < 3; ++how) {
    SCOPED_TRACE(how == 0 ? "prefetch" : how == 1 ? "set_swappable(false)" : "pin");
    Stack s(4 * kBlock, true, "policy:lru,time_scale:20");
    void* a = s.rt.allocator().allocate(kBlock, s.stream);
    s.sw.set_swappable(a, true);
    s.write_host(a, kBlock, 31);
    s.sw.evict(a);
    s.sw.quiesce();
    ASSERT_EQ(s.sw.residence(a), Residence::OnHost);
    s.sw.prefetch(a);  // the copy back takes ~7 ms of wall time
    ASSERT_EQ(s.sw.residence(a), Residence::SwappingIn);
    s.sw.evict(a);     // starts on the landing block (a clean eviction: no copy)
    ASSERT_EQ(s.sw.residence(a), Residence::SwappingOut);
    if (how == 0) s.sw.prefetch(a);
    if (how == 1) s.sw.set_swappable(a, false);
    if (how == 2) {
      PinToken t = s.sw.pin(a, s.stream);
      s.sw.unpin(t, s.stream, false);
    }
    EXPECT_NE(s.sw.residence(a), Residence::SwappingOut);
    if (how == 1) {
      EXPECT_EQ(find_pattern_mismatch(a, kBlock, 31), kBlock) << "declared: may be read at once";
    } else {
      EXPECT_TRUE(s.holds(a, kBlock, 31)) << "the host pin waited for the swap-in";
    }
    s.rt.allocator().deallocate(a, s.stream);
  }
}

// A block freed while its swap-in lands (a prefetch of a tensor freed before its use): the
// allocator hands its memory out again at once, in the freeing stream's order, and on the
// CPU bridge the host writes the new block directly, in no stream's order. The host waits in
// the free for the copy, which would otherwise overwrite what the host wrote first. Before,
// the new block held the old block's bytes (found by a resynchronised-steps test, in about
// half its runs). time_scale makes the copy take wall time (~7 ms).
TEST(Residency, MemoryFreedWhileItsSwapInLandsIsNotOverwrittenForItsNextOwner) {
  Stack s(4 * kBlock, true, "policy:lru,time_scale:20");
  void* a = s.rt.allocator().allocate(kBlock, nullptr);
  s.sw.set_swappable(a, true);
  s.write_host(a, kBlock, 41);
  s.sw.evict(a);
  s.sw.quiesce();
  ASSERT_EQ(s.sw.residence(a), Residence::OnHost);
  s.sw.prefetch(a);
  ASSERT_EQ(s.sw.residence(a), Residence::SwappingIn);
  s.rt.allocator().deallocate(a, nullptr);
  void* b = s.rt.allocator().allocate(kBlock, nullptr);
  ASSERT_EQ(b, a) << "the freed memory is handed out again at once";
  s.write_host(b, kBlock, 42);
  s.dev.synchronize();  // every copy has landed
  EXPECT_TRUE(s.holds(b, kBlock, 42)) << "the old block's swap-in overwrote its next owner";
  s.rt.allocator().deallocate(b, nullptr);
}

// Rule 3: pins of blocks that never move are cheap no-ops; unknown pointers name themselves.
TEST(Residency, PinsOfBlocksThatNeverMoveAreNoOps) {
  Stack s(4 * kBlock, true);
  void* small = s.rt.allocator().allocate(4 * KiB, s.stream);
  PinToken t = s.sw.pin(small, s.stream);
  EXPECT_FALSE(t);
  s.sw.unpin(t, s.stream, true);
  s.sw.unpin(small, s.stream, true);
  EXPECT_FALSE(s.sw.pin_for_host(small));
  s.sw.set_swappable(small, true);  // accepted, ignored
  EXPECT_FALSE(s.sw.swappable(small));
  s.sw.evict(small);
  s.sw.prefetch(small);
  int local = 0;
  try {
    s.sw.pin(&local, s.stream);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(format_address(&local)), std::string::npos) << e.what();
  }
  EXPECT_THROW(s.sw.unpin(&local, s.stream), InvalidArgument);
  EXPECT_THROW(s.sw.set_swappable(&local, true), InvalidArgument);
  s.rt.allocator().deallocate(small, s.stream);
}

// Opt-in: an unpinned block nobody declared swappable is never evicted, whatever the pressure.
TEST(Residency, UndeclaredBlocksAreNeverEvicted) {
  Stack s(4 * kBlock, true);
  void* keep = s.rt.allocator().allocate(kBlock, s.stream);
  fill_pattern(keep, kBlock, 5);  // a framework buffer no hook sees
  PinToken t = s.sw.pin(keep, s.stream);  // a real pin: counted, never an error
  EXPECT_TRUE(t);
  s.sw.unpin(t, s.stream, true);
  std::vector<void*> others;
  for (int i = 0; i < 8; ++i) {
    void* p = s.rt.allocator().allocate(kBlock, s.stream);
    s.sw.set_swappable(p, true);
    s.write_host(p, kBlock, 100 + i);
    others.push_back(p);
    s.sw.evict(keep);  // a hint on an undeclared block does nothing
    ASSERT_EQ(s.sw.residence(keep), Residence::Resident) << i;
  }
  EXPECT_EQ(find_pattern_mismatch(keep, kBlock, 5), kBlock) << "touched without any pin";
  for (int i = 0; i < 8; ++i) EXPECT_TRUE(s.holds(others[i], kBlock, 100 + i)) << i;
  EXPECT_GT(s.sw.stats().swap_outs, 0u);
  for (void* p : others) s.rt.allocator().deallocate(p, s.stream);
  s.rt.allocator().deallocate(keep, s.stream);
}

// Rule 4: freeing a pinned block is normal; its token's unpin, even after the address was
// reused by a new block, is a counted no-op that leaves the new block's pins alone.
TEST(Residency, StaleTokensCannotUnpinANewBlock) {
  Stack s(4 * kBlock, true);
  void* a = s.rt.allocator().allocate(kBlock, s.stream);
  s.sw.set_swappable(a, true);
  PinToken old = s.sw.pin(a, s.stream);
  s.rt.allocator().deallocate(a, s.stream);  // stream-ordered free while pinned
  void* b = s.rt.allocator().allocate(kBlock, s.stream);
  ASSERT_EQ(b, a) << "the cache hands the same address back";
  s.sw.set_swappable(b, true);
  PinToken fresh = s.sw.pin(b, s.stream);
  EXPECT_NE(fresh.generation, old.generation);
  s.sw.unpin(old, s.stream, true);  // late: must not unpin b
  EXPECT_EQ(s.sw.stats().stale_unpins, 1u);
  s.sw.evict(b);
  EXPECT_EQ(s.sw.residence(b), Residence::Resident) << "b is still pinned";
  s.sw.unpin(fresh, s.stream, true);
  s.sw.evict(b);
  s.sw.quiesce();
  EXPECT_EQ(s.sw.residence(b), Residence::OnHost);
  EXPECT_THROW(s.sw.unpin(fresh, s.stream, true), InvalidArgument) << "unpinned twice";
  s.rt.allocator().deallocate(b, s.stream);
  s.sw.unpin(fresh, s.stream, true);  // freed now: stale, harmless
  EXPECT_EQ(s.sw.stats().stale_unpins, 2u);
}

// Rule 5: two training loops in one process, each in its own scope and thread, record and
// follow their own plans; interleaved pins are not deviations.
TEST(Residency, StepScopesDoNotDisturbEachOther) {
  Stack s(96 * MiB, false, "policy:plan");
  constexpr int kSteps = 4, kLayers = 6;
  const std::size_t sizes[2] = {4 * MiB, 6 * MiB};  // a block id means a different size in each
  std::barrier sync(2);
  auto loop = [&](int which) {
    Stream st = s.dev.create_stream();
    std::vector<void*> blocks;
    for (int l = 0; l < kLayers; ++l) {
      blocks.push_back(s.rt.allocator().allocate(sizes[which], st));
      PinToken t = s.sw.pin(blocks.back(), st);
      s.sw.unpin(t, st, true);
    }
    const std::uint64_t scope = 1000 + which;
    for (int step = 0; step < kSteps; ++step) {
      s.sw.begin_step(scope);
      for (int l = 0; l < kLayers; ++l) {
        sync.arrive_and_wait();  // the two loops' ops interleave
        s.sw.begin_op("layer", scope);
        PinToken t = s.sw.pin(blocks[l], st);
        s.sw.unpin(t, st, true);
      }
      s.sw.end_step(scope);
    }
    s.dev.synchronize(st);
    for (void* p : blocks) s.rt.allocator().deallocate(p, st);
    s.rt.allocator().forget_stream(st);
    s.dev.destroy_stream(st);
  };
  std::thread t0(loop, 0), t1(loop, 1);
  t0.join();
  t1.join();
  SwapStats st = s.sw.stats();
  EXPECT_EQ(st.deviations, 0u);
  EXPECT_EQ(st.steps_recorded, 2u);
  EXPECT_EQ(st.steps_planned, 2u * (kSteps - 1));
  EXPECT_EQ(s.sw.last_trace(1000).accesses.size(), static_cast<std::size_t>(kLayers));
  EXPECT_EQ(s.sw.last_trace(1001).accesses.front().bytes, sizes[1]);
  EXPECT_TRUE(s.sw.last_trace(7).accesses.empty());
}

// Rule 5 (readers): a thread that reads a training loop's blocks from another scope (a
// checkpoint or logging thread that never named one: scope 0) neither enters the loop's
// recording nor splits its ops, whichever order the two threads' pins and unpins come in. Its
// unpins belong to its own scope, not to the scope of the block's latest pin: an unpin counted
// in the loop's scope would start a new op there (a recorded op split in two), and the loop's
// own unpin counted in the reader's would leave two ops merged. Either makes the steps with a
// reader differ from the plan (deviations, no planned steps). Host pins, as on the CPU bridge.
TEST(Residency, APinFromAnotherScopesThreadDoesNotChangeTheRecording) {
  constexpr int kSteps = 5, kOps = 4;
  auto run = [](bool reader) {
    Stack s(64 * MiB, true, "policy:plan");
    std::vector<void*> w;
    for (int i = 0; i <= kOps; ++i) {
      w.push_back(s.rt.allocator().allocate(2 * MiB, nullptr));
      s.write_host(w.back(), 2 * MiB, i);
      s.sw.set_swappable(w.back(), true);
    }
    // The reader runs on a thread of its own for each call (scope 0: it never named one).
    auto other = [](auto&& f) { std::thread(f).join(); };
    for (int step = 0; step < kSteps; ++step) {
      const bool reads = reader && step >= 2;  // steps 0 and 1 make and confirm the plan
      s.sw.begin_step(7);
      for (int op = 0; op < kOps; ++op) {
        PinToken r1, r2, a, b;
        // The reader pins first; the loop's pin follows; the reader unpins in the middle of
        // the loop's op (before the op's second pin).
        if (reads) other([&] { r1 = s.sw.pin_for_host(w[op]); });
        a = s.sw.pin_for_host(w[op]);
        if (reads) other([&] { s.sw.unpin(r1, nullptr, false); });
        b = s.sw.pin_for_host(w[op + 1]);
        // The reader pins after the loop did and unpins after it: the loop's unpin comes
        // while the block's latest pin is the reader's.
        if (reads) other([&] { r2 = s.sw.pin_for_host(w[op + 1]); });
        s.sw.unpin(a, nullptr, false);
        s.sw.unpin(b, nullptr, true);
        if (reads) other([&] { s.sw.unpin(r2, nullptr, false); });
      }
      s.sw.end_step(7);
    }
    for (void* p : w) s.rt.allocator().deallocate(p, nullptr);
    return std::pair{s.sw.stats(), s.sw.last_trace(7)};
  };
  const auto [alone, alone_trace] = run(false);
  const auto [read, read_trace] = run(true);
  EXPECT_EQ(alone.steps_planned, static_cast<std::uint64_t>(kSteps - 1));
  EXPECT_EQ(read.deviations, alone.deviations) << "the reader's pins changed the loop's steps";
  EXPECT_EQ(read.steps_planned, alone.steps_planned);
  ASSERT_EQ(read_trace.accesses.size(), alone_trace.accesses.size());
  for (std::size_t i = 0; i < alone_trace.accesses.size(); ++i) {
    EXPECT_EQ(read_trace.accesses[i].op, alone_trace.accesses[i].op) << "access " << i;
    EXPECT_EQ(read_trace.accesses[i].block, alone_trace.accesses[i].block) << "access " << i;
    EXPECT_EQ(read_trace.accesses[i].access, alone_trace.accesses[i].access) << "access " << i;
  }
}

// Rule 6: a runtime torn down with blocks allocated, pinned, on the host and in flight frees
// everything without waiting on anyone.
TEST(Residency, TeardownWithLiveBlocksIsSafe) {
  for (int round = 0; round < 3; ++round) {
    auto s = std::make_unique<Stack>(4 * kBlock, true, "policy:lru,chaos:" + std::to_string(round + 1));
    std::vector<void*> blocks;
    for (int i = 0; i < 6; ++i) {
      void* p = s->rt.allocator().allocate(kBlock, s->stream);
      s->sw.set_swappable(p, true);
      s->write_host(p, kBlock, i);
      blocks.push_back(p);
    }
    s->sw.pin(blocks[5], s->stream);  // never unpinned
    s->sw.evict(blocks[4]);           // maybe still in flight
    s->sw.prefetch(blocks[0]);
    s.reset();
  }
}

}  // namespace
}  // namespace spill::test

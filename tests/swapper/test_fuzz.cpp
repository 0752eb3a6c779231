// Integrity fuzz: random blocks, random reads and writes from 4 host threads on 4 streams, a
// budget far below the footprint, chaos mode on. Every read must see exactly the bytes of the
// last write to that block; nothing may deadlock or leak. CI runs a short variant over several
// seeds; the soak (scripts/soak.sh) runs a million operations per seed:
//   SPILL_FUZZ_OPS=1000000 SPILL_FUZZ_SEEDS=1,2,3 build/tests/test_swapper --gtest_filter='Fuzz*'
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "core/pattern.hpp"
#include "core/units.hpp"
#include "device/sim_device.hpp"
#include "swapper/swapper.hpp"
#include "tests/swapper/test_backend.hpp"

namespace spill::test {
namespace {

std::vector<std::uint64_t> seeds_from_env() {
  const char* env = std::getenv("SPILL_FUZZ_SEEDS");
  std::vector<std::uint64_t> seeds;
  std::stringstream in(env ? env : "1,2,3");
  std::string item;
  while (std::getline(in, item, ',')) seeds.push_back(std::stoull(item));
  return seeds;
}

long ops_from_env() {
  const char* env = std::getenv("SPILL_FUZZ_OPS");
  return env ? std::atol(env) : 1500;
}

struct FuzzBlock {
  void* ptr = nullptr;
  std::size_t bytes = 0;
  std::mutex m;                // one logical owner at a time, as in a correct program
  std::uint64_t seed = 0;      // the pattern last written
  Event last_use = nullptr;    // orders the next user's stream after the previous one
  bool written = false;
};

void run_fuzz(std::uint64_t seed, long total_ops) {
  std::mt19937_64 rng(seed);
  SimDevice dev(SimOptions{.capacity = 1 * GiB,
                           .chaos_seed = seed,
                           .chaos_probability = 0.2,
                           .chaos_max_delay = std::chrono::microseconds(100)});
  const std::size_t g = dev.granularity();
  const int n_blocks = 40;
  std::vector<std::unique_ptr<FuzzBlock>> blocks;
  std::size_t footprint = 0, largest = 0;
  std::uniform_int_distribution<std::size_t> size_dist(256 * KiB, 8 * MiB);
  std::vector<std::size_t> sizes;
  for (int i = 0; i < n_blocks; ++i) {
    std::size_t n = size_dist(rng);
    sizes.push_back(n);
    std::size_t rounded = (n + g - 1) / g * g;
    footprint += rounded;
    largest = std::max(largest, rounded);
  }
  const int threads = 4;
  // 25% of the footprint, but never below what 4 pinned blocks need.
  std::size_t budget = std::max(footprint / 4, (threads + 1) * largest);
  TestBackend backend(dev, budget);
  TestHost host(dev, 2 * footprint);
  SwapperOptions so;
  so.policy = SwapPolicy::Lru;
  so.chunk_bytes = 1 * MiB;
  Swapper swapper(dev, backend, host, so);
  backend.evict_hook = [&](std::size_t n) { return swapper.evict_bytes(n); };
  for (std::size_t n : sizes) {
    auto b = std::make_unique<FuzzBlock>();
    b->ptr = backend.allocate(n);
    swapper.track(b->ptr, (n + g - 1) / g * g);
    b->bytes = n;
    b->last_use = dev.create_event();
    blocks.push_back(std::move(b));
  }

  std::atomic<long> ops{0}, reads_checked{0};
  std::atomic<int> failures{0};
  std::mutex err_mu;
  std::string first_error;
  auto worker = [&](int t) {
    std::mt19937_64 r(seed * 1000 + t);
    Stream s = dev.create_stream();
    std::vector<unsigned char> buf(8 * MiB);
    try {
      while (ops.fetch_add(1) < total_ops && failures.load() == 0) {
        FuzzBlock& b = *blocks[r() % blocks.size()];
        std::lock_guard own(b.m);
        dev.wait(s, b.last_use);
        // Views: any interior pointer of the block pins it.
        char* view = static_cast<char*>(b.ptr) + (r() % b.bytes) / 2;
        bool write = !b.written || r() % 3 == 0;
        swapper.pin(view, s);
        if (write) {
          std::uint64_t seed_w = r();
          fill_pattern(buf.data(), b.bytes, seed_w);
          dev.copy_async(b.ptr, buf.data(), b.bytes, CopyKind::HostToDevice, s);
          swapper.unpin(view, s, true);
          b.seed = seed_w;
          b.written = true;
        } else {
          std::fill(buf.begin(), buf.begin() + b.bytes, 0);
          dev.copy_async(buf.data(), b.ptr, b.bytes, CopyKind::DeviceToHost, s);
          swapper.unpin(view, s, false);
        }
        dev.record(b.last_use, s);
        dev.synchronize(s);  // `buf` is reused next
        if (!write) {
          reads_checked++;
          std::size_t bad = find_pattern_mismatch(buf.data(), b.bytes, b.seed);
          if (bad != b.bytes) {
            failures++;
            std::lock_guard lock(err_mu);
            first_error = "block " + format_address(b.ptr) + " differs at byte " +
                          std::to_string(bad);
          }
        }
      }
    } catch (const std::exception& e) {
      failures++;
      std::lock_guard lock(err_mu);
      if (first_error.empty()) first_error = e.what();
    }
    swapper.forget_stream(s);
    dev.destroy_stream(s);
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(worker, t);
  for (auto& th : pool) th.join();
  EXPECT_EQ(failures.load(), 0) << first_error;
  EXPECT_GT(reads_checked.load(), total_ops / 4);
  SwapStats st = swapper.stats();
  EXPECT_GT(st.swap_outs + st.clean_evictions, 0u) << "the budget forced no swapping";
  EXPECT_LE(backend.peak_mapped(), budget);

  Stream s = dev.create_stream();
  for (auto& b : blocks) {
    swapper.release(b->ptr, s);
    dev.synchronize(s);
    backend.free(b->ptr);
    dev.destroy_event(b->last_use);
  }
  dev.destroy_stream(s);
  swapper.quiesce();
  EXPECT_EQ(host.in_use(), 0u) << "host memory leaked";
  EXPECT_EQ(backend.mapped(), 0u) << "device memory leaked";
  EXPECT_EQ(dev.counts().chunks, 0u);
}

TEST(Fuzz, EveryReadSeesTheLastWrite) {
  for (std::uint64_t seed : seeds_from_env()) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    run_fuzz(seed, ops_from_env());
  }
}

}  // namespace
}  // namespace spill::test

// The Device contract, one body run on every backend (typed tests).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

#include "core/clock.hpp"
#include "core/errors.hpp"
#include "core/pattern.hpp"
#include "device/diagnostics.hpp"
#include "tests/device/backends.hpp"

namespace spill::test {
namespace {

template <class Backend>
class DeviceContract : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string skip;
    dev_ = Backend::make(&skip);
    if (!dev_) GTEST_SKIP() << skip;
    stream_ = dev_->create_stream();
  }
  void TearDown() override {
    if (dev_) {
      dev_->synchronize();
      dev_->destroy_stream(stream_);
    }
  }

  std::vector<unsigned char> read_back(const void* d, std::size_t n) {
    std::vector<unsigned char> out(n);
    dev_->copy_async(out.data(), d, n, CopyKind::DeviceToHost, stream_);
    dev_->synchronize(stream_);
    return out;
  }

  void write(void* d, std::size_t n, std::uint64_t seed) {
    std::vector<unsigned char> in(n);
    fill_pattern(in.data(), n, seed);
    dev_->copy_async(d, in.data(), n, CopyKind::HostToDevice, stream_);
    dev_->synchronize(stream_);
  }

  std::unique_ptr<Device> dev_;
  Stream stream_ = nullptr;
};

using Backends = ::testing::Types<SimBackend, ChaosSimBackend, CudaBackend>;
struct BackendNames {
  template <class T>
  static std::string GetName(int) {
    return T::name;
  }
};
TYPED_TEST_SUITE(DeviceContract, Backends, BackendNames);

TYPED_TEST(DeviceContract, DescribesItself) {
  const DeviceInfo& i = this->dev_->info();
  EXPECT_FALSE(i.name.empty());
  EXPECT_GT(i.total_bytes, 0u);
  EXPECT_GT(i.granularity, 0u);
  EXPECT_FALSE(i.link_name.empty());
  EXPECT_GT(i.h2d_gbps, 0);
  MemInfo m = this->dev_->mem_info();
  EXPECT_EQ(m.total, i.total_bytes);
  EXPECT_LE(m.free, m.total);
}

TYPED_TEST(DeviceContract, MappedDataSurvivesUnmapAndRemapElsewhere) {
  Device& d = *this->dev_;
  const std::size_t g = d.granularity();
  char* base = static_cast<char*>(d.reserve(3 * g));
  PhysicalHandle h = d.create_physical(g);
  d.map(base, g, h);
  this->write(base, g, 42);
  d.unmap(base, g);
  d.map(base + 2 * g, g, h);
  auto out = this->read_back(base + 2 * g, g);
  EXPECT_EQ(find_pattern_mismatch(out.data(), g, 42), g);
  d.unmap(base + 2 * g, g);
  d.release_physical(h, g);
  d.unreserve(base, 3 * g);
}

// Each virtual-memory call that returns is counted once with the host's time in it; a refused
// or failed one is not.
TYPED_TEST(DeviceContract, CountsItsVirtualMemoryCalls) {
  Device& d = *this->dev_;
  const std::size_t g = d.granularity();
  const VmmCalls before = d.vmm_calls();
  char* base = static_cast<char*>(d.reserve(2 * g));
  PhysicalHandle h = d.create_physical(g);
  d.map(base, g, h);
  d.unmap(base, g);
  d.map(base + g, g, h);
  d.unmap(base + g, g);
  EXPECT_THROW(d.map(base + 1, g, h), InvalidArgument);  // refused before the call
  EXPECT_THROW(d.create_physical((d.info().total_bytes / g + 1) * g), OutOfMemory);
  d.release_physical(h, g);
  d.unreserve(base, 2 * g);
  const VmmCalls v = d.vmm_calls() - before;
  EXPECT_EQ(v.reserve.calls, 1u);
  EXPECT_EQ(v.create.calls, 1u);
  EXPECT_EQ(v.map.calls, 2u);
  EXPECT_EQ(v.unmap.calls, 2u);
  EXPECT_EQ(v.release.calls, 1u);
  EXPECT_EQ(v.unreserve.calls, 1u);
  for (const VmmCalls::Tally* t :
       {&v.reserve, &v.create, &v.map, &v.unmap, &v.release, &v.unreserve})
    EXPECT_GE(t->seconds, 0.0);
  EXPECT_GT(v.seconds(), 0.0);
  EXPECT_DOUBLE_EQ(v.seconds(), v.reserve.seconds + v.create.seconds + v.map.seconds +
                                    v.unmap.seconds + v.release.seconds + v.unreserve.seconds);
}

// The calling thread's CPU time in virtual-memory calls counts its own calls only, and is part
// of its CPU time.
TYPED_TEST(DeviceContract, CountsTheCallingThreadsCpuTimeInVirtualMemoryCalls) {
  Device& d = *this->dev_;
  const std::size_t g = d.granularity();
  char* base = static_cast<char*>(d.reserve(g));
  PhysicalHandle h = d.create_physical(g);
  auto cycle = [&] {
    for (int i = 0; i < 20; ++i) {
      d.map(base, g, h);
      d.unmap(base, g);
    }
  };
  const double mine = Device::thread_vmm_cpu_s();
  std::thread([&] { cycle(); }).join();
  EXPECT_EQ(Device::thread_vmm_cpu_s(), mine);  // another thread's calls
  const double cpu = thread_cpu_s();
  cycle();
  const double spent = Device::thread_vmm_cpu_s() - mine;
  EXPECT_GT(spent, 0.0);
  EXPECT_LE(spent, thread_cpu_s() - cpu);
  d.release_physical(h, g);
  d.unreserve(base, g);
}

TYPED_TEST(DeviceContract, MultiChunkRangesCopyAcrossChunkBoundaries) {
  Device& d = *this->dev_;
  const std::size_t g = d.granularity();
  char* base = static_cast<char*>(d.reserve(2 * g));
  PhysicalHandle a = d.create_physical(g), b = d.create_physical(g);
  d.map(base, g, a);
  d.map(base + g, g, b);
  this->write(base + g / 2, g, 9);  // straddles the two chunks
  auto out = this->read_back(base + g / 2, g);
  EXPECT_EQ(find_pattern_mismatch(out.data(), g, 9), g);
  d.unmap(base, g);  // one unmap per map, as cuMemUnmap takes them
  d.unmap(base + g, g);
  d.release_physical(a, g);
  d.release_physical(b, g);
  d.unreserve(base, 2 * g);
}

TYPED_TEST(DeviceContract, CopiesKeepDataInEveryDirection) {
  Device& d = *this->dev_;
  const std::size_t g = d.granularity();
  for (std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{4099}, MiB + 5, 2 * g}) {
    SCOPED_TRACE("bytes=" + std::to_string(n));
    auto* pinned = static_cast<unsigned char*>(d.allocate_host(n));
    std::vector<unsigned char> pageable(n, 0);
    fill_pattern(pinned, n, n);
    void* plain = d.allocate(n);
    std::size_t span = (n + g - 1) / g * g;
    void* vmm = d.reserve(span);
    PhysicalHandle h = d.create_physical(span);
    d.map(vmm, span, h);
    d.copy_async(plain, pinned, n, CopyKind::HostToDevice, this->stream_);   // pinned h2d
    d.copy_async(vmm, plain, n, CopyKind::DeviceToDevice, this->stream_);    // d2d
    d.copy_async(pageable.data(), vmm, n, CopyKind::DeviceToHost, this->stream_);  // pageable d2h
    d.synchronize(this->stream_);
    EXPECT_EQ(find_pattern_mismatch(pageable.data(), n, n), n);
    std::vector<unsigned char> back(n, 0);
    d.fill_async(plain, 0, n, this->stream_);
    d.copy_async(plain, pageable.data(), n, CopyKind::HostToDevice, this->stream_);  // pageable h2d
    d.copy_async(pinned, plain, n, CopyKind::DeviceToHost, this->stream_);          // pinned d2h
    d.synchronize(this->stream_);
    EXPECT_EQ(find_pattern_mismatch(pinned, n, n), n);
    d.unmap(vmm, span);
    d.release_physical(h, span);
    d.unreserve(vmm, span);
    d.deallocate(plain);
    d.free_host(pinned);
  }
}

TYPED_TEST(DeviceContract, RegisteredHostMemoryCopies) {
  Device& d = *this->dev_;
  const std::size_t n = 3 * MiB;
  std::vector<unsigned char> host(n);
  fill_pattern(host.data(), n, 77);
  d.register_host(host.data(), n);
  void* dev = d.allocate(n);
  d.copy_async(dev, host.data(), n, CopyKind::HostToDevice, this->stream_);
  auto out = this->read_back(dev, n);
  EXPECT_EQ(find_pattern_mismatch(out.data(), n, 77), n);
  d.unregister_host(host.data());
  d.deallocate(dev);
}

TYPED_TEST(DeviceContract, FillWritesEveryByte) {
  Device& d = *this->dev_;
  const std::size_t n = MiB + 3;
  void* p = d.allocate(n);
  d.fill_async(p, 0xA5, n, this->stream_);
  auto out = this->read_back(p, n);
  EXPECT_EQ(std::count(out.begin(), out.end(), 0xA5), static_cast<long>(n));
  d.deallocate(p);
}

TYPED_TEST(DeviceContract, WorkOnOneStreamRunsInOrder) {
  Device& d = *this->dev_;
  const std::size_t n = 256 * KiB;
  const int rounds = 16;
  void* buf = d.allocate(n);
  std::vector<std::vector<unsigned char>> in(rounds, std::vector<unsigned char>(n));
  std::vector<std::vector<unsigned char>> out(rounds, std::vector<unsigned char>(n));
  for (int r = 0; r < rounds; ++r) {
    fill_pattern(in[r].data(), n, 1000 + r);
    d.copy_async(buf, in[r].data(), n, CopyKind::HostToDevice, this->stream_);
    d.copy_async(out[r].data(), buf, n, CopyKind::DeviceToHost, this->stream_);
  }
  d.synchronize(this->stream_);
  for (int r = 0; r < rounds; ++r)
    EXPECT_EQ(find_pattern_mismatch(out[r].data(), n, 1000 + r), n) << "round " << r;
  d.deallocate(buf);
}

TYPED_TEST(DeviceContract, EventJoinsStreams) {
  Device& d = *this->dev_;
  const std::size_t n = 512 * KiB;
  void* buf = d.allocate(n);
  Stream writer = d.create_stream(), reader = d.create_stream();
  Event e = d.create_event();
  std::vector<unsigned char> in(n), out(n);
  for (int r = 0; r < 12; ++r) {
    fill_pattern(in.data(), n, 50 + r);
    d.copy_async(buf, in.data(), n, CopyKind::HostToDevice, writer);
    d.record(e, writer);
    d.wait(reader, e);
    d.copy_async(out.data(), buf, n, CopyKind::DeviceToHost, reader);
    d.synchronize(reader);
    EXPECT_EQ(find_pattern_mismatch(out.data(), n, 50 + r), n) << "round " << r;
    d.synchronize(writer);  // `in` is rewritten next round
  }
  d.destroy_event(e);
  d.destroy_stream(writer);
  d.destroy_stream(reader);
  d.deallocate(buf);
}

TYPED_TEST(DeviceContract, JoinedStreamsNeverReadStaleData) {
  EXPECT_EQ(count_stale_reads(*this->dev_, 6, true, 256 * KiB), 0);
}

TYPED_TEST(DeviceContract, EventQueryAndSynchronize) {
  Device& d = *this->dev_;
  Event e = d.create_event();
  EXPECT_TRUE(d.query(e)) << "a never-recorded event counts as complete";
  const std::size_t n = 4 * MiB;
  void* buf = d.allocate(n);
  std::vector<unsigned char> in(n);
  fill_pattern(in.data(), n, 3);
  d.copy_async(buf, in.data(), n, CopyKind::HostToDevice, this->stream_);
  d.record(e, this->stream_);
  d.synchronize(e);
  EXPECT_TRUE(d.query(e));
  d.destroy_event(e);
  d.deallocate(buf);
}

TYPED_TEST(DeviceContract, TimingEventsMeasureWork) {
  Device& d = *this->dev_;
  const std::size_t n = 16 * MiB;
  void* buf = d.allocate(n);
  void* host = d.allocate_host(n);
  Event t0 = d.create_event(true), t1 = d.create_event(true);
  d.record(t0, this->stream_);
  d.copy_async(buf, host, n, CopyKind::HostToDevice, this->stream_);
  d.record(t1, this->stream_);
  d.synchronize(t1);
  EXPECT_GT(d.elapsed_ms(t0, t1), 0.0f);
  Event untimed = d.create_event(false);
  d.record(untimed, this->stream_);
  d.synchronize(untimed);
  EXPECT_THROW(d.elapsed_ms(t0, untimed), Error);
  d.destroy_event(t0);
  d.destroy_event(t1);
  d.destroy_event(untimed);
  d.free_host(host);
  d.deallocate(buf);
}

TYPED_TEST(DeviceContract, HostCallbacksRunInStreamOrder) {
  Device& d = *this->dev_;
  const std::size_t n = 1 * MiB;
  void* buf = d.allocate(n);
  auto* host = static_cast<unsigned char*>(d.allocate_host(n));
  std::vector<unsigned char> in(n);
  std::mutex m;
  std::vector<int> order;
  std::atomic<int> data_ok{0};
  for (int r = 0; r < 8; ++r) {
    fill_pattern(in.data(), n, 200 + r);
    d.copy_async(buf, in.data(), n, CopyKind::HostToDevice, this->stream_);
    d.copy_async(host, buf, n, CopyKind::DeviceToHost, this->stream_);
    d.host_callback(this->stream_, [&, r] {
      std::lock_guard lock(m);
      order.push_back(r);
      data_ok += find_pattern_mismatch(host, n, 200 + r) == n;
    });
    d.synchronize(this->stream_);
  }
  std::vector<int> expected{0, 1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(order, expected);
  EXPECT_EQ(data_ok.load(), 8) << "a callback must see the copies enqueued before it";
  d.free_host(host);
  d.deallocate(buf);
}

TYPED_TEST(DeviceContract, HoldKeepsAStreamWaitingUntilReleased) {
  Device& d = *this->dev_;
  const std::size_t n = 1 * MiB;
  void* buf = d.allocate(n);
  // Pinned host memory: CUDA may block the host on a pageable copy until the stream runs it,
  // which behind a hold is until the hold times out (Device::hold).
  auto* in = static_cast<unsigned char*>(d.allocate_host(n));
  auto* out = static_cast<unsigned char*>(d.allocate_host(n));
  fill_pattern(in, n, 8);
  std::fill(out, out + n, 0);
  Event e = d.create_event();
  const auto t0 = std::chrono::steady_clock::now();
  HoldToken token = d.hold(this->stream_);
  d.copy_async(buf, in, n, CopyKind::HostToDevice, this->stream_);
  d.copy_async(out, buf, n, CopyKind::DeviceToHost, this->stream_);
  d.record(e, this->stream_);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5))
      << "enqueueing behind a hold blocked the host";
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(d.query(e)) << "work behind a hold must not run";
  EXPECT_EQ(find_pattern_mismatch(out, n, 8), 0u);
  d.release(token);
  d.synchronize(e);
  EXPECT_EQ(find_pattern_mismatch(out, n, 8), n);
  EXPECT_THROW(d.release(token), InvalidArgument) << "a hold is released once";
  d.destroy_event(e);
  d.free_host(in);
  d.free_host(out);
  d.deallocate(buf);
}

TYPED_TEST(DeviceContract, CapacityExhaustionIsOutOfMemory) {
  Device& d = *this->dev_;
  const std::size_t g = d.granularity();
  std::size_t too_much = (d.info().total_bytes / g + 1) * g;
  EXPECT_THROW(d.create_physical(too_much), OutOfMemory);
  EXPECT_THROW(d.allocate(d.info().total_bytes + g), OutOfMemory);
  // The device is still usable afterwards.
  PhysicalHandle h = d.create_physical(g);
  d.release_physical(h, g);
}

TYPED_TEST(DeviceContract, RejectsBadArguments) {
  Device& d = *this->dev_;
  const std::size_t g = d.granularity();
  EXPECT_THROW(d.reserve(0), InvalidArgument);
  EXPECT_THROW(d.reserve(g + 1), InvalidArgument);
  EXPECT_THROW(d.create_physical(g / 2), InvalidArgument);
  char* base = static_cast<char*>(d.reserve(2 * g));
  PhysicalHandle h = d.create_physical(g);
  EXPECT_THROW(d.map(base + 1, g, h), InvalidArgument);
  EXPECT_THROW(d.allocate(0), InvalidArgument);
  EXPECT_THROW(d.copy_async(nullptr, base, 16, CopyKind::DeviceToHost, this->stream_),
               InvalidArgument);
  EXPECT_THROW(d.destroy_stream(nullptr), InvalidArgument);
  d.release_physical(h, g);
  d.unreserve(base, 2 * g);
}

}  // namespace
}  // namespace spill::test

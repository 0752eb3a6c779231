// `spill device-check`: a short demonstration and self-check of the device seam on whichever
// backend is chosen: same-address remapping keeps data, copies in every direction keep data,
// link bandwidth (modelled on the simulated device, measured on a GPU), and on the simulated
// device that unmapped memory faults and that chaos mode exposes a missing wait.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <mutex>
#include <thread>
#include <vector>

#include "cli/commands.hpp"
#include "core/errors.hpp"
#include "core/pattern.hpp"
#include "core/units.hpp"
#include "device/diagnostics.hpp"
#include "device/sim_fault_note.hpp"
#include "device/select.hpp"
#include "device/sim_device.hpp"

namespace spill::cli {
namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("  [%s] %s\n", ok ? " ok " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// Maps two chunks side by side, writes patterns, then swaps which chunk sits where: each
// pattern must follow its chunk, as a swapped-out block's bytes follow it back.
void check_remap(Device& dev) {
  const std::size_t g = dev.granularity();
  char* base = static_cast<char*>(dev.reserve(2 * g));
  PhysicalHandle a = dev.create_physical(g), b = dev.create_physical(g);
  dev.map(base, g, a);
  dev.map(base + g, g, b);
  Stream s = dev.create_stream();
  std::vector<unsigned char> pa(g), pb(g), out(g);
  fill_pattern(pa.data(), g, 11);
  fill_pattern(pb.data(), g, 22);
  dev.copy_async(base, pa.data(), g, CopyKind::HostToDevice, s);
  dev.copy_async(base + g, pb.data(), g, CopyKind::HostToDevice, s);
  dev.synchronize(s);
  dev.unmap(base, g);  // one mapping at a time, as cuMemUnmap takes them
  dev.unmap(base + g, g);
  dev.map(base, g, b);
  dev.map(base + g, g, a);
  dev.copy_async(out.data(), base, g, CopyKind::DeviceToHost, s);
  dev.synchronize(s);
  check(find_pattern_mismatch(out.data(), g, 22) == g, "a chunk's bytes follow it to a new address");
  dev.copy_async(out.data(), base + g, g, CopyKind::DeviceToHost, s);
  dev.synchronize(s);
  check(find_pattern_mismatch(out.data(), g, 11) == g, "both chunks keep their bytes across remap");
  dev.unmap(base, g);
  dev.unmap(base + g, g);
  dev.release_physical(a, g);
  dev.release_physical(b, g);
  dev.unreserve(base, 2 * g);
  dev.destroy_stream(s);
}

// Times `reps` back-to-back copies of `bytes` in each direction with timing events.
void check_bandwidth(Device& dev) {
  const std::size_t bytes = 64 * MiB;
  const int reps = 4;
  void* d = dev.allocate(bytes);
  void* h = dev.allocate_host(bytes);
  fill_pattern(h, bytes, 5);
  Stream s = dev.create_stream();
  Event t0 = dev.create_event(true), t1 = dev.create_event(true);
  const char* label = dev.info().simulated ? "modelled" : "measured";
  for (CopyKind kind : {CopyKind::HostToDevice, CopyKind::DeviceToHost}) {
    dev.record(t0, s);
    for (int i = 0; i < reps; ++i) {
      if (kind == CopyKind::HostToDevice) dev.copy_async(d, h, bytes, kind, s);
      else dev.copy_async(h, d, bytes, kind, s);
    }
    dev.record(t1, s);
    dev.synchronize(s);
    double ms = dev.elapsed_ms(t0, t1);
    double gbps = ms > 0 ? reps * static_cast<double>(bytes) / (ms * 1e-3) / 1e9 : 0;
    std::printf("  %s %s: %.1f GB/s (%d x %s, pinned)\n", to_string(kind), label, gbps, reps,
                format_bytes(bytes).c_str());
  }
  check(find_pattern_mismatch(h, bytes, 5) == bytes, "64 MiB round trip h2d then d2h intact");
  dev.destroy_event(t0);
  dev.destroy_event(t1);
  dev.destroy_stream(s);
  dev.free_host(h);
  dev.deallocate(d);
}

// What the VMM calls cost the host (the swapper makes them on every swap-out and swap-in),
// and whether they wait for work queued on another stream: the swapper assumes they do not
// (the host runs ahead of the device). Figures only: a slow call is not a failure.
void report_vmm_costs(Device& dev) {
  using Clock = std::chrono::steady_clock;
  auto us = [](Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); };
  const std::size_t g = dev.granularity();
  for (std::size_t chunk : {g, 32 * g}) {
    const int reps = chunk == g ? 16 : 4;
    double t_create = 0, t_map = 0, t_unmap = 0, t_release = 0;
    void* va = dev.reserve(chunk);
    for (int i = 0; i < reps; ++i) {
      auto t0 = Clock::now();
      PhysicalHandle h = dev.create_physical(chunk);
      auto t1 = Clock::now();
      dev.map(va, chunk, h);
      auto t2 = Clock::now();
      dev.unmap(va, chunk);
      auto t3 = Clock::now();
      dev.release_physical(h, chunk);
      auto t4 = Clock::now();
      t_create += us(t1 - t0), t_map += us(t2 - t1), t_unmap += us(t3 - t2), t_release += us(t4 - t3);
    }
    dev.unreserve(va, chunk);
    std::printf("  %s chunk: create %.0f us, map %.0f us, unmap %.0f us, release %.0f us (mean of %d)\n",
                format_bytes(chunk).c_str(), t_create / reps, t_map / reps, t_unmap / reps,
                t_release / reps, reps);
  }
  // The same calls while a stream is held busy; a watchdog lets it go after 300 ms at most.
  Stream busy = dev.create_stream();
  HoldToken hold = dev.hold(busy);
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  std::thread watchdog([&] {
    std::unique_lock lock(m);
    cv.wait_for(lock, std::chrono::milliseconds(300), [&] { return done; });
    dev.release(hold);
  });
  auto let_go = [&] {
    {
      std::lock_guard lock(m);
      done = true;
    }
    cv.notify_all();
    watchdog.join();
  };
  const auto t0 = Clock::now();
  try {
    void* va = dev.reserve(g);
    PhysicalHandle h = dev.create_physical(g);
    dev.map(va, g, h);
    dev.unmap(va, g);
    dev.release_physical(h, g);
    dev.unreserve(va, g);
  } catch (...) {
    let_go();
    throw;
  }
  const double took = us(Clock::now() - t0);
  let_go();
  dev.synchronize(busy);
  dev.destroy_stream(busy);
  std::printf("  VMM calls while another stream is busy: %.0f us (%s)\n", took,
              took > 250e3 ? "they WAIT for the device's work: swap-outs and swap-ins stall the host"
                           : "they do not wait for it");
}

void check_fault() {
  SimDevice dev(SimOptions{.capacity = 64 * MiB});
  char* p = static_cast<char*>(dev.reserve(dev.granularity()));
  std::fflush(stdout);
  pid_t child = ::fork();
  if (child == 0) {
    sim::adopt_reservations();  // the child faults on purpose: the ordinary note
    p[0] = 1;  // unmapped: must fault
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  check(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV,
        "the CPU touching an unmapped range is killed by SIGSEGV");
  std::vector<char> host(4096, 7);
  dev.copy_async(p, host.data(), host.size(), CopyKind::HostToDevice, nullptr);
  bool thrown = false;
  try {
    dev.synchronize();
  } catch (const CudaError& e) {
    thrown = true;
    std::printf("  reported: %s\n", e.what());
  }
  check(thrown, "a copy into an unmapped range is reported as an illegal address");
}

void check_chaos() {
  SimDevice dev(SimOptions{.capacity = 64 * MiB, .chaos_seed = 7, .chaos_probability = 1.0});
  int stale_without_wait = count_stale_reads(dev, 8, false);
  int stale_with_wait = count_stale_reads(dev, 8, true);
  std::printf("  chaos: stale reads %d/8 without the wait, %d/8 with it\n", stale_without_wait,
              stale_with_wait);
  check(stale_without_wait > 0, "chaos mode exposes a reader that forgot to wait");
  check(stale_with_wait == 0, "properly joined streams always read the written data");
}

}  // namespace

void add_device_check(CLI::App& app, Runner& run) {
  CLI::App* cmd = app.add_subcommand(
      "device-check", "demonstrate and self-check the device: remapping, copies, bandwidth, "
                      "faults and chaos (the last two on the simulated device)");
  cmd->callback([&run] {
    run = [](const Config& config) {
      DeviceSelection sel = make_device(config);
      Device& dev = *sel.device;
      std::printf("%s\ndevice: %s, %s, link %s\n", sel.reason.c_str(), dev.info().name.c_str(),
                  format_bytes(dev.info().total_bytes).c_str(),
                  dev.info().link_description.c_str());
      // The largest check: the 64 MiB round trip, or the 32-granule VMM timing.
      const std::size_t need = std::max<std::size_t>(64 * MiB, 32 * dev.granularity());
      SPILL_EXPECTS(dev.info().total_bytes >= need,
                    "device-check needs " + format_bytes(need) + " of device memory; " +
                        dev.info().name + " has " + format_bytes(dev.info().total_bytes) +
                        (dev.info().simulated ? " (raise sim_capacity:)" : ""));
      std::printf("same-address remapping:\n");
      check_remap(dev);
      std::printf("copies and bandwidth:\n");
      check_bandwidth(dev);
      std::printf("VMM call costs (host time):\n");
      report_vmm_costs(dev);
      std::printf("simulated-device safety nets:\n");
      check_fault();
      check_chaos();
      std::printf("%s: %d check(s) failed\n", failures ? "FAILED" : "all checks passed", failures);
      return failures ? 1 : 0;
    };
  });
}

}  // namespace spill::cli

// See sim_fault_note.hpp.
#include "device/sim_fault_note.hpp"

#include <signal.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>

namespace spill::sim {
namespace {

// Reservations the handler knows (more are simply not noted). A slot is claimed by a CAS on
// its base; the end is written after, so the handler may see a base with end 0 (no match).
struct Range {
  std::atomic<std::uintptr_t> base{0}, end{0};
};
std::array<Range, 256> g_ranges;

struct sigaction g_previous {};
std::once_flag g_installed;
std::atomic<pid_t> g_owner{0};  // the process whose simulated device noted the ranges

void write_all(const char* s, std::size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(STDERR_FILENO, s, n);
    if (w <= 0) return;
    s += w;
    n -= static_cast<std::size_t>(w);
  }
}

void write_str(const char* s) { write_all(s, std::strlen(s)); }

void write_hex(std::uintptr_t v) {
  char buf[2 + 2 * sizeof(v)];
  std::size_t i = sizeof(buf);
  do {
    buf[--i] = "0123456789abcdef"[v & 0xf];
    v >>= 4;
  } while (v != 0 && i > 2);
  buf[--i] = 'x';
  buf[--i] = '0';
  write_all(buf + i, sizeof(buf) - i);
}

bool in_reservation(std::uintptr_t a) {
  for (const Range& r : g_ranges) {
    const std::uintptr_t base = r.base.load(std::memory_order_acquire);
    if (base != 0 && a >= base && a < r.end.load(std::memory_order_acquire)) return true;
  }
  return false;
}

void on_fault(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  const auto addr = reinterpret_cast<std::uintptr_t>(info->si_addr);
  if (in_reservation(addr) && ::getpid() != g_owner.load(std::memory_order_relaxed)) {
    // A forked child (a data-loader worker) inherits the mappings as they were at the fork
    // and can pin nothing (spill refuses every call there).
    write_str("spill: segmentation fault at ");
    write_hex(addr);
    write_str(
        " in the simulated device's memory, in a process forked from the one that runs spill: "
        "this block was swapped out (or freed) at the fork, and a forked child cannot pin it. "
        "Read only tensors resident at the fork, or give the child a copy made before it "
        "(docs/pytorch.md, the CPU bridge).\n");
  } else if (in_reservation(addr)) {
    write_str("spill: segmentation fault at ");
    write_hex(addr);
    write_str(
        " in the simulated device's memory, where nothing is mapped: a block that is swapped "
        "out (or freed) was touched without a pin. spill.torch: a thread other than the one "
        "that trains must use an offloaded model's tensors inside "
        "`with spill.torch.pin_reads():`, and so must a forward that reads what no hook of "
        "offload() pins (a gradient, optimizer state, another module's state: docs/pytorch.md); "
        "code that reads a raw data_ptr() must pin it. C API: bracket host access with "
        "spill_pin_for_host and spill_unpin.\n");
  }
  errno = saved_errno;
  // Hand the fault on: the previous handler, called as it asked to be; the default one by
  // returning with it restored, so that the access faults again and the process dies of it.
  if ((g_previous.sa_flags & SA_SIGINFO) != 0 && g_previous.sa_sigaction != nullptr) {
    g_previous.sa_sigaction(sig, info, context);
    return;
  }
  if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN &&
      g_previous.sa_handler != nullptr) {
    g_previous.sa_handler(sig);
    return;
  }
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ::sigaction(SIGSEGV, &dfl, nullptr);
}

void install() {
  g_owner.store(::getpid(), std::memory_order_relaxed);
  struct sigaction action {};
  action.sa_sigaction = &on_fault;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGSEGV, &action, &g_previous);
}

}  // namespace

void note_reservation(const void* base, std::size_t bytes) {
  std::call_once(g_installed, install);
  const auto b = reinterpret_cast<std::uintptr_t>(base);
  for (Range& r : g_ranges) {
    std::uintptr_t expected = 0;
    if (r.base.compare_exchange_strong(expected, b, std::memory_order_acq_rel)) {
      r.end.store(b + bytes, std::memory_order_release);
      return;
    }
  }
}

void adopt_reservations() { g_owner.store(::getpid(), std::memory_order_relaxed); }

void forget_reservation(const void* base) {
  const auto b = reinterpret_cast<std::uintptr_t>(base);
  for (Range& r : g_ranges) {
    if (r.base.load(std::memory_order_acquire) == b) {
      r.end.store(0, std::memory_order_release);
      r.base.store(0, std::memory_order_release);
      return;
    }
  }
}

}  // namespace spill::sim

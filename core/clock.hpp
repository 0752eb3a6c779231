// The calling thread's CPU time: what a call cost the host, without the time it spent blocked
// (waiting for a copy or the device).
#pragma once

#include <cstdint>
#include <ctime>

namespace spill {

inline std::uint64_t thread_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return std::uint64_t(ts.tv_sec) * 1'000'000'000u + std::uint64_t(ts.tv_nsec);
}

inline double thread_cpu_s() { return double(thread_cpu_ns()) * 1e-9; }

}  // namespace spill

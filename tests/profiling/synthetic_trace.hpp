// A synthetic training step's trace (forward allocations, swap-outs, stalls and swap-ins in
// backward), for report and exporter tests. Deterministic for a given seed.
#pragma once

#include <random>
#include <vector>

#include "profiling/events.hpp"

namespace spill::profiling::test {

inline TraceEvent make_event(std::uint64_t t, EventKind k, std::uint64_t addr,
                             std::uint64_t bytes, std::uint64_t stream = 0,
                             std::uint64_t dur = 0, std::uint32_t tag = 0) {
  TraceEvent e;
  e.time_ns = t;
  e.kind = k;
  e.address = addr;
  e.bytes = bytes;
  e.stream = stream;
  e.duration_ns = dur;
  e.tag = tag;
  return e;
}

inline std::vector<TraceEvent> synthetic_step(int layers = 12, unsigned seed = 1) {
  std::mt19937_64 rng(seed);
  std::vector<TraceEvent> ev;
  std::uint64_t t = 0;
  auto add = [&](EventKind k, std::uint64_t addr, std::uint64_t bytes, std::uint64_t dur = 0,
                 std::uint64_t stream = 0x100, std::uint32_t tag = 0) {
    ev.push_back(make_event(t, k, addr, bytes, stream, dur, tag));
  };
  std::vector<std::uint64_t> size(layers);
  for (int l = 0; l < layers; ++l) {
    size[l] = (16 + rng() % 48) << 20;
    std::uint64_t addr = 0x7f0000000000ull + (static_cast<std::uint64_t>(l) << 30);
    add(EventKind::Map, addr, size[l]);
    add(EventKind::Alloc, addr, size[l], 0, 0x100, static_cast<std::uint32_t>(l + 1));
    t += 2'000'000;  // 2 ms of forward compute per layer
    if (l >= 2 && l < layers - 2) {
      add(EventKind::HostAlloc, 0x500000000000ull + addr, size[l]);
      add(EventKind::SwapOut, addr, size[l], size[l] / 12, 0x200);  // ~12 GB/s
      t += size[l] / 12;
      add(EventKind::Unmap, addr, size[l]);
    }
  }
  for (int l = layers - 1; l >= 0; --l) {
    std::uint64_t addr = 0x7f0000000000ull + (static_cast<std::uint64_t>(l) << 30);
    if (l >= 2 && l < layers - 2) {
      add(EventKind::Map, addr, size[l]);
      if (l % 3 == 0) add(EventKind::Stall, addr, size[l], 400'000, 0x100);
      add(EventKind::SwapIn, addr, size[l], size[l] / 12, 0x300);
      t += size[l] / 12;
      add(EventKind::HostFree, 0x500000000000ull + addr, size[l]);
    }
    t += 3'000'000;  // backward compute
    add(EventKind::Free, addr, size[l]);
    add(EventKind::Unmap, addr, size[l]);
  }
  return ev;
}

}  // namespace spill::profiling::test

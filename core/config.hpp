// spill's one configuration: a "key:value,key:value" string, parsed once, shared by the C API,
// the CLI (--conf) and the SPILL_CONF environment variable. Unknown keys, repeated keys and
// malformed values are rejected with a message naming them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace spill {

// A mapping granule spill takes (sim_granularity, spill plan --granularity): a power of two
// from 4 KiB to 1 GiB.
inline bool valid_granularity(std::uint64_t g) {
  return g >= 4096 && g <= (1ull << 30) && (g & (g - 1)) == 0;
}

enum class DeviceChoice { Auto, Cuda, Sim };
enum class SwapPolicy { Plan, Lru, None };
enum class PeakGuard { Wait, Idle, Off };
enum class SimQueries { Wall, Simulated };

struct Config {
  DeviceChoice device = DeviceChoice::Auto;  // device: auto | cuda | sim
  int gpu = 0;                               // gpu: CUDA device ordinal
  std::optional<std::uint64_t> budget;       // budget: mapped device bytes (default: free - reserve)
  std::optional<std::uint64_t> host_cap;     // host_cap: pinned host bytes for swapped blocks
  std::uint64_t swap_threshold = 1ull << 20; // swap_threshold: smaller blocks are never swapped
  // (nor small-pool ones: requests up to min(swap_threshold, 1 MiB); allocator.md)
  SwapPolicy policy = SwapPolicy::Plan;      // policy: plan | lru | none
  PeakGuard peak_guard = PeakGuard::Wait;    // peak_guard: wait | idle | off
  bool cache_takeover = true;                // cache_takeover: on | off (prefetches onto cached
                                             // memory: CachingAllocator::reback_from_cache)
  // Simulated device.
  std::uint64_t sim_capacity = 8ull << 30;   // sim_capacity: simulated device memory
  std::uint64_t sim_granularity = 2ull << 20; // sim_granularity: its mapping granule
  std::string link = "pcie4";                // link: preset of the simulated interconnect
  std::optional<double> link_gbps;           // link_gbps: its sustained GB/s each way (override)
  double time_scale = 0.0;                   // time_scale: wall seconds per simulated second
  // sim_queries: wall | simulated (SimOptions::simulated_queries); unset: wall, except for
  // `spill train` (train::run_training), which compares simulated step times and uses simulated.
  std::optional<SimQueries> sim_queries;
  std::optional<std::uint64_t> chaos_seed;   // chaos: off | on | SEED
  // Profiling.
  bool trace = true;                         // trace: on | off (event recording)
  std::string oom_dump;                      // oom_dump: directory for OOM snapshots

  // Parses `text`; `origin` names where it came from in errors (e.g. "SPILL_CONF").
  static Config parse(std::string_view text, std::string_view origin = "configuration");
  // Parses SPILL_CONF when set, else returns defaults.
  static Config from_env();
  // Applies `text` on top of this configuration (later keys win over earlier sources).
  void merge(std::string_view text, std::string_view origin = "configuration");
  // The canonical string form; parse(to_string()) gives an equal Config.
  std::string to_string() const;

  bool operator==(const Config&) const = default;
};

const char* to_string(DeviceChoice d);
const char* to_string(SwapPolicy p);
const char* to_string(PeakGuard g);
const char* to_string(SimQueries q);

}  // namespace spill

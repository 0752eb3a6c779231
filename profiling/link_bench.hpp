// The interconnect benchmark behind `spill bench link`, measured the way nvbandwidth measures:
// the stream is held while many back-to-back copies are enqueued, device events time the batch,
// the median of several samples is reported, and the copied data is checked against a pattern.
// On SimDevice the figures are the link model's (simulated), and are labelled so.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "device/device.hpp"

namespace spill::profiling {

struct LinkBenchOptions {
  std::vector<std::size_t> sizes;            // empty: 4 KiB to 1 GiB in powers of 4
  std::vector<std::string> directions{"h2d", "d2h", "bidir", "d2d"};
  bool pinned = true;
  bool pageable = true;
  int samples = 5;
  std::size_t bytes_per_sample = 256u << 20;  // copies per sample: this / size, within [2, 1000]
};

struct LinkResult {
  std::string direction;    // h2d, d2h, bidir (both at once, total of both), d2d
  std::string host_memory;  // pinned, pageable, or none (d2d)
  std::size_t bytes = 0;    // size of one copy
  int copies = 0;           // back-to-back copies per sample (per direction for bidir)
  double gbps = 0;          // median over samples, GB/s (1e9 B/s)
  double min_gbps = 0, max_gbps = 0;
  bool verified = false;    // destination matched the pattern after every sample
};

struct LinkReport {
  std::string device;
  bool simulated = true;
  std::string link;          // preset or guessed link of the device
  std::string date;          // UTC, ISO 8601
  std::vector<LinkResult> results;

  nlohmann::json to_json() const;
  // Reads a report written by to_json(); throws InvalidArgument naming `source`, the JSON
  // path of the bad field and its rule (core/json_read.hpp).
  static LinkReport from_json(const nlohmann::json& j, std::string_view source = "link report");
  // The median GB/s for one configuration at the largest measured size, or 0 if absent.
  double largest(const std::string& direction, const std::string& host_memory) const;
};

// Sizes 4 KiB, 16 KiB, ..., up to `max_bytes` (powers of 4).
std::vector<std::size_t> default_link_sizes(std::size_t max_bytes = 1ull << 30);

// Runs the benchmark; throws InvalidArgument for bad options and for sizes the device cannot
// hold (checked before any copy), OutOfMemory if buffers do not fit.
LinkReport run_link_bench(Device& device, const LinkBenchOptions& options);
// What run_link_bench refuses without a device (directions, sizes of 0, samples): checked by
// `spill bench link` before it opens one, so nothing is printed before the error.
void check_link_bench_options(const LinkBenchOptions& options);

// A fixed-width table: one row per size, one column per direction and host memory.
std::string format_link_table(const LinkReport& report);

}  // namespace spill::profiling

#include "profiling/link_bench.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <limits>
#include <memory>
#include <sstream>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "core/json_read.hpp"
#include "core/link_model.hpp"
#include "core/pattern.hpp"
#include "core/units.hpp"

namespace spill::profiling {
namespace {

constexpr std::uint64_t kSeed = 0x5ca1ab1e;

// Host and device buffers for one size, freed on scope exit.
class Buffers {
 public:
  Buffers(Device& d, std::size_t bytes, bool pinned, bool need_two_device)
      : d_(d), bytes_(bytes), pinned_(pinned) {
    dev_a_ = d.allocate(bytes);
    if (need_two_device) dev_b_ = d.allocate(bytes);
    if (pinned) {
      host_a_ = static_cast<unsigned char*>(d.allocate_host(bytes));
      host_b_ = static_cast<unsigned char*>(d.allocate_host(bytes));
    } else {
      page_a_.reset(new unsigned char[bytes]);
      page_b_.reset(new unsigned char[bytes]);
      host_a_ = page_a_.get();
      host_b_ = page_b_.get();
    }
    fill_pattern(host_a_, bytes, kSeed);
  }
  ~Buffers() {
    if (pinned_) {
      d_.free_host(host_a_);
      d_.free_host(host_b_);
    }
    d_.deallocate(dev_a_);
    if (dev_b_) d_.deallocate(dev_b_);
  }
  Buffers(const Buffers&) = delete;
  Buffers& operator=(const Buffers&) = delete;

  Device& d_;
  std::size_t bytes_;
  bool pinned_;
  void* dev_a_ = nullptr;
  void* dev_b_ = nullptr;
  unsigned char* host_a_ = nullptr;  // source pattern
  unsigned char* host_b_ = nullptr;  // destination / check buffer
  std::unique_ptr<unsigned char[]> page_a_, page_b_;
};

struct Timing {
  Event start, end;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Copies `copies` times src -> dst on a held stream between two timing events.
void timed_batch(Device& d, Stream s, Timing& t, void* dst, const void* src, std::size_t n,
                 CopyKind kind, int copies) {
  d.record(t.start, s);
  for (int i = 0; i < copies; ++i) d.copy_async(dst, src, n, kind, s);
  d.record(t.end, s);
}

bool device_holds_pattern(Device& d, Stream s, const void* dev, unsigned char* check,
                          std::size_t n) {
  std::fill(check, check + n, 0);
  d.copy_async(check, dev, n, CopyKind::DeviceToHost, s);
  d.synchronize(s);
  return find_pattern_mismatch(check, n, kSeed) == n;
}

class Runner {
 public:
  Runner(Device& d, const LinkBenchOptions& o) : d_(d), o_(o) {
    a_ = d.create_stream();
    b_ = d.create_stream();
    for (Timing* t : {&ta_, &tb_}) {
      t->start = d.create_event(true);
      t->end = d.create_event(true);
    }
  }
  ~Runner() {
    for (Timing* t : {&ta_, &tb_}) {
      d_.destroy_event(t->start);
      d_.destroy_event(t->end);
    }
    d_.destroy_stream(a_);
    d_.destroy_stream(b_);
  }

  LinkResult run(const std::string& dir, bool pinned, std::size_t n) {
    LinkResult r;
    r.direction = dir;
    r.host_memory = dir == "d2d" ? "none" : (pinned ? "pinned" : "pageable");
    r.bytes = n;
    r.copies = static_cast<int>(std::clamp<std::size_t>(o_.bytes_per_sample / n, 2, 1000));
    Buffers buf(d_, n, pinned, dir == "d2d" || dir == "bidir");
    // Seed the device buffer so D2H and D2D copy real data.
    d_.copy_async(buf.dev_a_, buf.host_a_, n, CopyKind::HostToDevice, a_);
    d_.synchronize(a_);
    std::vector<double> gbps;
    r.verified = true;
    for (int s = 0; s < o_.samples; ++s) {
      gbps.push_back(sample(dir, buf, r.copies, r.verified));
    }
    r.gbps = median(gbps);
    r.min_gbps = *std::min_element(gbps.begin(), gbps.end());
    r.max_gbps = *std::max_element(gbps.begin(), gbps.end());
    return r;
  }

 private:
  double sample(const std::string& dir, Buffers& buf, int copies, bool& verified) {
    const std::size_t n = buf.bytes_;
    std::fill(buf.host_b_, buf.host_b_ + n, 0);  // so a copy that did nothing is caught
    // Copies from or to pageable memory are never held: CUDA stages them through its own
    // pinned buffers, and the call can wait for the stream to run it (a D2H one always does),
    // which a held stream never does until the hold times out. Their launch overhead is part
    // of what pageable copies cost anyway.
    const bool hold = buf.pinned_ || dir == "d2d";
    HoldToken ha = hold ? d_.hold(a_) : 0;
    HoldToken hb = 0;
    double bytes_moved = static_cast<double>(n) * copies;
    if (dir == "h2d") {
      timed_batch(d_, a_, ta_, buf.dev_a_, buf.host_a_, n, CopyKind::HostToDevice, copies);
    } else if (dir == "d2h") {
      timed_batch(d_, a_, ta_, buf.host_b_, buf.dev_a_, n, CopyKind::DeviceToHost, copies);
    } else if (dir == "d2d") {
      timed_batch(d_, a_, ta_, buf.dev_b_, buf.dev_a_, n, CopyKind::DeviceToDevice, copies);
    } else {  // bidir: H2D into dev_b on stream a, D2H from dev_a on stream b, at once
      if (hold) hb = d_.hold(b_);
      timed_batch(d_, a_, ta_, buf.dev_b_, buf.host_a_, n, CopyKind::HostToDevice, copies);
      timed_batch(d_, b_, tb_, buf.host_b_, buf.dev_a_, n, CopyKind::DeviceToHost, copies);
      bytes_moved *= 2;
    }
    if (ha) d_.release(ha);
    if (hb) d_.release(hb);
    d_.synchronize(a_);
    d_.synchronize(b_);
    double ms = d_.elapsed_ms(ta_.start, ta_.end);
    if (dir == "bidir") {
      double b_start = d_.elapsed_ms(ta_.start, tb_.start);
      double b_end = d_.elapsed_ms(ta_.start, tb_.end);
      ms = std::max(ms, b_end) - std::min(0.0, b_start);
    }
    // Check the data after the timing, outside the measured interval.
    if (dir == "h2d") verified &= device_holds_pattern(d_, a_, buf.dev_a_, buf.host_b_, n);
    if (dir == "d2h") verified &= find_pattern_mismatch(buf.host_b_, n, kSeed) == n;
    if (dir == "d2d") verified &= device_holds_pattern(d_, a_, buf.dev_b_, buf.host_b_, n);
    if (dir == "bidir") {
      verified &= find_pattern_mismatch(buf.host_b_, n, kSeed) == n;
      verified &= device_holds_pattern(d_, a_, buf.dev_b_, buf.host_b_, n);
    }
    return ms > 0 ? bytes_moved / (ms * 1e-3) / 1e9 : 0.0;
  }

  Device& d_;
  const LinkBenchOptions& o_;
  Stream a_, b_;
  Timing ta_, tb_;
};

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

}  // namespace

std::vector<std::size_t> default_link_sizes(std::size_t max_bytes) {
  std::vector<std::size_t> sizes;
  for (std::size_t s = 4 * KiB; s <= max_bytes; s *= 4) {
    sizes.push_back(s);
    if (s > max_bytes / 4) break;  // the next size would pass max_bytes (or wrap around)
  }
  return sizes;
}

void check_link_bench_options(const LinkBenchOptions& options) {
  SPILL_EXPECTS(options.samples >= 1, "bench link: samples must be at least 1");
  SPILL_EXPECTS(options.pinned || options.pageable,
                "bench link: choose pinned or pageable host memory (or both)");
  for (const std::string& dir : options.directions) {
    SPILL_EXPECTS(dir == "h2d" || dir == "d2h" || dir == "bidir" || dir == "d2d",
                  "bench link: unknown direction '" + dir + "' (use h2d, d2h, bidir, d2d)");
  }
  for (std::size_t s : options.sizes) SPILL_EXPECTS(s > 0, "bench link: sizes must be above zero");
}

LinkReport run_link_bench(Device& device, const LinkBenchOptions& options) {
  check_link_bench_options(options);
  std::vector<std::size_t> sizes = options.sizes.empty() ? default_link_sizes() : options.sizes;
  // Refuse sizes the device cannot hold before running anything: D2D and both directions at
  // once need two device buffers of the size.
  bool two = false;
  for (const std::string& dir : options.directions) two = two || dir == "d2d" || dir == "bidir";
  const std::uint64_t device_bytes = device.info().total_bytes;
  for (std::size_t s : sizes) {
    const std::uint64_t need = saturating_mul(s, two ? 2 : 1);
    SPILL_EXPECTS(need <= device_bytes,
                  "bench link: a copy of " + format_bytes(s) + " needs " + format_bytes(need) +
                      " of device memory" + (two ? " (two buffers for d2d and bidir)" : "") +
                      "; " + device.info().name + " has " + format_bytes(device_bytes));
  }

  LinkReport report;
  report.device = device.info().name;
  report.simulated = device.info().simulated;
  report.link = device.info().link_name;
  report.date = utc_now();
  Runner runner(device, options);
  for (const std::string& dir : options.directions) {
    for (bool pinned : {true, false}) {
      if (dir == "d2d" && !pinned) continue;
      if (dir != "d2d" && !(pinned ? options.pinned : options.pageable)) continue;
      for (std::size_t n : sizes) report.results.push_back(runner.run(dir, pinned, n));
    }
  }
  return report;
}

nlohmann::json LinkReport::to_json() const {
  nlohmann::json rows = nlohmann::json::array();
  for (const LinkResult& r : results) {
    rows.push_back({{"direction", r.direction},
                    {"host_memory", r.host_memory},
                    {"bytes", r.bytes},
                    {"copies", r.copies},
                    {"gbps", r.gbps},
                    {"min_gbps", r.min_gbps},
                    {"max_gbps", r.max_gbps},
                    {"verified", r.verified}});
  }
  return {{"format", "spill-link-bench"},
          {"version", 1},
          {"device", device},
          {"simulated", simulated},
          {"link", link},
          {"date", date},
          {"method", "median of samples; each sample times back-to-back copies between device "
                     "events on a held stream (pageable copies unheld: CUDA may block on them); data "
                     "checked against a pattern"},
          {"results", rows}};
}

LinkReport LinkReport::from_json(const nlohmann::json& j, std::string_view source) {
  const JsonValue top(j, std::string(source));
  LinkReport r;
  r.device = top.string_field("device", std::nullopt, 256);
  r.simulated = top.bool_field("simulated");
  r.link = top.string_field("link", std::string(), 256);
  r.date = top.string_field("date", std::string(), 64);
  const JsonValue rows = top.at("results");
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const JsonValue row = rows.at(i);
    LinkResult x;
    x.direction = row.string_field("direction", std::nullopt, 64);
    x.host_memory = row.string_field("host_memory", std::nullopt, 64);
    x.bytes = row.uint_field("bytes", 1, kMaxBytes);
    x.gbps = row.number_field("gbps", 0, kMaxLinkGbps);
    x.copies = int(row.int_field("copies", 0, std::numeric_limits<int>::max(), 0));
    x.min_gbps = row.number_field("min_gbps", 0, kMaxLinkGbps, x.gbps);
    x.max_gbps = row.number_field("max_gbps", 0, kMaxLinkGbps, x.gbps);
    x.verified = row.bool_field("verified", false);
    r.results.push_back(x);
  }
  return r;
}

double LinkReport::largest(const std::string& direction, const std::string& host_memory) const {
  const LinkResult* best = nullptr;
  for (const LinkResult& r : results) {
    if (r.direction == direction && r.host_memory == host_memory &&
        (best == nullptr || r.bytes > best->bytes))
      best = &r;
  }
  return best ? best->gbps : 0.0;
}

std::string format_link_table(const LinkReport& report) {
  std::vector<std::pair<std::string, std::string>> cols;
  std::vector<std::size_t> sizes;
  for (const LinkResult& r : report.results) {
    std::pair<std::string, std::string> c{r.direction, r.host_memory};
    if (std::find(cols.begin(), cols.end(), c) == cols.end()) cols.push_back(c);
    if (std::find(sizes.begin(), sizes.end(), r.bytes) == sizes.end()) sizes.push_back(r.bytes);
  }
  std::sort(sizes.begin(), sizes.end());
  std::ostringstream out;
  out << (report.simulated ? "simulated (link model " + report.link + ") on "
                           : "measured on ")
      << report.device << ", " << report.date << "; GB/s, median of samples\n";
  char cell[64];
  std::snprintf(cell, sizeof cell, "%-10s", "size");
  out << cell;
  for (auto& [dir, mem] : cols) {
    std::string name = dir + (mem == "none" ? "" : " " + mem);
    std::snprintf(cell, sizeof cell, " %15s", name.c_str());
    out << cell;
  }
  out << "\n";
  for (std::size_t n : sizes) {
    std::snprintf(cell, sizeof cell, "%-10s", format_bytes(n).c_str());
    out << cell;
    for (auto& [dir, mem] : cols) {
      const LinkResult* found = nullptr;
      for (const LinkResult& r : report.results)
        if (r.bytes == n && r.direction == dir && r.host_memory == mem) found = &r;
      if (found) {
        std::snprintf(cell, sizeof cell, " %14.2f%s", found->gbps, found->verified ? " " : "!");
      } else {
        std::snprintf(cell, sizeof cell, " %15s", "-");
      }
      out << cell;
    }
    out << "\n";
  }
  bool all_ok = std::all_of(report.results.begin(), report.results.end(),
                            [](const LinkResult& r) { return r.verified; });
  out << (all_ok ? "data verified for every copy\n"
                 : "'!' marks results whose copied data did NOT match the pattern\n");
  return out.str();
}

}  // namespace spill::profiling

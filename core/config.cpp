#include "core/config.hpp"

#include <cctype>
#include <cstdlib>
#include <functional>
#include <set>
#include <sstream>
#include <vector>

#include "core/errors.hpp"
#include "core/link_model.hpp"
#include "core/units.hpp"

namespace spill {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

[[noreturn]] void bad_value(std::string_view origin, std::string_view key, std::string_view value,
                            std::string_view expected) {
  throw InvalidArgument(std::string(origin) + ": bad value '" + excerpt(value) +
                        "' for key '" + excerpt(key) + "' (expected " +
                        std::string(expected) + ")");
}

// on/true/1 or off/false/0, in any case (as units are: `1GiB`, `1gib`; audit 41a #7: `FALSE`
// was refused, and the message named only on and off).
bool parse_on_off(std::string_view origin, std::string_view key, std::string_view v) {
  std::string lower(v);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (lower == "on" || lower == "true" || lower == "1") return true;
  if (lower == "off" || lower == "false" || lower == "0") return false;
  bad_value(origin, key, v, "on or off; also true or false, 1 or 0");
}

// How a parse helper names the input in its error: the origin and the key.
std::string what(std::string_view origin, std::string_view key) {
  return std::string(origin) + ": key '" + std::string(key) + "'";
}

struct Key {
  std::string_view name;
  std::string_view help;
  std::function<void(Config&, std::string_view origin, std::string_view value)> apply;
};

const std::vector<Key>& keys() {
  static const std::vector<Key> table{
      {"device", "auto | cuda | sim",
       [](Config& c, std::string_view o, std::string_view v) {
         if (v == "auto") c.device = DeviceChoice::Auto;
         else if (v == "cuda") c.device = DeviceChoice::Cuda;
         else if (v == "sim") c.device = DeviceChoice::Sim;
         else bad_value(o, "device", v, "auto, cuda or sim");
       }},
      {"gpu", "CUDA device ordinal",
       [](Config& c, std::string_view o, std::string_view v) {
         std::uint64_t n = parse_uint(v, what(o, "gpu"));
         if (n >= 1024) bad_value(o, "gpu", v, "a device ordinal below 1024");
         c.gpu = static_cast<int>(n);
       }},
      {"budget", "size, e.g. 8GiB",
       [](Config& c, std::string_view o, std::string_view v) {
         c.budget = parse_size(v, what(o, "budget"));
         if (*c.budget == 0) bad_value(o, "budget", v, "a size above zero");
       }},
      {"host_cap", "size, e.g. 64GiB",
       [](Config& c, std::string_view o, std::string_view v) {
         c.host_cap = parse_size(v, what(o, "host_cap"));
       }},
      {"swap_threshold", "size, e.g. 1MiB",
       [](Config& c, std::string_view o, std::string_view v) {
         c.swap_threshold =
             parse_size(v, what(o, "swap_threshold"));
       }},
      {"policy", "plan | lru | none",
       [](Config& c, std::string_view o, std::string_view v) {
         if (v == "plan") c.policy = SwapPolicy::Plan;
         else if (v == "lru") c.policy = SwapPolicy::Lru;
         else if (v == "none") c.policy = SwapPolicy::None;
         else bad_value(o, "policy", v, "plan, lru or none");
       }},
      {"peak_guard", "wait | idle | off",
       [](Config& c, std::string_view o, std::string_view v) {
         if (v == "wait") c.peak_guard = PeakGuard::Wait;
         else if (v == "idle") c.peak_guard = PeakGuard::Idle;
         else if (v == "off") c.peak_guard = PeakGuard::Off;
         else bad_value(o, "peak_guard", v, "wait, idle or off");
       }},
      {"cache_takeover", "on | off",
       [](Config& c, std::string_view o, std::string_view v) {
         c.cache_takeover = parse_on_off(o, "cache_takeover", v);
       }},
      {"sim_capacity", "size of the simulated device",
       [](Config& c, std::string_view o, std::string_view v) {
         c.sim_capacity =
             parse_size(v, what(o, "sim_capacity"));
         if (c.sim_capacity < (2ull << 20)) bad_value(o, "sim_capacity", v, "at least 2MiB");
       }},
      {"sim_granularity", "mapping granule of the simulated device, a power of two, e.g. 64KiB",
       [](Config& c, std::string_view o, std::string_view v) {
         const std::uint64_t g = parse_size(v, what(o, "sim_granularity"));
         if (!valid_granularity(g))
           bad_value(o, "sim_granularity", v, "a power of two from 4KiB to 1GiB");
         c.sim_granularity = g;
       }},
      {"link", "pcie3 | pcie4 | pcie5 | nvlink2-p9 | nvlink-c2c",
       [](Config& c, std::string_view o, std::string_view v) {
         try {
           link_preset(v);
         } catch (const InvalidArgument& e) {
           throw InvalidArgument(std::string(o) + ": key 'link': " + e.what());
         }
         c.link = std::string(v);
       }},
      {"link_gbps", "sustained GB/s each way of the simulated link, e.g. 2",
       [](Config& c, std::string_view o, std::string_view v) {
         const double gbps = parse_number(v, what(o, "link_gbps"));
         if (!(gbps > 0) || gbps > 100000) bad_value(o, "link_gbps", v, "above 0, at most 100000");
         c.link_gbps = gbps;
       }},
      {"time_scale", "wall seconds per simulated second, e.g. 0.01",
       [](Config& c, std::string_view o, std::string_view v) {
         c.time_scale =
             parse_number(v, what(o, "time_scale"));
         if (c.time_scale > 1000) bad_value(o, "time_scale", v, "at most 1000");
       }},
      {"sim_queries", "wall | simulated",
       [](Config& c, std::string_view o, std::string_view v) {
         if (v == "wall") c.sim_queries = SimQueries::Wall;
         else if (v == "simulated") c.sim_queries = SimQueries::Simulated;
         else bad_value(o, "sim_queries", v, "wall or simulated");
       }},
      {"chaos", "off | on | SEED",
       [](Config& c, std::string_view o, std::string_view v) {
         if (v == "off") c.chaos_seed.reset();
         else if (v == "on") c.chaos_seed = 1;
         else {
           // parse_uint's own message ("not a non-negative integer") hid that on and off are
           // accepted too.
           try {
             c.chaos_seed = parse_uint(v, what(o, "chaos"));
           } catch (const InvalidArgument&) {
             bad_value(o, "chaos", v, "off, on or a seed: a non-negative integer");
           }
         }
       }},
      {"trace", "on | off",
       [](Config& c, std::string_view o, std::string_view v) { c.trace = parse_on_off(o, "trace", v); }},
      {"oom_dump", "directory",
       [](Config& c, std::string_view o, std::string_view v) {
         if (v.empty()) bad_value(o, "oom_dump", v, "a directory");
         c.oom_dump = std::string(v);
       }},
  };
  return table;
}

}  // namespace

void Config::merge(std::string_view text, std::string_view origin) {
  std::set<std::string, std::less<>> seen;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    std::size_t comma = text.find(',', pos);
    if (comma == std::string_view::npos) comma = text.size();
    std::string_view item = trim(text.substr(pos, comma - pos));
    std::size_t item_start = pos;
    pos = comma + 1;
    if (item.empty()) continue;
    std::size_t colon = item.find(':');
    if (colon == std::string_view::npos) {
      throw InvalidArgument(std::string(origin) + ": item '" + excerpt(item) + "' at offset " +
                            std::to_string(item_start) + " is not of the form key:value");
    }
    std::string_view key = trim(item.substr(0, colon));
    std::string_view value = trim(item.substr(colon + 1));
    const Key* found = nullptr;
    std::string known;
    for (const Key& k : keys()) {
      if (k.name == key) found = &k;
      known += (known.empty() ? "" : ", ") + std::string(k.name);
    }
    if (found == nullptr) {
      throw InvalidArgument(std::string(origin) + ": unknown key '" + excerpt(key) +
                            "' (known keys: " + known + ")");
    }
    if (!seen.insert(std::string(key)).second) {
      throw InvalidArgument(std::string(origin) + ": key '" + excerpt(key) +
                            "' is given more than once");
    }
    found->apply(*this, origin, value);
  }
}

Config Config::parse(std::string_view text, std::string_view origin) {
  Config c;
  c.merge(text, origin);
  return c;
}

Config Config::from_env() {
  const char* env = std::getenv("SPILL_CONF");
  return env ? parse(env, "SPILL_CONF") : Config{};
}

const char* to_string(DeviceChoice d) {
  switch (d) {
    case DeviceChoice::Auto: return "auto";
    case DeviceChoice::Cuda: return "cuda";
    case DeviceChoice::Sim: return "sim";
  }
  return "?";
}

const char* to_string(SwapPolicy p) {
  switch (p) {
    case SwapPolicy::Plan: return "plan";
    case SwapPolicy::Lru: return "lru";
    case SwapPolicy::None: return "none";
  }
  return "?";
}

const char* to_string(SimQueries q) {
  return q == SimQueries::Simulated ? "simulated" : "wall";
}

const char* to_string(PeakGuard g) {
  switch (g) {
    case PeakGuard::Wait: return "wait";
    case PeakGuard::Idle: return "idle";
    case PeakGuard::Off: return "off";
  }
  return "?";
}

std::string Config::to_string() const {
  std::ostringstream s;
  s << "device:" << spill::to_string(device) << ",gpu:" << gpu;
  if (budget) s << ",budget:" << *budget << "B";
  if (host_cap) s << ",host_cap:" << *host_cap << "B";
  s << ",swap_threshold:" << swap_threshold << "B"
    << ",policy:" << spill::to_string(policy)
    << ",peak_guard:" << spill::to_string(peak_guard)
    << ",cache_takeover:" << (cache_takeover ? "on" : "off")
    << ",sim_capacity:" << sim_capacity << "B"
    << ",sim_granularity:" << sim_granularity << "B"
    << ",link:" << link;
  if (link_gbps) {
    std::ostringstream g;
    g.precision(17);
    g << *link_gbps;
    s << ",link_gbps:" << g.str();
  }
  std::ostringstream ts;
  ts.precision(17);
  ts << time_scale;
  s << ",time_scale:" << ts.str();
  if (sim_queries) s << ",sim_queries:" << spill::to_string(*sim_queries);
  s << ",chaos:" << (chaos_seed ? std::to_string(*chaos_seed) : std::string("off"));
  s << ",trace:" << (trace ? "on" : "off");
  if (!oom_dump.empty()) s << ",oom_dump:" << oom_dump;
  return s.str();
}

}  // namespace spill

// `spill info`: the device chosen, its memory and link, and the configuration in effect.
#include <cstdio>

#include "cli/commands.hpp"
#include "core/errors.hpp"
#include "core/output_file.hpp"
#include "core/units.hpp"
#include "core/version.hpp"
#include "device/select.hpp"

namespace spill::cli {

void add_info(CLI::App& app, Runner& run) {
  CLI::App* cmd = app.add_subcommand("info", "show the device, its memory and link, and the "
                                             "configuration in effect");
  cmd->callback([&run] {
    run = [](const Config& config) {
      // The command one runs to check a configuration: an oom_dump: directory the allocator
      // would refuse at its start is refused here too (audit 38b), creating nothing.
      if (!config.oom_dump.empty()) check_directory_writable(config.oom_dump, "oom_dump");
      DeviceSelection sel = make_device(config);
      Device& dev = *sel.device;
      const DeviceInfo& i = dev.info();
      MemInfo mem = dev.mem_info();
      std::printf("spill %s (CUDA toolkit %s, built for sm %s)\n", kVersion, kCudaToolkitVersion,
                  kCudaArchitectures);
      std::printf("selection:     %s\n", sel.reason.c_str());
      std::printf("device:        %s [%s%s]\n", i.name.c_str(), to_string(i.backend),
                  i.simulated ? ", simulated" : "");
      if (!i.simulated) std::printf("compute cap.:  %d.%d\n", i.cc_major, i.cc_minor);
      std::printf("memory:        %s total, %s free\n", format_bytes(mem.total).c_str(),
                  format_bytes(mem.free).c_str());
      std::printf("granularity:   %s\n", format_bytes(i.granularity).c_str());
      std::printf("link:          %s: %s\n", printable_name(i.link_name).c_str(),
                  printable_name(i.link_description).c_str());
      std::printf("               nominal %.2f GB/s per direction; %s %.1f GB/s h2d, %.1f GB/s "
                  "d2h\n",
                  i.link_nominal_gbps, i.simulated ? "modelled" : "expected", i.h2d_gbps,
                  i.d2h_gbps);
      std::printf("configuration: %s\n", printable_name(config.to_string()).c_str());
      return 0;
    };
  });
}

}  // namespace spill::cli

// The `spill` command: entry point and global options.
#include <cstdio>
#include <exception>

#include "cli/commands.hpp"
#include "core/errors.hpp"
#include "core/version.hpp"

namespace spill::cli {

Config Globals::config() const {
  Config c = Config::from_env();
  if (!conf.empty()) c.merge(conf, "--conf");
  return c;
}

}  // namespace spill::cli

int main(int argc, char** argv) {
  using namespace spill;
  CLI::App app{"spill: train models larger than GPU memory by swapping idle tensors to host"};
  app.set_version_flag("--version", std::string("spill ") + kVersion + " (CUDA toolkit " +
                                        kCudaToolkitVersion + ", sm " + kCudaArchitectures + ")");
  cli::Globals globals;
  app.add_option("--conf", globals.conf,
                 "configuration string, e.g. device:sim,budget:8GiB (applied over SPILL_CONF)");
  app.require_subcommand(1);
  cli::Runner run;
  cli::add_info(app, run);
  cli::add_device_check(app, run);
  cli::add_bench(app, run);
  cli::add_report(app, run);
  cli::add_demo(app, run);
  cli::add_plan(app, run);
  cli::add_train(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return run(globals.config());
  } catch (const InvalidArgument& e) {
    std::fprintf(stderr, "spill: invalid input: %s\n", without_source_location(e.what()).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "spill: error: %s\n", e.what());
    return 1;
  }
}

// The `spill` subcommands. Each registers itself on the CLI11 app and returns the exit code
// through the shared Run state.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

#include "core/config.hpp"

namespace spill::cli {

struct Globals {
  std::string conf;  // --conf, applied over SPILL_CONF
  Config config() const;
};

// Registers a subcommand; `run` receives the merged configuration and returns the exit code.
using Runner = std::function<int(const Config&)>;
void add_info(CLI::App& app, Runner& run);
void add_device_check(CLI::App& app, Runner& run);
void add_bench(CLI::App& app, Runner& run);
void add_report(CLI::App& app, Runner& run);
void add_demo(CLI::App& app, Runner& run);
void add_plan(CLI::App& app, Runner& run);
void add_train(CLI::App& app, Runner& run);

}  // namespace spill::cli

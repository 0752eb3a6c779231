// The `spill` command: entry point and global options.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "cli/commands.hpp"
#include "cli/options.hpp"
#include "core/errors.hpp"
#include "core/version.hpp"

namespace spill::cli {

Config Globals::config() const {
  Config c = Config::from_env();
  if (!conf.empty()) c.merge(conf, "--conf");
  return c;
}

}  // namespace spill::cli

namespace {

// A message about the output given "-" names it as the user did, not by its descriptor's copy.
std::string named_stdout(std::string message) {
  if (spill::cli::stdout_output() < 0) return message;
  const std::string copy = "'/dev/fd/" + std::to_string(spill::cli::stdout_output()) + "'";
  for (auto at = message.find(copy); at != std::string::npos; at = message.find(copy, at))
    message.replace(at, copy.size(), "'-' (standard output)");
  return message;
}

}  // namespace

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
    // Two mistakes CLI11 words vaguely: a command that does not exist ("A subcommand is
    // required") and the global --conf after the command ("arguments were not expected").
    std::vector<std::string> args(argv + 1, argv + argc);
    std::size_t command = args.size();
    for (std::size_t i = 0; i < args.size(); ++i) {
      if (args[i] == "--conf") ++i;  // its value
      else if (args[i].rfind('-', 0) != 0) { command = i; break; }
    }
    if (app.get_subcommands().empty() && command < args.size()) {
      std::string names;
      for (const CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; }))
        names += (names.empty() ? "" : ", ") + sub->get_name();
      std::fprintf(stderr, "spill: unknown command '%s' (commands: %s; see spill --help)\n",
                   printable(args[command]).c_str(), names.c_str());
      return 2;
    }
    // The same for a command's own commands: `spill bench foo` said only "A subcommand is
    // required" (audit 41b #6).
    if (e.get_exit_code() != 0 && app.get_subcommands().size() == 1) {
      CLI::App* cmd = app.get_subcommands().front();
      const auto subs = cmd->get_subcommands([](CLI::App*) { return true; });
      if (!subs.empty() && cmd->get_subcommands().empty()) {
        std::string names;
        for (const CLI::App* sub : subs) names += (names.empty() ? "" : ", ") + sub->get_name();
        const std::string& parent = cmd->get_name();
        auto given = args.begin() + std::ptrdiff_t(std::min(command + 1, args.size()));
        while (given != args.end() && given->rfind('-', 0) == 0) ++given;
        if (given != args.end())
          std::fprintf(stderr, "spill: unknown %s command '%s' (commands: %s; see spill %s "
                               "--help)\n",
                       parent.c_str(), printable(*given).c_str(), names.c_str(), parent.c_str());
        else
          std::fprintf(stderr, "spill: %s needs a command (commands: %s; see spill %s --help)\n",
                       parent.c_str(), names.c_str(), parent.c_str());
        return 2;
      }
    }
    const auto is_conf = [](const std::string& a) {
      return a == "--conf" || a.rfind("--conf=", 0) == 0;
    };
    const bool late_conf =
        command < args.size() &&
        std::any_of(args.begin() + static_cast<std::ptrdiff_t>(command), args.end(), is_conf);
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    // CLI11's own refusals are invalid input as every other: status 2, named as spill's.
    std::fprintf(stderr, "spill: invalid input: %s\n", printable(e.what()).c_str());
    if (late_conf)
      std::fprintf(stderr, "spill: --conf is a global option: give it before the command "
                           "(spill --conf X %s ...)\n", args[command].c_str());
    else
      std::fprintf(stderr, "Run with --help for more information.\n");
    return 2;
  }
  // An output option given "-" writes the standard output (through its copy): the command's
  // own text goes to the error stream instead.
  if (cli::stdout_output() >= 0) {
    std::fflush(stdout);
    ::dup2(2, 1);
  }
  try {
    const int status = run(globals.config());
    // What a command prints is its result: lost to a failing standard output (a full disk,
    // `> /dev/full`), the command failed, though it exited 0 before (audit 40a #11).
    errno = 0;
    const bool flushed = std::fflush(stdout) == 0;
    if (!flushed || std::ferror(stdout)) {
      std::fprintf(stderr, "spill: error: cannot write the standard output: %s\n",
                   !flushed && errno != 0 ? std::strerror(errno) : "an earlier write failed");
      return 1;
    }
    return status;
  } catch (const InvalidArgument& e) {
    std::fprintf(stderr, "spill: invalid input: %s\n",
                 printable(named_stdout(without_source_location(e.what()))).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "spill: error: %s\n", printable(named_stdout(e.what())).c_str());
    return 1;
  }
}

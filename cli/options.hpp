// Checks for the subcommands' integer options: the whole argument a decimal integer within the
// option's range, or an error that names the range and quotes the argument
// ("--batch: expected an integer in [1, 2147483647], got '12abc'"; CLI11's own range check
// called that "not in range" and its conversion error gave no range at all).
#pragma once

#include <CLI/CLI.hpp>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

#include <fcntl.h>
#include <unistd.h>

#include "core/errors.hpp"

namespace spill::cli {

inline CLI::Validator int_in(std::int64_t lo, std::int64_t hi) {
  const std::string range = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  return CLI::Validator(
      [lo, hi, range](std::string& text) -> std::string {
        std::int64_t v = 0;
        const char* end = text.data() + text.size();
        auto [stop, ec] = std::from_chars(text.data(), end, v);
        if (ec == std::errc() && stop == end && v >= lo && v <= hi) return "";
        return "expected an integer in " + range + ", got '" + excerpt(text, 40) + "'";
      },
      "INT in " + range);
}

// The same for a number (a finite decimal, no nan or inf): "expected a percentage in [0, 1000000],
// got '1e400'" (CLI11 printed "not in range 0.000000 to 1000000.000000" and let nan through).
inline CLI::Validator number_in(double lo, double hi, const std::string& what = "a number") {
  char text[64];
  std::snprintf(text, sizeof text, "[%.10g, %.10g]", lo, hi);
  const std::string range = text;
  return CLI::Validator(
      [lo, hi, range, what](std::string& s) -> std::string {
        double v = 0;
        const char* end = s.data() + s.size();
        auto [stop, ec] = std::from_chars(s.data(), end, v);
        if (ec == std::errc() && stop == end && std::isfinite(v) && v >= lo && v <= hi) return "";
        return "expected " + what + " in " + range + ", got '" + excerpt(s, 40) + "'";
      },
      "NUMBER in " + range);
}

// The descriptor standard output was copied to when an output option was given "-" (-1: none
// was). The command's own text then goes to the standard error stream (main moves descriptor 1
// there before the command runs), so that `spill report t.json -o - > r.html` or `spill plan
// mlp --json - | jq` get the file alone.
inline int& stdout_output() {
  static int fd = -1;
  return fd;
}

// What a path given to an output option is called in messages: "standard output" for "-".
inline std::string output_name(const std::string& path) {
  if (stdout_output() >= 0 && path == "/dev/fd/" + std::to_string(stdout_output()))
    return "standard output";
  return printable_name(path);
}

// An output path: an empty one is refused ("--trace: expected a file path, got ''"); left to
// mean "no output", `--trace ""` ran the whole command and wrote nothing (train, demo, plan,
// bench link; report's -o failed after reading the trace). "-" is standard output (written
// through a copy of its descriptor, /dev/fd/N), for one output option at a time.
inline CLI::Validator file_path() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        if (s.empty()) return "expected a file path, got ''";
        if (s != "-") return "";
        if (stdout_output() >= 0)
          return "'-' (standard output) is already another output's: give one of them a file";
        std::fflush(stdout);
        const int fd = ::fcntl(1, F_DUPFD_CLOEXEC, 3);
        if (fd < 0) return "'-': the standard output is not open";
        stdout_output() = fd;
        s = "/dev/fd/" + std::to_string(fd);
        return "";
      },
      "PATH (- for standard output)");
}

}  // namespace spill::cli

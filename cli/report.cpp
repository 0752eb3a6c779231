// `spill report TRACE -o report.html`: a self-contained HTML report from a spill trace.
#include <cstdio>

#include "cli/commands.hpp"
#include "cli/options.hpp"
#include "core/errors.hpp"
#include "core/output_file.hpp"
#include "core/units.hpp"
#include "profiling/chrome_trace.hpp"
#include "profiling/report.hpp"

namespace spill::cli {

void add_report(CLI::App& app, Runner& run) {
  struct Args {
    std::string trace, output = "report.html";
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand(
      "report", "write a self-contained HTML report (memory timeline, steps, top allocations, "
                "swap bandwidth, stalls, fragmentation) from a trace written with --trace");
  cmd->add_option("trace", args->trace, "trace file (Chrome/Perfetto JSON written by spill)")
      ->required();
  cmd->add_option("-o,--output", args->output, "HTML file to write")
      ->capture_default_str()
      ->transform(file_path());
  cmd->callback([&run, args] {
    run = [args](const Config&) {
      check_writable(args->output, "--output");
      check_not_same(args->output, "--output", args->trace, "the trace read");
      profiling::ParsedTrace trace = profiling::read_chrome_trace(args->trace);
      std::string page;
      profiling::ReportSummary s;
      try {
        page = profiling::render_report(trace, args->trace);
        s = profiling::summarize(trace);
      } catch (const InvalidArgument& e) {
        throw InvalidArgument("trace '" + args->trace + "': " + e.what());
      }
      write_file(args->output, page, "--output");
      if (trace.events.empty()) {
        std::printf("%s is empty (no events); wrote %s saying so\n",
                    printable_name(args->trace).c_str(), output_name(args->output).c_str());
      } else {
        std::printf("wrote %s: %zu events over %.3f ms, %zu swap-outs (%s copied to the "
                    "host), %zu swap-ins (%s copied back), %zu evictions (%s, with a copy or "
                    "without), %zu stalls\n",
                    output_name(args->output).c_str(), s.events, s.duration_ms, s.swap_outs,
                    format_bytes(s.swapped_out_bytes).c_str(), s.swap_ins,
                    format_bytes(s.swapped_in_bytes).c_str(), s.evictions,
                    format_bytes(s.evicted_bytes).c_str(), s.stalls);
        if (trace.has_baseline && !(trace.baseline == profiling::MemoryCounters{}))
          std::printf("the trace begins mid-run: its figures start from %s allocated and %s "
                      "mapped then\n",
                      format_bytes(trace.baseline.allocated).c_str(),
                      format_bytes(trace.baseline.mapped).c_str());
        if (trace.baseline_inferred)
          std::printf("the trace seems to begin mid-run (no baseline, it frees what it never "
                      "allocated): its figures are lower bounds\n");
        if (trace.dropped_events > 0)
          std::printf("%llu events were dropped before the trace was written: its figures are "
                      "approximate\n",
                      static_cast<unsigned long long>(trace.dropped_events));
      }
      return 0;
    };
  });
}

}  // namespace spill::cli

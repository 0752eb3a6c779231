// Output files are checked before the work that fills them: a command that runs for minutes must
// not fail at the end because its --json or --trace path cannot be written.
#pragma once

#include <string>
#include <string_view>

namespace spill {

// Throws InvalidArgument "<what>: cannot write '<path>': <reason>" unless `path` can be opened
// for writing. An existing file is left as it is (opened for appending, never truncated); a file
// that did not exist is created and removed again.
void check_writable(const std::string& path, std::string_view what);

}  // namespace spill

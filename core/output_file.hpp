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

// Throws InvalidArgument "<what>: '<path>' is also <other_what> ('<other>'): writing it would
// replace it" when both name one file (links followed; a file not there yet by its path), so
// that `spill report t.json -o t.json` cannot overwrite the trace it reads, nor one output
// another. Empty paths are never the same.
void check_not_same(const std::string& path, std::string_view what, const std::string& other,
                    std::string_view other_what);

// Writes `text` to `path` (replacing it) and checks that every byte reached the file: throws
// InvalidArgument "<what>: cannot write '<path>'" when it cannot be opened, "<what>: writing
// '<path>' failed (disk full?)" when the write or the close fails (/dev/full opens fine).
// A regular file (or a new one) is replaced whole or not at all: the text goes to a temporary
// file beside it (through a symbolic link, beside its target), which is renamed over it once
// written, so a failed write leaves the previous contents. The file keeps its permission bits.
// Devices and pipes are written directly.
void write_file(const std::string& path, std::string_view text, std::string_view what);

}  // namespace spill

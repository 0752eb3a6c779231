// Output files are checked before the work that fills them: a command that runs for minutes must
// not fail at the end because its --json or --trace path cannot be written. Every file spill
// writes goes through write_file (or write_new_file), so a failed write loses nothing.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace spill {

// Throws InvalidArgument "<what>: cannot write '<path>': <reason>" unless `path` can be written.
// An existing file is left as it is (opened for appending, never truncated); a file that did
// not exist is created and removed again (through a symbolic link whose file is not there yet,
// at the link's target: the link stays). A FIFO or device is checked by its permissions alone,
// never opened (closing a FIFO would end its reader), and a path that names one of the
// process's own descriptors (own_descriptor) by the descriptor's access mode.
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
// - A path that names one of the process's own open descriptors (/dev/stdout, /dev/stderr,
//   /dev/fd/N, /proc/self/fd/N, or another name of the file behind descriptor 1 or 2) is
//   written through that descriptor as a stream, after what spill printed there: never
//   reopened, truncated or renamed over (`--json /dev/stdout >> log` appends to the log).
// - Devices, pipes and FIFOs are written directly (opened without truncation). A FIFO waits 5 s
//   at most for a reader: then InvalidArgument "<what>: cannot write '<path>': it is a FIFO
//   with no reader (waited 5 s)", never blocking for ever.
// - A regular file (or a new one) is replaced whole or not at all: the text goes to a temporary
//   file beside it (through a symbolic link, beside its target, also a target not there yet),
//   which is renamed over it once written, so a failed write leaves the previous contents and
//   no temporary. The file keeps its permission bits and, where the process may set them
//   (as root), its owner and group. The name written is a new file: other hard links to the
//   old one keep the old contents.
void write_file(const std::string& path, std::string_view text, std::string_view what);

// Writes `text` to `path`, which must not exist yet: false, and nothing written, when the name
// is taken (also by a symbolic link, which is not followed). Whole or nothing, as write_file
// (written beside it, then linked to its name). For names spill picks itself (OOM dumps).
bool write_new_file(const std::string& path, std::string_view text, std::string_view what);

// Throws InvalidArgument "<what>: '<dir>' <reason>" unless files can be created in `dir`: an
// existing path must be a directory the process may write and search; a missing one must have
// as its nearest existing ancestor such a directory (it is created when first written).
// Beyond the permission bits, a file is created in the directory (a directory in the
// ancestor) under a probe name and removed at once: nothing is left behind. For directories written much later (OOM dumps), so that a mistake in one
// shows when spill starts, not in the message of the first out-of-memory failure.
void check_directory_writable(const std::string& dir, std::string_view what);

// The descriptor that `path` names when it is one of this process's open descriptors:
// /dev/stdin, /dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N, /proc/<own pid>/fd/N, or
// any other path to the file that descriptor 1 or 2 is open on.
std::optional<int> own_descriptor(const std::string& path);

// The path a write through `path` reaches: symbolic links followed to their last target,
// also one that does not exist yet; `path` itself when it is no link.
std::string link_target(const std::string& path);

}  // namespace spill

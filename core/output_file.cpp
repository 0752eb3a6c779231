#include "core/output_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "core/errors.hpp"

namespace spill {

namespace {

// The descriptor number at the end of `path` after `prefix`, or -1.
int descriptor_after(const std::string& path, std::string_view prefix) {
  if (path.size() <= prefix.size() || path.size() > prefix.size() + 9 ||
      path.compare(0, prefix.size(), prefix) != 0)
    return -1;
  int fd = 0;
  for (std::size_t i = prefix.size(); i < path.size(); ++i) {
    if (path[i] < '0' || path[i] > '9') return -1;
    fd = fd * 10 + (path[i] - '0');
  }
  return fd;
}

// Writes all of `text` to `fd`; false (errno set) when a write fails.
bool write_all(int fd, std::string_view text) {
  while (!text.empty()) {
    const ssize_t n = ::write(fd, text.data(), text.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;
      return false;
    }
    text.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

// No room (a full disk, a quota, a file size limit, no file descriptor left) or an I/O error:
// the file or the process, not the input (audit 42b #8: EMFILE was INVALID_ARGUMENT).
bool out_of_room_or_io(int err) {
  return err == ENOSPC || err == EFBIG || err == EDQUOT || err == EIO || err == EMFILE ||
         err == ENFILE;
}

[[noreturn]] void throw_write_failed(const std::string& path, std::string_view what, int err) {
  const std::string message =
      std::string(what) + ": writing '" + path + "' failed (" +
      (err == ENOSPC || err == EFBIG || err == EDQUOT ? std::string("disk full?")
                                                      : std::strerror(err)) +
      ")";
  if (out_of_room_or_io(err)) throw WriteFailed(message);
  throw InvalidArgument(message);
}

// A path that cannot be opened or created: invalid input, unless for lack of room.
[[noreturn]] void throw_cannot_write(const std::string& path, std::string_view what, int err) {
  const std::string message =
      std::string(what) + ": cannot write '" + path + "': " + std::strerror(err);
  if (out_of_room_or_io(err)) throw WriteFailed(message);
  throw InvalidArgument(message);
}

// A regular file that write_file would replace by a new file beside it, where none can be
// made: said so, not with the error as if of the path itself (/proc/version was "No such file
// or directory").
[[noreturn]] void throw_cannot_write_beside(const std::string& path, std::string_view what,
                                            int err) {
  const std::string message = std::string(what) + ": cannot write '" + path +
                              "': no new file can be created beside it to replace it (" +
                              std::strerror(err) + ")";
  if (out_of_room_or_io(err)) throw WriteFailed(message);
  throw InvalidArgument(message);
}

// Writes all of `text` to `fd` and closes it. When the write or the close fails, removes
// `remove_on_failure` (unless empty: a file it made) and throws as throw_write_failed.
void write_and_close(int fd, std::string_view text, const std::string& remove_on_failure,
                     const std::string& path, std::string_view what) {
  const bool written = write_all(fd, text);
  const int err = errno;
  const bool closed = ::close(fd) == 0;
  if (written && closed) return;
  const int why = written ? errno : err;
  if (!remove_on_failure.empty()) ::unlink(remove_on_failure.c_str());
  throw_write_failed(path, what, why);
}

// How long a FIFO's writer waits for a reader: one that is just starting still gets the text,
// and a FIFO nobody reads fails instead of blocking for ever (it blocked while holding a device
// lease, and so spill_shutdown and every other caller with it: audit 42b #2).
constexpr int kFifoWaitMs = 5000;

// A FIFO opened for writing once a reader has it open, waiting kFifoWaitMs at most; blocking
// again once open, so the text is written whole whatever the reader's pace.
int open_fifo(const std::string& path, std::string_view what) {
  for (int waited = 0;; waited += 10) {
    const int fd = ::open(path.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd >= 0) {
      const int flags = ::fcntl(fd, F_GETFL);
      if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
        const int err = errno;
        ::close(fd);
        throw_cannot_write(path, what, err);
      }
      return fd;
    }
    if (errno == EINTR) continue;
    if (errno != ENXIO) throw_cannot_write(path, what, errno);
    if (waited >= kFifoWaitMs)
      throw InvalidArgument(std::string(what) + ": cannot write '" + path +
                            "': it is a FIFO with no reader (waited " +
                            std::to_string(kFifoWaitMs / 1000) + " s)");
    ::usleep(10'000);
  }
}

// A device, pipe or FIFO: opened without truncation and written as a stream.
void write_directly(const std::string& path, std::string_view text, std::string_view what,
                    const struct stat& st) {
  const int fd = S_ISFIFO(st.st_mode) ? open_fifo(path, what)
                                      : ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) throw_cannot_write(path, what, errno);
  write_and_close(fd, text, {}, path, what);
}

// A regular file in a directory that takes no new file (the file itself may be writable).
// Refused before the old content is cut when the file system lacks the room for the new one
// (the old file's blocks come back at the truncation).
void write_in_place(const std::string& path, std::string_view text, std::string_view what,
                    const struct stat& old) {
  struct statvfs fs {};
  if (::statvfs(path.c_str(), &fs) == 0) {
    const unsigned long long room =
        static_cast<unsigned long long>(fs.f_bavail) * fs.f_frsize +
        static_cast<unsigned long long>(old.st_blocks) * 512;
    if (room < text.size()) throw_write_failed(path, what, ENOSPC);
  }
  // open(2), not a stream: a refusal names its reason (audit 42b #7: "cannot write '...'" alone).
  const int fd = ::open(path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
  if (fd < 0) throw_cannot_write(path, what, errno);
  write_and_close(fd, text, {}, path, what);
}

std::atomic<unsigned> next_temporary{0};

// `<target>.tmp-<pid>-<n>`; a name too long to take that suffix (file names end at NAME_MAX,
// 255 bytes) gets `.spill.tmp-<pid>-<n>` in its directory instead (audit 41a #6: valid names of
// 241-255 bytes could not be written, the error blaming the name).
std::string temporary_beside(const std::string& target) {
  const std::string suffix = ".tmp-" + std::to_string(::getpid()) + "-" +
                             std::to_string(next_temporary.fetch_add(1));
  const std::size_t slash = target.rfind('/');
  const std::size_t name = slash == std::string::npos ? target.size() : target.size() - slash - 1;
  if (name + suffix.size() <= NAME_MAX) return target + suffix;
  return target.substr(0, slash == std::string::npos ? 0 : slash + 1) + ".spill" + suffix;
}

// Writes `text` to a new temporary beside `target` made with `mode`; its name, or "" (errno
// set) when the directory takes no new file. A failed write removes it and throws.
std::string write_temporary(const std::string& target, std::string_view text, mode_t mode,
                            const struct stat* keep, const std::string& path,
                            std::string_view what) {
  const std::string temporary = temporary_beside(target);
  const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) return {};
  if (keep != nullptr) {
    // The owner and group first (a change of owner clears set-id bits), when permitted: as
    // root, a user's file stays the user's; otherwise at least its group where we are in it.
    if (::fchown(fd, keep->st_uid, keep->st_gid) != 0) (void)::fchown(fd, -1, keep->st_gid);
    ::fchmod(fd, keep->st_mode & 07777);  // the umask applied at creation must not narrow it
  }
  write_and_close(fd, text, temporary, path, what);
  return temporary;
}

}  // namespace

std::optional<int> own_descriptor(const std::string& path) {
  int fd = -1;
  if (path == "/dev/stdin") fd = 0;
  else if (path == "/dev/stdout") fd = 1;
  else if (path == "/dev/stderr") fd = 2;
  else if ((fd = descriptor_after(path, "/dev/fd/")) < 0 &&
           (fd = descriptor_after(path, "/proc/self/fd/")) < 0 &&
           (fd = descriptor_after(path, "/proc/thread-self/fd/")) < 0)
    fd = descriptor_after(path, "/proc/" + std::to_string(::getpid()) + "/fd/");
  if (fd >= 0) {
    if (::fcntl(fd, F_GETFD) != -1) return fd;
    return std::nullopt;  // not open here: the path names nothing (or another process's)
  }
  // Another name of the file that the standard output or error stream writes to (the log a
  // shell's `>>` opened): written through the stream too, not replaced under it.
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  for (int d : {1, 2}) {
    struct stat s {};
    if (::fstat(d, &s) == 0 && s.st_dev == st.st_dev && s.st_ino == st.st_ino) return d;
  }
  return std::nullopt;
}

std::string link_target(const std::string& path) {
  std::string p = path;
  for (int hops = 0; hops < 40; ++hops) {
    char buf[4096];
    const ssize_t n = ::readlink(p.c_str(), buf, sizeof buf);
    if (n < 0 || n == static_cast<ssize_t>(sizeof buf)) return p;  // not a link (or too long)
    std::string link(buf, static_cast<std::size_t>(n));
    if (link.front() == '/') {
      p = std::move(link);
    } else {
      const auto slash = p.rfind('/');
      p = slash == std::string::npos ? link : p.substr(0, slash + 1) + link;
    }
  }
  return p;  // a loop: what is done with it fails with ELOOP
}

void check_writable(const std::string& path, std::string_view what) {
  auto fail = [&](const char* reason) {
    throw InvalidArgument(std::string(what) + ": cannot write '" + path + "': " + reason);
  };
  if (path.empty()) fail("the path is empty");
  if (const auto fd = own_descriptor(path)) {
    const int flags = ::fcntl(*fd, F_GETFL);
    if (flags < 0 || (flags & O_ACCMODE) == O_RDONLY)
      fail(("descriptor " + std::to_string(*fd) + " is not open for writing").c_str());
    return;
  }
  struct stat st {};
  const bool exists = ::stat(path.c_str(), &st) == 0;
  if (!exists && errno != ENOENT) fail(std::strerror(errno));  // a loop of links, ...
  if (exists) {
    if (S_ISDIR(st.st_mode)) fail("it is a directory");
    if (!S_ISREG(st.st_mode)) {
      // A FIFO, device or socket: not opened here (closing a FIFO would end its reader, and
      // opening one blocks until a reader comes).
      if (::access(path.c_str(), W_OK) != 0) fail(std::strerror(errno));
      return;
    }
    // An existing file is opened for appending: never truncated.
    const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0) throw_cannot_write(path, what, errno);  // (no room: WriteFailed)
    ::close(fd);
    // write_file replaces it by a new file made beside it (a directory that refuses new files
    // for want of permission only has it rewritten in place): that must be possible too
    // (audit 40a #16: /proc/version passed, and the write failed after the whole run).
    const std::string temporary = temporary_beside(link_target(path));
    const int probe = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (probe >= 0) {
      ::close(probe);
      ::unlink(temporary.c_str());
    } else if (errno != EACCES && errno != EPERM) {
      throw_cannot_write_beside(path, what, errno);
    }
    return;
  }
  // A new file: created where the write will create it (through a symbolic link not
  // pointing at a file yet, its target) and removed again; the link stays.
  const std::string target = link_target(path);
  const int fd = ::open(target.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) throw_cannot_write(path, what, errno);  // (no room: WriteFailed)
  ::close(fd);
  ::unlink(target.c_str());
}

void check_directory_writable(const std::string& dir, std::string_view what) {
  auto fail = [&](const std::string& reason) {
    throw InvalidArgument(std::string(what) + ": '" + dir + "' " + reason);
  };
  if (dir.empty()) fail("is empty: name a directory");
  std::error_code ec;
  const std::filesystem::path full = std::filesystem::absolute(dir, ec);
  if (ec) fail("cannot be resolved: " + ec.message());
  std::filesystem::path at = full;
  for (;;) {
    struct stat st {};
    if (::stat(at.c_str(), &st) == 0) {
      const bool itself = at == full;
      if (!S_ISDIR(st.st_mode))
        fail(itself ? std::string("is not a directory")
                    : "cannot be created: '" + at.string() + "' is not a directory");
      if (::access(at.c_str(), W_OK | X_OK) != 0)
        fail(itself ? "is not writable: " + std::string(std::strerror(errno))
                    : "cannot be created in '" + at.string() + "': " + std::strerror(errno));
      // The permission bits are not the whole answer: root passes them on /proc, where
      // nothing can be created. So a file (the directory there) or a directory (one to be
      // created) is made under a name of its own and removed at once: nothing is left, and
      // checks running at once (one per rank) do not meet each other's probes.
      std::string probe = (at / ".spill_probe_XXXXXX").string();
      int err = 0;
      if (itself) {
        const int fd = ::mkstemp(probe.data());
        if (fd < 0) err = errno;
        else {
          ::close(fd);
          ::unlink(probe.c_str());
        }
      } else if (::mkdtemp(probe.data()) == nullptr) {
        err = errno;
      } else {
        ::rmdir(probe.c_str());
      }
      if (err != 0)
        fail(itself ? "is not writable: " + std::string(std::strerror(err))
                    : "cannot be created in '" + at.string() + "': " + std::strerror(err));
      return;
    }
    if (errno != ENOENT && errno != ENOTDIR) fail("cannot be reached: " + std::string(std::strerror(errno)));
    if (!at.has_parent_path() || at.parent_path() == at)
      fail("cannot be created: no directory above it exists");
    at = at.parent_path();
  }
}

void check_not_same(const std::string& path, std::string_view what, const std::string& other,
                    std::string_view other_what) {
  if (path.empty() || other.empty()) return;
  struct stat a {}, b {};
  bool same;
  if (::stat(path.c_str(), &a) == 0 && ::stat(other.c_str(), &b) == 0) {
    same = a.st_dev == b.st_dev && a.st_ino == b.st_ino;
  } else {
    std::error_code ea, eb;
    // Absolute first: a relative path whose file is not there yet has no part that exists
    // (so "s.json" stayed "s.json" while "./s.json" became absolute, and the two differed).
    const auto ca = std::filesystem::weakly_canonical(std::filesystem::absolute(path, ea), ea);
    const auto cb = std::filesystem::weakly_canonical(std::filesystem::absolute(other, eb), eb);
    same = ea || eb ? path == other : ca == cb;
  }
  if (same)
    throw InvalidArgument(std::string(what) + ": '" + path + "' is also " +
                          std::string(other_what) + " ('" + other +
                          "'): writing it would replace it");
}

void write_file(const std::string& path, std::string_view text, std::string_view what) {
  if (const auto fd = own_descriptor(path)) {
    // Written after what spill printed there so far, at the stream's position (appending
    // when the shell opened it with >>), never reopened, truncated or renamed over.
    std::fflush(stdout);
    std::fflush(stderr);
    if (!write_all(*fd, text)) throw_write_failed(path, what, errno);
    return;
  }
  // Through a symbolic link (also one whose file is not there yet), its target is written.
  const std::string target = link_target(path);
  struct stat st {};
  const bool existed = ::stat(target.c_str(), &st) == 0;
  if (!existed && errno != ENOENT)  // a loop of links, a directory that cannot be searched
    throw_cannot_write(path, what, errno);
  if (existed && !S_ISREG(st.st_mode)) return write_directly(path, text, what, st);
  // A new file: 0666 less the umask; a replacement: never wider than the old file, even
  // before its mode is copied (a file only its owner reads stays so throughout).
  const std::string temporary = write_temporary(target, text, existed ? (st.st_mode & 0777) : 0666,
                                                existed ? &st : nullptr, path, what);
  // No temporary: the old file is kept unless only the directory refuses a new file (no
  // write permission there), when it is rewritten in place. A full disk, say, is WriteFailed
  // with the old file whole (it was truncated and cut short before).
  if (temporary.empty()) {
    if (existed && (errno == EACCES || errno == EPERM)) return write_in_place(path, text, what, st);
    if (existed) throw_cannot_write_beside(path, what, errno);
    throw_cannot_write(path, what, errno);
  }
  if (::rename(temporary.c_str(), target.c_str()) != 0) {
    const int err = errno;
    ::unlink(temporary.c_str());
    throw_cannot_write(path, what, err);
  }
}

bool write_new_file(const std::string& path, std::string_view text, std::string_view what) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) return false;
  const std::string temporary = write_temporary(path, text, 0666, nullptr, path, what);
  if (temporary.empty()) throw_cannot_write(path, what, errno);
  // link() neither replaces nor follows anything at its new name: a file or a symbolic link
  // planted there since is kept, and this name is not taken.
  const bool linked = ::link(temporary.c_str(), path.c_str()) == 0;
  const int err = errno;
  ::unlink(temporary.c_str());
  if (linked) return true;
  if (err == EEXIST) return false;
  if (err != EPERM && err != ENOTSUP && err != EOPNOTSUPP && err != ENOSYS)
    throw_cannot_write(path, what, err);
  // A file system without hard links: created exclusively (O_EXCL does not follow a link at
  // the name either) and removed again when its write fails.
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
  if (fd < 0 && errno == EEXIST) return false;
  if (fd < 0) throw_cannot_write(path, what, errno);
  write_and_close(fd, text, path, path, what);
  return true;
}

}  // namespace spill

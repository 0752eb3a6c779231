#include "core/output_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "core/errors.hpp"

namespace spill {

void check_writable(const std::string& path, std::string_view what) {
  auto fail = [&](const char* reason) {
    throw InvalidArgument(std::string(what) + ": cannot write '" + path + "': " + reason);
  };
  if (path.empty()) fail("the path is empty");
  struct stat st {};
  const bool existed = ::stat(path.c_str(), &st) == 0;
  if (existed && S_ISDIR(st.st_mode)) fail("it is a directory");
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) fail(std::strerror(errno));
  ::close(fd);
  if (!existed) ::unlink(path.c_str());
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

namespace {

// Writes all of `text` to `fd`; false (errno set) when a write fails.
bool write_all(int fd, std::string_view text) {
  while (!text.empty()) {
    const ssize_t n = ::write(fd, text.data(), text.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    text.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

void write_in_place(const std::string& path, std::string_view text, std::string_view what) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out.good())
    throw InvalidArgument(std::string(what) + ": cannot write '" + path + "'");
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  out.close();
  if (!out.good())
    throw InvalidArgument(std::string(what) + ": writing '" + path + "' failed (disk full?)");
}

std::atomic<unsigned> next_temporary{0};

}  // namespace

void write_file(const std::string& path, std::string_view text, std::string_view what) {
  struct stat st {};
  const bool existed = ::stat(path.c_str(), &st) == 0;
  if (existed && !S_ISREG(st.st_mode)) return write_in_place(path, text, what);
  std::error_code ec;
  // The link's target is replaced, not the link.
  const std::string target =
      existed ? std::filesystem::canonical(path, ec).string() : path;
  if (ec) return write_in_place(path, text, what);
  const std::string temporary = target + ".tmp-" + std::to_string(::getpid()) + "-" +
                                std::to_string(next_temporary.fetch_add(1));
  const mode_t mode = existed ? (st.st_mode & 07777) : 0666;  // a new file: 0666 less the umask
  int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  // A directory that takes no new file (the file itself may still be writable): in place.
  if (fd < 0) return write_in_place(path, text, what);
  if (existed) ::fchmod(fd, mode);  // the umask applied at creation must not narrow it
  const bool written = write_all(fd, text);
  const bool closed = ::close(fd) == 0;
  if (!written || !closed) {
    ::unlink(temporary.c_str());
    throw InvalidArgument(std::string(what) + ": writing '" + path + "' failed (disk full?)");
  }
  if (::rename(temporary.c_str(), target.c_str()) != 0) {
    const int err = errno;
    ::unlink(temporary.c_str());
    throw InvalidArgument(std::string(what) + ": cannot write '" + path + "': " +
                          std::strerror(err));
  }
}

}  // namespace spill

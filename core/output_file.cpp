#include "core/output_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

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

void write_file(const std::string& path, std::string_view text, std::string_view what) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out.good())
    throw InvalidArgument(std::string(what) + ": cannot write '" + path + "'");
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  out.close();
  if (!out.good())
    throw InvalidArgument(std::string(what) + ": writing '" + path + "' failed (disk full?)");
}

}  // namespace spill

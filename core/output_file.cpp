#include "core/output_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

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

}  // namespace spill

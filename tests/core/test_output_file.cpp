// write_file replaces a file whole or not at all.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "core/errors.hpp"
#include "core/output_file.hpp"

namespace spill {
namespace {

namespace fs = std::filesystem;

std::string read(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A fresh, empty directory for one test.
fs::path fresh_dir(const char* name) {
  fs::path d =
      fs::path(::testing::TempDir()) / (std::string(name) + "-" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

TEST(WriteFile, AFailedWriteKeepsThePreviousContentsAndLeavesNoTemporary) {
  const fs::path dir = fresh_dir("write_file_fails");
  const fs::path file = dir / "graph.json";
  std::ofstream(file) << "previous\n";
  // Writes past RLIMIT_FSIZE fail with EFBIG (SIGXFSZ ignored), as on a full disk.
  struct sigaction ignore {}, old_action {};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGXFSZ, &ignore, &old_action), 0);
  rlimit old {}, small {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  small = old;
  small.rlim_cur = 16;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string message;
  try {
    write_file(file.string(), std::string(4096, 'x'), "--json");
  } catch (const InvalidArgument& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  ::sigaction(SIGXFSZ, &old_action, nullptr);
  EXPECT_NE(message.find("--json: writing '" + file.string() + "' failed"), std::string::npos)
      << message;
  EXPECT_EQ(read(file), "previous\n");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1)
      << "a temporary file was left beside it";
  fs::remove_all(dir);
}

TEST(WriteFile, ReplacesKeepingPermissionsAndWritesThroughALink) {
  const fs::path dir = fresh_dir("write_file_replaces");
  const fs::path file = dir / "out.json";
  std::ofstream(file) << "old";
  ASSERT_EQ(::chmod(file.c_str(), 0640), 0);
  const fs::path link = dir / "link.json";
  fs::create_symlink(file, link);
  write_file(link.string(), "new", "--json");
  EXPECT_TRUE(fs::is_symlink(link)) << "the link stays a link";
  EXPECT_EQ(read(file), "new");
  struct stat st {};
  ASSERT_EQ(::stat(file.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  write_file((dir / "fresh.json").string(), "made", "--json");
  EXPECT_EQ(read(dir / "fresh.json"), "made");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 3);
  fs::remove_all(dir);
}

TEST(WriteFile, DevicesAreWrittenInPlace) {
  if (::access("/dev/full", W_OK) != 0) GTEST_SKIP() << "no /dev/full";
  EXPECT_THROW(write_file("/dev/full", "x", "--trace"), InvalidArgument);
  EXPECT_NO_THROW(write_file("/dev/null", "x", "--trace"));
}

}  // namespace
}  // namespace spill

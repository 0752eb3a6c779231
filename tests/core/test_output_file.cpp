// write_file replaces a file whole or not at all; streams (the process's own descriptors, FIFOs,
// devices) are written as streams; check_writable probes without harm.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "core/errors.hpp"
#include "core/output_file.hpp"
#include "tests/file_size_limit.hpp"

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
  const std::string message = test::with_a_full_disk(
      16, [&] { write_file(file.string(), std::string(4096, 'x'), "--json"); });
  EXPECT_NE(message.find("--json: writing '" + file.string() + "' failed"), std::string::npos)
      << message;
  EXPECT_EQ(read(file), "previous\n");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1)
      << "a temporary file was left beside it";
  fs::remove_all(dir);
}

// An existing file is replaced by a new one made beside it: check_writable tries that too,
// leaving nothing behind, and refuses a file where nothing can be made (audit 40a #16:
// /proc/version, which root may open for appending, passed; the write failed after the run,
// with "No such file or directory").
TEST(CheckWritable, ProbesTheFileBesideAnExistingOne) {
  const fs::path dir = fresh_dir("check_writable_beside");
  const fs::path file = dir / "trace.json";
  std::ofstream(file) << "previous\n";
  EXPECT_NO_THROW(check_writable(file.string(), "--trace"));
  EXPECT_EQ(read(file), "previous\n");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1)
      << "the probe was left beside it";
  fs::remove_all(dir);
  if (::access("/proc/version", F_OK) != 0) GTEST_SKIP() << "no /proc/version";
  try {
    check_writable("/proc/version", "--trace");
    ADD_FAILURE() << "/proc/version passed the check";
  } catch (const InvalidArgument& e) {
    // Not root: it cannot be opened at all. Root: nothing can be made beside it.
    if (::geteuid() == 0) {
      EXPECT_NE(std::string(e.what()).find("no new file can be created beside it"),
                std::string::npos)
          << e.what();
    }
  }
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

// A name of up to 255 bytes (the file system's limit) is written, new and replacing a file: its
// temporary `<name>.tmp-<pid>-<n>` passed the limit and the write failed blaming the name
// (audit 41a #6).
TEST(WriteFile, NamesUpToTheFileSystemsLimitAreWritten) {
  const fs::path dir = fresh_dir("write_file_long_names");
  for (std::size_t length : {240u, 245u, 255u}) {
    const fs::path file = dir / std::string(length, 'n');
    write_file(file.string(), "first", "--json");
    write_file(file.string(), "second", "--json");
    EXPECT_EQ(read(file), "second") << length;
  }
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 3)
      << "no temporary left";
  fs::remove_all(dir);
}

TEST(WriteFile, DevicesAreWrittenInPlace) {
  if (::access("/dev/full", W_OK) != 0) GTEST_SKIP() << "no /dev/full";
  EXPECT_THROW(write_file("/dev/full", "x", "--trace"), WriteFailed);
  EXPECT_NO_THROW(write_file("/dev/null", "x", "--trace"));
}

std::size_t entries(const fs::path& dir) {
  return static_cast<std::size_t>(
      std::distance(fs::directory_iterator(dir), fs::directory_iterator()));
}

ino_t inode(const fs::path& p) {
  struct stat st {};
  EXPECT_EQ(::stat(p.c_str(), &st), 0) << p;
  return st.st_ino;
}

// `--json /dev/stdout >> log` (audit 37b, F8): the log was replaced by a renamed temporary, and
// what spill printed afterwards went to the unlinked old file.
TEST(WriteFile, APathThatNamesAnOwnDescriptorIsWrittenThroughIt) {
  const fs::path dir = fresh_dir("write_file_own_descriptor");
  const fs::path log = dir / "log.txt";
  std::ofstream(log) << "KEEP ME\n";
  const ino_t before = inode(log);
  const int fd = ::open(log.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(own_descriptor("/proc/self/fd/" + std::to_string(fd)), fd);
  EXPECT_NO_THROW(check_writable("/dev/fd/" + std::to_string(fd), "--json"));
  write_file("/dev/fd/" + std::to_string(fd), "one\n", "--json");
  write_file("/proc/self/fd/" + std::to_string(fd), "two\n", "--json");
  write_file("/proc/" + std::to_string(::getpid()) + "/fd/" + std::to_string(fd), "three\n",
             "--json");
  // The standard output redirected to the log (as a shell's >> does): /dev/stdout, and the
  // log's own name, are written through descriptor 1.
  std::fflush(stdout);
  const int saved = ::dup(1);
  ASSERT_GE(saved, 0);
  ASSERT_EQ(::dup2(fd, 1), 1);
  std::printf("printed\n");  // buffered: written before what follows
  std::string error;
  try {
    write_file("/dev/stdout", "four\n", "--json");
    write_file(log.string(), "five\n", "--json");
    check_writable(log.string(), "--json");
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::fflush(stdout);
  ::dup2(saved, 1);
  ::close(saved);
  ::close(fd);
  EXPECT_EQ(error, "");
  EXPECT_EQ(read(log), "KEEP ME\none\ntwo\nthree\nprinted\nfour\nfive\n");
  EXPECT_EQ(inode(log), before) << "the log was replaced";
  EXPECT_EQ(entries(dir), 1u);
  // A descriptor that is not open names nothing; one open for reading only is refused.
  EXPECT_FALSE(own_descriptor("/dev/fd/987654"));
  const int in = ::open(log.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(in, 0);
  EXPECT_THROW(check_writable("/dev/fd/" + std::to_string(in), "--json"), InvalidArgument);
  ::close(in);
  fs::remove_all(dir);
}

// A symbolic link to a file not there yet (audit 37b, F7): check_writable removed the link and
// left an empty file at its target; write_file then replaced the link by a regular file.
TEST(WriteFile, ALinkToAFileNotThereYetIsWrittenThroughAndKept) {
  const fs::path dir = fresh_dir("write_file_dangling_link");
  const fs::path link = dir / "out.html";
  fs::create_symlink("target.html", link);  // relative: beside the link
  check_writable(link.string(), "--output");
  EXPECT_TRUE(fs::is_symlink(link)) << "check_writable removed the link";
  EXPECT_FALSE(fs::exists(dir / "target.html")) << "check_writable left a file at the target";
  write_file(link.string(), "report", "--output");
  EXPECT_TRUE(fs::is_symlink(link));
  EXPECT_EQ(read(dir / "target.html"), "report");
  EXPECT_EQ(entries(dir), 2u);
  // A loop of links is refused naming why.
  fs::create_symlink("loop_b", dir / "loop_a");
  fs::create_symlink("loop_a", dir / "loop_b");
  EXPECT_THROW(check_writable((dir / "loop_a").string(), "--output"), InvalidArgument);
  EXPECT_THROW(write_file((dir / "loop_a").string(), "x", "--output"), InvalidArgument);
  EXPECT_TRUE(fs::is_symlink(dir / "loop_a"));
  fs::remove_all(dir);
}

// A named FIFO (audit 37b, F9): check_writable opened and closed it, which ended its reader
// (EOF), and the real write then blocked for ever with no reader.
TEST(WriteFile, AFifoIsNotOpenedByTheCheckAndIsWrittenAsAStream) {
  const fs::path dir = fresh_dir("write_file_fifo");
  const fs::path fifo = dir / "out";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const int reader = ::open(fifo.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  ASSERT_GE(reader, 0);
  check_writable(fifo.string(), "--output");
  pollfd p{reader, POLLIN, 0};
  ASSERT_GE(::poll(&p, 1, 0), 0);
  EXPECT_EQ(p.revents & POLLHUP, 0) << "a writer came and went: the reader saw the end";
  write_file(fifo.string(), "streamed", "--output");
  char buf[64] = {};
  EXPECT_EQ(::read(reader, buf, sizeof buf), 8);
  EXPECT_EQ(std::string(buf), "streamed");
  ::close(reader);
  EXPECT_TRUE(fs::is_fifo(fifo));
  fs::remove_all(dir);
}

// Replacing a file as root (audit 37b, F10) made a user's file root's.
TEST(WriteFile, ReplacingAFileKeepsItsOwnerAndGroup) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to give a file to another user";
  const fs::path dir = fresh_dir("write_file_owner");
  const fs::path file = dir / "owned.html";
  std::ofstream(file) << "old";
  ASSERT_EQ(::chown(file.c_str(), 65534, 65534), 0);
  ASSERT_EQ(::chmod(file.c_str(), 0640), 0);
  write_file(file.string(), "new", "--output");
  struct stat st {};
  ASSERT_EQ(::stat(file.c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 65534u);
  EXPECT_EQ(st.st_gid, 65534u);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  EXPECT_EQ(read(file), "new");
  fs::remove_all(dir);
}

TEST(WriteNewFile, NeverReplacesNorFollowsWhatIsThere) {
  const fs::path dir = fresh_dir("write_new_file");
  const fs::path file = dir / "dump.json";
  EXPECT_TRUE(write_new_file(file.string(), "first", "OOM dump"));
  EXPECT_FALSE(write_new_file(file.string(), "second", "OOM dump"));
  EXPECT_EQ(read(file), "first");
  const fs::path planted = dir / "planted.json";
  fs::create_symlink(dir / "victim.json", planted);
  EXPECT_FALSE(write_new_file(planted.string(), "x", "OOM dump"));
  EXPECT_FALSE(fs::exists(dir / "victim.json"));
  EXPECT_EQ(entries(dir), 2u) << "a temporary was left";
  fs::remove_all(dir);
}

}  // namespace
}  // namespace spill

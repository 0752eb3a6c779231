// Writes past a few bytes fail while a FileSizeLimit lives, as on a full disk: RLIMIT_FSIZE is
// lowered (writes past it fail with EFBIG) and SIGXFSZ ignored, or handled by a function of the
// test's (one that holds the writer where it is). Both come back at lift() or its end.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <exception>
#include <string>

#include "core/errors.hpp"

namespace spill::test {

class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes, void (*on_signal)(int) = SIG_IGN) {
    struct sigaction action {};
    action.sa_handler = on_signal;
    ok_ = ::sigaction(SIGXFSZ, &action, &old_action_) == 0 &&
          ::getrlimit(RLIMIT_FSIZE, &old_) == 0;
    rlimit small = old_;
    small.rlim_cur = bytes;
    ok_ = ok_ && ::setrlimit(RLIMIT_FSIZE, &small) == 0;
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;
  ~FileSizeLimit() { lift(); }

  // Whether the limit is in place (ASSERT it before relying on it).
  bool ok() const { return ok_; }

  void lift() {
    if (lifted_) return;
    lifted_ = true;
    ::setrlimit(RLIMIT_FSIZE, &old_);
    ::sigaction(SIGXFSZ, &old_action_, nullptr);
  }

 private:
  struct sigaction old_action_ {};
  rlimit old_ {};
  bool ok_ = false;
  bool lifted_ = false;
};

// Runs `write` with writes past `bytes` failing (EFBIG, as on a full disk); the message of what
// it threw ("" when it threw nothing).
template <class F>
std::string with_a_full_disk(rlim_t bytes, F write) {
  FileSizeLimit limit(bytes);
  EXPECT_TRUE(limit.ok());
  try {
    write();
  } catch (const WriteFailed& e) {
    return e.what();
  } catch (const std::exception& e) {  // invalid input, say: not what a full disk is
    ADD_FAILURE() << "a full disk should throw WriteFailed, not: " << e.what();
    return e.what();
  }
  return "";
}

}  // namespace spill::test

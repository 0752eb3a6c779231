// The C header from C++: it compiles with the C++ compiler's warnings, its calls work, and a
// C++ exception thrown by a failure handler passes through spill_torch_malloc (which is how a
// C++ shim may turn spill's OOM into its framework's exception).
#include <gtest/gtest.h>
#include <spill/spill.h>

#include <stdexcept>
#include <string>

namespace {

struct FrameworkOom : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void throw_oom(spill_status status, size_t size, int, const char* message, void*) {
  throw FrameworkOom(std::string(spill_status_string(status)) + " for " +
                     std::to_string(size) + " bytes: " + message);
}

TEST(CHeader, WorksFromCpp) {
  ASSERT_EQ(spill_init("device:sim,sim_capacity:256MiB,budget:64MiB"), SPILL_OK);
  void* p = nullptr;
  ASSERT_EQ(spill_malloc(&p, 1 << 20, 0, nullptr), SPILL_OK);
  spill_pin_token t{};
  EXPECT_EQ(spill_pin(p, nullptr, &t), SPILL_OK);
  EXPECT_EQ(spill_unpin(&t, nullptr, 1), SPILL_OK);
  EXPECT_EQ(spill_free(p, 0, nullptr), SPILL_OK);
  EXPECT_EQ(spill_shutdown(), SPILL_OK);
}

TEST(CHeader, AHandlerMayThrowThroughTorchMalloc) {
  ASSERT_EQ(spill_init("device:sim,sim_capacity:256MiB,budget:64MiB"), SPILL_OK);
  ASSERT_EQ(spill_set_oom_handler(throw_oom, nullptr), SPILL_OK);
  try {
    spill_torch_malloc(ssize_t{1} << 40, 0, nullptr);
    FAIL() << "expected the handler's exception";
  } catch (const FrameworkOom& e) {
    EXPECT_NE(std::string(e.what()).find("out of memory for 1099511627776 bytes"), std::string::npos)
        << e.what();
  }
  // spill is unharmed: no lease or lock was left behind.
  void* p = spill_torch_malloc(4096, 0, nullptr);
  ASSERT_NE(p, nullptr);
  spill_torch_free(p, 4096, 0, nullptr);
  EXPECT_EQ(spill_set_oom_handler(nullptr, nullptr), SPILL_OK);
  EXPECT_EQ(spill_shutdown(), SPILL_OK);
}

}  // namespace

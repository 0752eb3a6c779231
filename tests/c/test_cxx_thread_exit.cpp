/* The C API from C++ destructors that run at a thread's or the process's end: a thread_local
 * object (a per-thread buffer cache, an RAII handle) or a static object whose destructor calls
 * spill after spill's own per-thread state would have gone. Every test runs in its own
 * process on the simulated device. */
#include "c_test.h"

#include <atomic>
#include <cstdint>
#include <thread>

#define CONF "device:sim,sim_capacity:1GiB,budget:64MiB,trace:off"

/* ---- failing calls from destructors at a thread's or the process's end (audit 29b #1) */

namespace {

/* An input whose error message is longer than the first failure's, so that a message stored
 * in a destroyed std::string (as before) had to reallocate it: a double free, an abort. */
const char* long_size() {
  static char text[300];
  if (text[0] == '\0') {
    memset(text, 'x', sizeof text - 1);
    memcpy(text, "not-a-size-", 11);
  }
  return text;
}

/* The thread's first failing call: a short message. */
void fail_briefly() {
  uint64_t budget = 0;
  CHECK_STATUS(spill_get_budget(99, &budget), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("device 99");
}

/* A failing call whose message must come back whole. */
bool fails_with_its_message() {
  uint64_t bytes = 0;
  return spill_parse_size(long_size(), &bytes) == SPILL_ERROR_INVALID_ARGUMENT &&
         strstr(spill_last_error(), "'not-a-size-xxx") != NULL &&
         strstr(spill_last_error(), "(299 characters)") != NULL;
}

std::atomic<int> holder_saw{0}; /* 1: the message came back; 2: the free worked too */

/* An RAII holder of a block, made before the thread's first failing spill call. */
struct Holder {
  void* p = nullptr;
  ~Holder() {
    if (p == nullptr) return;
    if (fails_with_its_message()) holder_saw = 1;
    if (holder_saw == 1 && spill_free(p, 0, NULL) == SPILL_OK) holder_saw = 2;
  }
};
thread_local Holder holder;

/* A static object whose destructor calls spill at exit, after the main thread's
 * thread_locals were destroyed (glibc runs those first). It ends the process with status 3
 * when the call's message did not come back. */
struct AtExit {
  bool armed = false;
  ~AtExit() {
    if (!armed) return;
    if (!fails_with_its_message()) {
      fprintf(stderr, "at exit: spill_last_error() is '%s'\n", spill_last_error());
      _exit(3);
    }
  }
};
AtExit at_exit;

}  // namespace

/* Before, the thread's message was a thread_local std::string made at its first failing call
 * and so destroyed before the holder: the holder's failing call wrote into the freed string
 * (free(): double free detected in tcache 2, or silent heap corruption). */
TEST(a_failing_call_in_a_thread_local_destructor) {
  REQUIRE_OK(spill_init(CONF));
  std::thread t([] {
    REQUIRE_OK(spill_malloc(&holder.p, 1 << 20, 0, NULL)); /* the holder exists from here */
    fail_briefly();
  });
  t.join();
  CHECK(holder_saw.load() == 2);
  spill_stats st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  CHECK_OK(spill_get_stats(0, &st));
  CHECK(st.allocated_bytes == 0); /* the holder's free went through */
  CHECK_OK(spill_shutdown());
}

/* The same on the main thread at exit (before: the same double free, or with a shorter
 * message silent heap corruption during exit). */
TEST(a_failing_call_in_a_static_destructor_at_exit) {
  REQUIRE_OK(spill_init(CONF));
  fail_briefly(); /* the main thread's first failing call, before exit */
  at_exit.armed = true;
}

#define TESTS(X)                                 \
  X(a_failing_call_in_a_thread_local_destructor) \
  X(a_failing_call_in_a_static_destructor_at_exit)

C_TEST_MAIN(TESTS)

/* The C API from C++ destructors that run at a thread's or the process's end: a thread_local
 * object (a per-thread buffer cache, an RAII handle) or a static object whose destructor calls
 * spill after spill's own per-thread state would have gone. Every test runs in its own
 * process on the simulated device. */
#include "c_test.h"

#include <dirent.h>

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
         strstr(spill_last_error(), "(299 bytes)") != NULL;
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

/* ---- a thread_local destructor's calls beside a new thread's (audit 29b #2) */

namespace {

int thread_count() {
  DIR* d = opendir("/proc/self/task");
  REQUIRE(d != NULL);
  int n = 0;
  while (readdir(d) != NULL) ++n;
  closedir(d);
  return n - 2; /* . and .. */
}

std::atomic<int> phase{0};
void* keep = nullptr;
std::atomic<long> errors{0};

/* Calls that lease device 0 and find `keep` by pointer, over and over; counts failures. */
void use_spill(const char* who, int rounds) {
  for (int i = 0; i < rounds; ++i) {
    char* json = NULL;
    const spill_status s1 = spill_stats_json(0, &json);
    spill_string_free(json);
    spill_residence r;
    const spill_status s2 = spill_get_residence(keep, &r);
    if ((s1 != SPILL_OK || s2 != SPILL_OK) && errors++ < 3)
      fprintf(stderr, "%s: spill_stats_json %d, spill_get_residence %d: %s\n", who, s1, s2,
              spill_last_error());
  }
}

/* Made before the thread's first spill call, so destroyed after spill's own thread_locals of
 * that thread: its destructor runs while a thread started meanwhile calls spill too. */
struct Cache {
  bool used = false;
  ~Cache() {
    if (!used) return;
    phase = 1;
    while (phase.load() != 2) std::this_thread::yield(); /* the new thread has called spill */
    use_spill("thread_local destructor", 10000);
  }
};
thread_local Cache cache;

}  // namespace

/* Before, the ending thread's lease record was handed back before such a destructor ran, the
 * new thread took it, and the two wrote one lease stack: calls failed ("has no runtime yet",
 * "a new runtime vanished"), runtimes were made over the live one (its blocks forgotten, three
 * threads leaked each), and `keep` could no longer be freed. The two threads' calls overlap by
 * chance, so the test gives them three rounds of 10000 calls each (before the fix it failed
 * 10 runs in 10). */
TEST(thread_local_destructor_beside_a_new_thread) {
  REQUIRE_OK(spill_init(CONF));
  REQUIRE_OK(spill_malloc(&keep, 8 << 20, 0, NULL));
  const int threads_before = thread_count();
  for (int round = 0; round < 3; ++round) {
    phase = 0;
    std::thread a([] {
      cache.used = true; /* constructed before this thread's first spill call */
      uint64_t budget = 0;
      REQUIRE_OK(spill_get_budget(0, &budget));
    });
    while (phase.load() != 1) std::this_thread::yield(); /* a is in Cache's destructor */
    std::thread b([] {
      uint64_t budget = 0;
      REQUIRE_OK(spill_get_budget(0, &budget));
      phase = 2;
      use_spill("new thread", 10000);
    });
    a.join();
    b.join();
  }
  CHECK(errors.load() == 0);
  CHECK(thread_count() == threads_before); /* no runtime was made beside device 0's */
  spill_stats st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  CHECK_OK(spill_get_stats(0, &st));
  CHECK(st.allocated_bytes == 8u << 20); /* the same runtime, keep still counted */
  CHECK_OK(spill_free(keep, 0, NULL));
  CHECK_OK(spill_shutdown());
}

#define TESTS(X)                                   \
  X(a_failing_call_in_a_thread_local_destructor)   \
  X(a_failing_call_in_a_static_destructor_at_exit) \
  X(thread_local_destructor_beside_a_new_thread)

C_TEST_MAIN(TESTS)

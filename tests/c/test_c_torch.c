/* PyTorch's pluggable-allocator entry points, called from C as PyTorch calls them: size 0,
 * failures through the handler (PyTorch never checks for NULL), frees that cannot report. */
#define _POSIX_C_SOURCE 200809L
#include "c_test.h"

#include <signal.h>
#include <stdint.h>

#define CONF "device:sim,sim_capacity:1GiB,budget:256MiB"

TEST(malloc_free_and_size_zero) {
  REQUIRE_OK(spill_init(CONF));
  spill_torch_init(1);
  void* p = spill_torch_malloc(1000, 0, NULL);
  REQUIRE(p != NULL);
  memset(p, 1, 1000);
  void* big = spill_torch_malloc(10 << 20, 0, NULL);
  REQUIRE(big != NULL);
  CHECK(spill_torch_malloc(0, 0, NULL) == NULL); /* as PyTorch's own allocator */
  spill_torch_free(NULL, 0, 0, NULL);
  void* s = NULL;
  REQUIRE_OK(spill_stream_create(0, &s));
  spill_torch_record_stream(p, s);
  spill_torch_free(p, 1000, 0, NULL);
  spill_torch_free(big, 10 << 20, 0, NULL);
  spill_stats st;
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.allocations == 2 && st.frees == 2 && st.free_errors == 0);
  CHECK(st.cached_bytes > 0);
  spill_torch_reset(); /* PyTorch's empty_cache */
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.cached_bytes == 0);
  REQUIRE_OK(spill_stream_destroy(0, s));
}

static int handler_calls;
static spill_status handler_status;
static size_t handler_size;
static int handler_device;
static char handler_message[512];
static void* handler_user;

static void record_failure(spill_status status, size_t size, int device, const char* message,
                           void* user) {
  handler_calls++;
  handler_status = status;
  handler_size = size;
  handler_device = device;
  snprintf(handler_message, sizeof handler_message, "%s", message);
  handler_user = user;
}

TEST(failures_go_to_the_handler) {
  REQUIRE_OK(spill_init(CONF));
  int user = 42;
  REQUIRE_OK(spill_set_oom_handler(record_failure, &user));
  CHECK(spill_torch_malloc((ssize_t)1 << 40, 0, NULL) == NULL);
  CHECK(handler_calls == 1);
  CHECK(handler_status == SPILL_ERROR_OUT_OF_MEMORY);
  CHECK(handler_size == (size_t)1 << 40);
  CHECK(handler_device == 0);
  CHECK(handler_user == &user);
  CHECK(strstr(handler_message, "budget") != NULL);
  CHECK(strcmp(handler_message, spill_last_error()) == 0);
  CHECK(spill_torch_malloc(-5, 0, NULL) == NULL);
  CHECK(handler_calls == 2 && handler_status == SPILL_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(handler_message, "-5") != NULL);
  CHECK(spill_torch_malloc(64, -1, NULL) == NULL);
  CHECK(handler_calls == 3 && handler_status == SPILL_ERROR_INVALID_ARGUMENT);
  REQUIRE_OK(spill_shutdown());
  CHECK(spill_torch_malloc(64, 0, NULL) == NULL);
  CHECK(handler_calls == 4 && handler_status == SPILL_ERROR_SHUT_DOWN);
}

/* Without a handler, a failure aborts with the message (a NULL would fault later). */
/* A handler that empties the cache and retries: the retry's failure returns NULL instead of
 * calling the handler again (it recursed until the stack overflowed, audit 42b #5). */
static int retry_calls;
static void* retried;
static void empty_and_retry(spill_status status, size_t size, int device, const char* message,
                            void* user) {
  (void)status, (void)message, (void)user;
  retry_calls++;
  spill_empty_cache(device);
  retried = spill_torch_malloc((ssize_t)size, device, NULL);
}

TEST(the_handler_is_not_reentered_by_a_failing_retry) {
  REQUIRE_OK(spill_init(CONF));
  REQUIRE_OK(spill_set_oom_handler(empty_and_retry, NULL));
  retried = (void*)1;
  CHECK(spill_torch_malloc((ssize_t)1 << 40, 0, NULL) == NULL);
  CHECK(retry_calls == 1);
  CHECK(retried == NULL);
  CHECK(strstr(spill_last_error(), "budget") != NULL); /* the retry's reason */
  /* Only while it runs: the next failure calls it again, and a retry that works returns. */
  CHECK(spill_torch_malloc((ssize_t)1 << 40, 0, NULL) == NULL);
  CHECK(retry_calls == 2);
  void* p = spill_torch_malloc(4096, 0, NULL);
  CHECK(p != NULL);
  spill_torch_free(p, 4096, 0, NULL);
  REQUIRE_OK(spill_set_oom_handler(NULL, NULL));
}

TEST(default_handler_aborts) {
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    if (spill_init(CONF) != SPILL_OK) _exit(2);
    spill_torch_malloc((ssize_t)1 << 40, 0, NULL);
    _exit(0); /* not reached */
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT);
  /* NULL restores the default after a custom handler. */
  REQUIRE_OK(spill_set_oom_handler(record_failure, NULL));
  REQUIRE_OK(spill_set_oom_handler(NULL, NULL));
}

TEST(frees_that_fail_are_counted) {
  REQUIRE_OK(spill_init(CONF));
  void* p = spill_torch_malloc(4096, 0, NULL);
  REQUIRE(p != NULL);
  int local = 0;
  spill_torch_free(&local, 4, 0, NULL); /* cannot return an error */
  CHECK(strstr(spill_last_error(), c_test_address(&local)) != NULL);
  spill_torch_free(p, 4096, 0, NULL);
  spill_torch_free(p, 4096, 0, NULL); /* double free */
  spill_stats st;
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.free_errors == 2);
  CHECK(st.frees == 1);
  /* After shutdown the block is gone with everything else: silent. */
  p = spill_torch_malloc(4096, 0, NULL);
  REQUIRE_OK(spill_shutdown());
  spill_torch_free(p, 4096, 0, NULL);
}

TEST(memory_fraction_sets_the_budget) {
  REQUIRE_OK(spill_init(CONF));
  spill_torch_set_memory_fraction(0.5, 0);
  uint64_t budget = 0;
  REQUIRE_OK(spill_get_budget(0, &budget));
  CHECK(budget == 512u << 20); /* half of the 1 GiB simulated device */
  spill_torch_set_memory_fraction(1.5, 0);
  CHECK(strstr(spill_last_error(), "1.5") != NULL);
  spill_torch_set_memory_fraction(0.0, 0);
  REQUIRE_OK(spill_get_budget(0, &budget));
  CHECK(budget == 512u << 20); /* unchanged */
}

#define TESTS(X)                \
  X(malloc_free_and_size_zero)  \
  X(failures_go_to_the_handler) \
  X(the_handler_is_not_reentered_by_a_failing_retry) \
  X(default_handler_aborts)     \
  X(frees_that_fail_are_counted) \
  X(memory_fraction_sets_the_budget)

C_TEST_MAIN(TESTS)

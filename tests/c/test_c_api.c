/* The C API from C: lifecycle, errors (one test per bad input), streams, malloc/free,
 * record_stream, budget, stats, snapshot and trace, fork children. Every test runs in its own
 * process on the simulated device. */
#define _POSIX_C_SOURCE 200809L
#include "c_test.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>

#define CONF "device:sim,sim_capacity:1GiB,budget:256MiB"

/* The number after "key": in a flat JSON object (spill_stats_json); -1 when the key is absent. */
static double json_number(const char* json, const char* key) {
  char quoted[128];
  snprintf(quoted, sizeof quoted, "\"%s\":", key);
  const char* at = strstr(json, quoted);
  return at == NULL ? -1 : strtod(at + strlen(quoted), NULL);
}

TEST(version_and_status_strings) {
  const char* v = spill_version();
  REQUIRE(v != NULL);
  int major = -1, minor = -1, patch = -1;
  spill_version_numbers(&major, &minor, &patch);
  char built[64];
  snprintf(built, sizeof built, "%d.%d.%d", major, minor, patch);
  CHECK(strcmp(built, v) == 0);
  spill_version_numbers(NULL, NULL, NULL); /* any pointer may be NULL */
  const spill_status codes[] = {SPILL_OK, SPILL_ERROR_INVALID_ARGUMENT, SPILL_ERROR_OUT_OF_MEMORY,
                                SPILL_ERROR_HOST_CAP, SPILL_ERROR_CUDA, SPILL_ERROR_SHUT_DOWN,
                                SPILL_ERROR_FORKED_CHILD, SPILL_ERROR_ALREADY_INITIALIZED,
                                SPILL_ERROR_NOT_FOUND, SPILL_ERROR_WRITE_FAILED,
                                SPILL_ERROR_INTERNAL};
  for (size_t i = 0; i < sizeof codes / sizeof codes[0]; ++i) {
    CHECK(spill_status_string(codes[i]) != NULL);
    for (size_t j = 0; j < i; ++j) CHECK(strcmp(spill_status_string(codes[i]), spill_status_string(codes[j])) != 0);
  }
  CHECK(strcmp(spill_status_string((spill_status)12345), "unknown status") == 0);
  CHECK(strcmp(spill_last_error(), "") == 0);
}

TEST(parse_size) {
  uint64_t bytes = 7;
  CHECK_OK(spill_parse_size("8GiB", &bytes));
  CHECK(bytes == 8ull << 30);
  CHECK_OK(spill_parse_size("1.5MiB", &bytes));
  CHECK(bytes == 3ull << 19);
  CHECK_OK(spill_parse_size("2GB", &bytes));
  CHECK(bytes == 2000000000ull);
  bytes = 7;
  CHECK_STATUS(spill_parse_size("8 parsecs", &bytes), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("8 parsecs");
  /* Invalid input is named, not the line of spill's code that noticed it ("[units.cpp:58]"). */
  CHECK(strstr(spill_last_error(), ".cpp:") == NULL);
  CHECK(bytes == 7); /* unchanged */
  CHECK_STATUS(spill_parse_size("16EiB", &bytes), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(spill_parse_size(NULL, &bytes), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(spill_parse_size("1GiB", NULL), SPILL_ERROR_INVALID_ARGUMENT);
}

/* Nothing can be swapped out when the host cap leaves no room: the OOM says so (it used to ask
 * whether the swapper was enabled). */
TEST(oom_names_a_full_host_cap) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:256MiB,budget:16MiB,host_cap:0"));
  void* stream = NULL;
  REQUIRE_OK(spill_stream_create(0, &stream));
  void* p[4];
  for (int i = 0; i < 4; ++i) {
    REQUIRE_OK(spill_malloc(&p[i], 4u << 20, 0, stream));
    REQUIRE_OK(spill_set_swappable(p[i], 1));
  }
  void* more = NULL;
  CHECK_STATUS(spill_malloc(&more, 4u << 20, 0, stream), SPILL_ERROR_OUT_OF_MEMORY);
  CHECK_ERROR_HAS("raise host_cap:");
  for (int i = 0; i < 4; ++i) CHECK_OK(spill_free(p[i], 0, stream));
}

TEST(init_rejects_a_bad_configuration) {
  CHECK_STATUS(spill_init("device:sim,bugdet:1GiB"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("bugdet");
  CHECK(strstr(spill_last_error(), "spill_init: spill_init") == NULL); /* named once */
  CHECK_STATUS(spill_init("device:sim,budget:lots"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("budget");
  /* Nothing changed: a good configuration is taken afterwards. */
  CHECK_OK(spill_init(CONF));
  uint64_t budget = 0;
  CHECK_OK(spill_get_budget(0, &budget));
  CHECK(budget == 256ull << 20);
}

TEST(init_while_running_with_another_configuration) {
  REQUIRE_OK(spill_init(CONF));
  int simulated = 0;
  REQUIRE_OK(spill_device_open(0, &simulated));
  CHECK(simulated == 1);
  CHECK_OK(spill_init(CONF)); /* the same again is fine */
  CHECK_STATUS(spill_init("device:sim,budget:64MiB"), SPILL_ERROR_ALREADY_INITIALIZED);
  CHECK_ERROR_HAS("spill_shutdown");
  uint64_t budget = 0;
  CHECK_OK(spill_get_budget(0, &budget));
  CHECK(budget == 256ull << 20);
  CHECK_OK(spill_shutdown());
  CHECK_OK(spill_init("device:sim,budget:64MiB"));
  CHECK_OK(spill_get_budget(0, &budget));
  CHECK(budget == 64ull << 20);
}

TEST(spill_conf_is_read_at_first_use) {
  setenv("SPILL_CONF", "device:sim,sim_capacity:512MiB,budget:96MiB", 1);
  uint64_t budget = 0;
  CHECK_OK(spill_get_budget(0, &budget));
  CHECK(budget == 96ull << 20);
}

TEST(a_bad_spill_conf_is_an_error_at_first_use) {
  setenv("SPILL_CONF", "device:sim,budget:-3", 1);
  void* p = (void*)1;
  CHECK_STATUS(spill_malloc(&p, 64, 0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("SPILL_CONF");
  CHECK(p == NULL);
}

TEST(malloc_and_free_small_and_large) {
  REQUIRE_OK(spill_init(CONF));
  void* small = NULL;
  void* large = NULL;
  REQUIRE_OK(spill_malloc(&small, 1000, 0, NULL));
  REQUIRE_OK(spill_malloc(&large, 8u << 20, 0, NULL));
  CHECK(small != NULL && large != NULL);
  CHECK(((uintptr_t)small % 512) == 0 && ((uintptr_t)large % 512) == 0);
  /* Simulated device memory is host memory while resident. */
  memset(small, 0x5a, 1000);
  memset(large, 0xa5, 8u << 20);
  spill_stats st;
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.struct_size == sizeof st);
  CHECK(st.device == 0 && st.simulated == 1);
  CHECK(st.allocations == 2);
  CHECK(st.allocated_bytes >= 1000 + (8u << 20));
  CHECK(st.requested_bytes == 1000 + (8u << 20));
  CHECK(st.unswappable_bytes >= 8u << 20); /* nobody declared it swappable */
  CHECK_OK(spill_free(small, 0, NULL));
  CHECK_OK(spill_free(large, 0, NULL));
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.allocated_bytes == 0 && st.frees == 2);
}

TEST(size_zero_and_null) {
  REQUIRE_OK(spill_init(CONF));
  void* p = (void*)1;
  CHECK_OK(spill_malloc(&p, 0, 0, NULL));
  CHECK(p == NULL);
  CHECK_OK(spill_free(NULL, 0, NULL));
  CHECK_STATUS(spill_malloc(NULL, 64, 0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("out is NULL");
}

TEST(bad_device_ordinals) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  CHECK_STATUS(spill_malloc(&p, 64, -1, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("device -1");
  CHECK_STATUS(spill_malloc(&p, 64, SPILL_MAX_DEVICES, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("device 64");
  uint64_t b;
  CHECK_STATUS(spill_get_budget(1000, &b), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("device 1000");
}

TEST(absurd_sizes_are_out_of_memory) {
  REQUIRE_OK(spill_init(CONF));
  void* p = (void*)1;
  CHECK_STATUS(spill_malloc(&p, SIZE_MAX, 0, NULL), SPILL_ERROR_OUT_OF_MEMORY);
  CHECK(p == NULL);
  CHECK_ERROR_HAS("budget");
  CHECK_STATUS(spill_malloc(&p, (size_t)1 << 60, 0, NULL), SPILL_ERROR_OUT_OF_MEMORY);
  CHECK_ERROR_HAS("1152921504606846976 bytes");
  char* oom = NULL;
  REQUIRE_OK(spill_last_oom_message(0, &oom));
  CHECK(oom != NULL && strstr(oom, "budget") != NULL);
  spill_string_free(oom);
  /* Nothing changed: ordinary allocations still work. */
  CHECK_OK(spill_malloc(&p, 4096, 0, NULL));
  CHECK_OK(spill_free(p, 0, NULL));
}

TEST(out_of_memory_says_where_the_bytes_are) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:256MiB,budget:32MiB"));
  void* blocks[8];
  int n = 0;
  spill_status s = SPILL_OK;
  for (; n < 8; ++n) {
    s = spill_malloc(&blocks[n], 6u << 20, 0, NULL);
    if (s != SPILL_OK) break;
  }
  CHECK(s == SPILL_ERROR_OUT_OF_MEMORY); /* unswappable blocks stay: the budget runs out */
  CHECK(n >= 4 && n < 8);
  CHECK_ERROR_HAS("spill_malloc(6291456 bytes, device 0)");
  CHECK_ERROR_HAS("Budget 32.00 MiB: resident ");
  spill_stats st;
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.ooms >= 1);
  CHECK(st.reserved_bytes <= 32u << 20);
  for (int i = 0; i < n; ++i) CHECK_OK(spill_free(blocks[i], 0, NULL));
}

TEST(an_oom_note_is_added_to_out_of_memory_messages_until_removed) {
  REQUIRE_OK(spill_init(CONF));
  void* p = (void*)1;
  CHECK_OK(spill_set_oom_note(0, "the integration ran this step quietly"));
  CHECK_STATUS(spill_malloc(&p, (size_t)1 << 40, 0, NULL), SPILL_ERROR_OUT_OF_MEMORY);
  CHECK_ERROR_HAS("1099511627776 bytes");
  CHECK_ERROR_HAS("\nthe integration ran this step quietly");
  char* oom = NULL;
  REQUIRE_OK(spill_last_oom_message(0, &oom));
  CHECK(oom != NULL && strstr(oom, "ran this step quietly") != NULL);
  spill_string_free(oom);
  /* Other errors do not carry it. */
  CHECK_STATUS(spill_free((void*)0x10, 0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(spill_last_error(), "quietly") == NULL);
  CHECK_OK(spill_set_oom_note(0, NULL));
  CHECK_STATUS(spill_malloc(&p, (size_t)1 << 40, 0, NULL), SPILL_ERROR_OUT_OF_MEMORY);
  CHECK(strstr(spill_last_error(), "quietly") == NULL);
  CHECK_OK(spill_set_oom_note(0, "again"));
  CHECK_OK(spill_set_oom_note(0, ""));
  CHECK_STATUS(spill_malloc(&p, (size_t)1 << 40, 0, NULL), SPILL_ERROR_OUT_OF_MEMORY);
  CHECK(strstr(spill_last_error(), "again") == NULL);
  CHECK_STATUS(spill_set_oom_note(-1, "x"), SPILL_ERROR_INVALID_ARGUMENT);
}

TEST(the_allocated_peak_of_an_interval_leaves_the_users_peaks_alone) {
  REQUIRE_OK(spill_init(CONF));
  uint64_t peak = 0;
  void *a = NULL, *b = NULL;
  REQUIRE_OK(spill_malloc(&a, 8u << 20, 0, NULL));
  REQUIRE_OK(spill_malloc(&b, 16u << 20, 0, NULL));
  CHECK_OK(spill_free(b, 0, NULL));
  CHECK_OK(spill_take_allocated_peak(0, &peak));
  CHECK(peak == 24u << 20);
  /* The next interval starts from what is allocated now. */
  CHECK_OK(spill_take_allocated_peak(0, &peak));
  CHECK(peak == 8u << 20);
  REQUIRE_OK(spill_malloc(&b, 4u << 20, 0, NULL));
  CHECK_OK(spill_reset_peak_stats(0)); /* the user's peaks only */
  CHECK_OK(spill_free(b, 0, NULL));
  CHECK_OK(spill_take_allocated_peak(0, &peak));
  CHECK(peak == 12u << 20);
  spill_stats st;
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.allocated_peak_bytes == 12u << 20); /* from the reset, not from the interval */
  /* Taking the interval's peak does not touch the user's. */
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.allocated_peak_bytes == 12u << 20);
  CHECK_STATUS(spill_take_allocated_peak(0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("peak_bytes");
  CHECK_OK(spill_free(a, 0, NULL));
}

TEST(free_of_an_unknown_pointer) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 4096, 0, NULL));
  int local = 0;
  CHECK_STATUS(spill_free(&local, 0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(&local));
  CHECK_ERROR_HAS("not allocated");
  CHECK_OK(spill_free(p, 0, NULL));
}

TEST(free_of_an_interior_pointer) {
  REQUIRE_OK(spill_init(CONF));
  char* p = NULL;
  REQUIRE_OK(spill_malloc((void**)&p, 4096, 0, NULL));
  CHECK_STATUS(spill_free(p + 16, 0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(p + 16));
  CHECK_ERROR_HAS("points inside");
  p[0] = 1; /* still allocated */
  CHECK_OK(spill_free(p, 0, NULL));
}

TEST(double_free) {
  REQUIRE_OK(spill_init(CONF));
  void* small = NULL;
  void* large = NULL;
  REQUIRE_OK(spill_malloc(&small, 4096, 0, NULL));
  REQUIRE_OK(spill_malloc(&large, 4u << 20, 0, NULL));
  CHECK_OK(spill_free(small, 0, NULL));
  CHECK_OK(spill_free(large, 0, NULL));
  CHECK_STATUS(spill_free(small, 0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("double free");
  CHECK_ERROR_HAS(c_test_address(small));
  CHECK_STATUS(spill_free(large, 0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(large));
  spill_stats st;
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.frees == 2);
}

TEST(free_on_another_device) {
  REQUIRE_OK(spill_init(CONF));
  void* p0 = NULL;
  void* p1 = NULL;
  REQUIRE_OK(spill_malloc(&p0, 4096, 0, NULL));
  REQUIRE_OK(spill_malloc(&p1, 4096, 1, NULL)); /* device 1: its own simulated GPU */
  CHECK_STATUS(spill_free(p0, 1, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("belongs to device 0");
  CHECK_ERROR_HAS(c_test_address(p0));
  CHECK_STATUS(spill_free(p1, 0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("belongs to device 1");
  /* A device that never ran cannot own anything: the message names the pointer and its owner
   * (audit 41a #2: it said only that device 5 had no runtime). */
  CHECK_STATUS(spill_free(p0, 5, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(p0));
  CHECK_ERROR_HAS("belongs to device 0, not device 5 (which has no runtime yet: it holds no "
                  "block; nothing was freed)");
  CHECK_OK(spill_free(p0, 0, NULL));
  CHECK_OK(spill_free(p1, 1, NULL));
  int local = 0;
  CHECK_STATUS(spill_free(&local, 5, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(&local));
  CHECK_ERROR_HAS("was not allocated by spill on device 5 (which has no runtime yet");
  /* Other calls that need a runtime say so (stream_destroy). */
  CHECK_STATUS(spill_stream_destroy(5, (void*)0x10), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("device 5 has no runtime yet: it holds no block or stream for this call to "
                  "act on");
}

TEST(calls_after_shutdown) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  void* big = NULL;
  REQUIRE_OK(spill_malloc(&p, 4096, 0, NULL));
  REQUIRE_OK(spill_malloc(&big, 16u << 20, 0, NULL));
  CHECK_OK(spill_shutdown()); /* blocks still held: freed with everything else */
  CHECK_OK(spill_shutdown()); /* idempotent */
  CHECK_STATUS(spill_free(p, 0, NULL), SPILL_ERROR_SHUT_DOWN);
  CHECK_ERROR_HAS("spill_shutdown");
  void* q = NULL;
  CHECK_STATUS(spill_malloc(&q, 64, 0, NULL), SPILL_ERROR_SHUT_DOWN);
  CHECK_ERROR_HAS("spill_shutdown freed every block"); /* (the second shutdown freed none) */
  CHECK(q == NULL);
  CHECK_STATUS(spill_record_stream(p, NULL), SPILL_ERROR_SHUT_DOWN);
  spill_stats st;
  st.struct_size = sizeof st;
  CHECK_STATUS(spill_get_stats(0, &st), SPILL_ERROR_SHUT_DOWN);
  /* spill_init starts a new session. */
  REQUIRE_OK(spill_init(CONF));
  CHECK_OK(spill_malloc(&q, 64, 0, NULL));
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.allocations == 1); /* a fresh runtime */
  CHECK_OK(spill_free(q, 0, NULL));
}

/* A shutdown before anything ran says so, not that it freed blocks. */
TEST(shutdown_before_anything_started) {
  CHECK_OK(spill_shutdown());
  void* q = NULL;
  CHECK_STATUS(spill_malloc(&q, 64, 0, NULL), SPILL_ERROR_SHUT_DOWN);
  CHECK_ERROR_HAS("spill_shutdown was called before any device started");
  CHECK_ERROR_HAS("spill_init starts a new session");
  REQUIRE_OK(spill_init(CONF));
  CHECK_OK(spill_malloc(&q, 64, 0, NULL));
  CHECK_OK(spill_free(q, 0, NULL));
}

TEST(streams_on_the_simulated_device) {
  REQUIRE_OK(spill_init(CONF));
  void* s1 = NULL;
  void* s2 = NULL;
  REQUIRE_OK(spill_stream_create(0, &s1));
  REQUIRE_OK(spill_stream_create(0, &s2));
  CHECK(s1 != NULL && s2 != NULL && s1 != s2);
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 1u << 20, 0, s1));
  CHECK_OK(spill_record_stream(p, s2));
  CHECK_OK(spill_free(p, 0, s1));
  CHECK_OK(spill_stream_synchronize(0, s1));
  CHECK_OK(spill_stream_destroyed(0, s2));
  CHECK_OK(spill_stream_destroy(0, s1));
  CHECK_OK(spill_stream_destroy(0, s2));
  /* A destroyed or made-up stream is refused, naming it. */
  CHECK_STATUS(spill_malloc(&p, 64, 0, s1), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(s1));
  CHECK_ERROR_HAS("spill_stream_create");
  int fake = 0;
  CHECK_STATUS(spill_stream_synchronize(0, &fake), SPILL_ERROR_INVALID_ARGUMENT);
  /* cudaStreamPerThread names another stream on every thread: refused, saying so. */
  CHECK_STATUS(spill_malloc(&p, 64, 0, (void*)2), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("cudaStreamPerThread");
  CHECK_STATUS(spill_stream_destroy(0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("default stream");
  CHECK_STATUS(spill_stream_create(0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  /* cudaStreamLegacy is the default stream's other spelling, here as on a GPU (refused here
   * before, so a portable program failed only on the simulated device): NULL reuses at once
   * what it freed. */
  REQUIRE_OK(spill_malloc(&p, 64, 0, (void*)1));
  CHECK_OK(spill_free(p, 0, (void*)1));
  void* q = NULL;
  REQUIRE_OK(spill_malloc(&q, 64, 0, NULL));
  CHECK(q == p);
  CHECK_OK(spill_stream_synchronize(0, (void*)1));
  CHECK_OK(spill_free(q, 0, NULL));
  CHECK_STATUS(spill_stream_destroy(0, (void*)1), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("cudaStreamLegacy");
}

TEST(record_stream_errors) {
  REQUIRE_OK(spill_init(CONF));
  void* streams[5];
  for (int i = 0; i < 5; ++i) REQUIRE_OK(spill_stream_create(0, &streams[i]));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 4096, 0, NULL));
  int local = 0;
  CHECK_STATUS(spill_record_stream(&local, streams[0]), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(&local));
  CHECK_STATUS(spill_record_stream(NULL, streams[0]), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(spill_record_stream(p, &local), SPILL_ERROR_INVALID_ARGUMENT);
  for (int i = 0; i < 4; ++i) CHECK_OK(spill_record_stream(p, streams[i]));
  CHECK_STATUS(spill_record_stream(p, streams[4]), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("4 other streams");
  CHECK_OK(spill_free(p, 0, NULL));
  for (int i = 0; i < 5; ++i) CHECK_OK(spill_stream_destroy(0, streams[i]));
}

TEST(budget_at_run_time) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:128MiB"));
  void* held = NULL;
  void* cached = NULL;
  REQUIRE_OK(spill_malloc(&held, 40u << 20, 0, NULL));
  REQUIRE_OK(spill_malloc(&cached, 40u << 20, 0, NULL));
  REQUIRE_OK(spill_free(cached, 0, NULL)); /* stays mapped in the cache */
  uint64_t budget = 0;
  /* Lower, releasing the cache. */
  CHECK_OK(spill_set_budget(0, 64u << 20));
  CHECK_OK(spill_get_budget(0, &budget));
  CHECK(budget == 64u << 20);
  spill_stats st;
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.reserved_bytes <= 64u << 20);
  CHECK(st.budget_bytes == 64u << 20);
  /* Below what an unswappable block holds: refused, naming it; the budget stays. */
  CHECK_STATUS(spill_set_budget(0, 16u << 20), SPILL_ERROR_OUT_OF_MEMORY);
  CHECK_ERROR_HAS("not declared swappable");
  CHECK_ERROR_HAS(c_test_address(held));
  CHECK_OK(spill_get_budget(0, &budget));
  CHECK(budget == 64u << 20);
  /* Above the device or below a granule: invalid. */
  CHECK_STATUS(spill_set_budget(0, 1ull << 40), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("larger than the device");
  CHECK_STATUS(spill_set_budget(0, 4096), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("granule");
  /* Raise it again. */
  CHECK_OK(spill_set_budget(0, 256u << 20));
  void* more = NULL;
  CHECK_OK(spill_malloc(&more, 150u << 20, 0, NULL));
  CHECK_OK(spill_free(more, 0, NULL));
  CHECK_OK(spill_free(held, 0, NULL));
}

/* Small requests share 2 MiB segments whatever the granule: a budget below one is refused,
 * naming that minimum (it was accepted, and then every small request failed blaming pins),
 * unless there is no small pool (swap_threshold:0). */
TEST(a_budget_below_a_small_segment_is_refused) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:64MiB,budget:1MiB,sim_granularity:64KiB"));
  void* p = NULL;
  CHECK_STATUS(spill_malloc(&p, 1, 0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("budget 1.00 MiB is below one small-pool segment (2.00 MiB");
  REQUIRE_OK(spill_shutdown());
  REQUIRE_OK(spill_init("device:sim,sim_capacity:64MiB,budget:8MiB,sim_granularity:64KiB"));
  CHECK_STATUS(spill_set_budget(0, 1u << 20), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("raise it to at least 2.00 MiB, or set swap_threshold:0");
  uint64_t budget = 0;
  CHECK_OK(spill_get_budget(0, &budget));
  CHECK(budget == 8u << 20);
  CHECK_OK(spill_set_budget(0, 2u << 20)); /* one segment: small requests fit */
  CHECK_OK(spill_malloc(&p, 1, 0, NULL));
  CHECK_OK(spill_free(p, 0, NULL));
  REQUIRE_OK(spill_shutdown());
  /* Without a small pool every request is a large block of granules: 1 MiB is a budget. */
  REQUIRE_OK(spill_init("device:sim,sim_capacity:64MiB,budget:1MiB,sim_granularity:64KiB,"
                        "swap_threshold:0"));
  CHECK_OK(spill_malloc(&p, 1, 0, NULL));
  CHECK_OK(spill_free(p, 0, NULL));
}

TEST(empty_cache) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 8u << 20, 0, NULL));
  REQUIRE_OK(spill_free(p, 0, NULL));
  spill_stats st;
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.cached_bytes >= 8u << 20);
  CHECK_OK(spill_empty_cache(0));
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.cached_bytes == 0 && st.reserved_bytes == 0);
}

/* An older caller's smaller struct gets what fits; a struct_size below the field is refused. */
typedef struct old_stats {
  size_t struct_size;
  int32_t device;
  int32_t simulated;
  uint64_t budget_bytes;
} old_stats;

TEST(stats_struct_grows) {
  REQUIRE_OK(spill_init(CONF));
  struct {
    old_stats s;
    uint64_t canary;
  } old;
  old.s.struct_size = sizeof old.s;
  old.canary = 0x1234;
  REQUIRE_OK(spill_get_stats(0, (spill_stats*)&old.s));
  CHECK(old.s.struct_size == sizeof old.s);
  CHECK(old.s.budget_bytes == 256u << 20);
  CHECK(old.s.simulated == 1);
  CHECK(old.canary == 0x1234); /* nothing written past the caller's struct */
  spill_stats st;
  st.struct_size = 2;
  CHECK_STATUS(spill_get_stats(0, &st), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("struct_size");
  CHECK_STATUS(spill_get_stats(0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
}

/* The rules an integration declares by follow the configuration: what it must not declare
 * swappable (the small pool's requests and those under swap_threshold) and the granule a
 * movable block maps. */
TEST(stats_tell_which_requests_can_move) {
  REQUIRE_OK(spill_init("device:sim,sim_granularity:64KiB,swap_threshold:128KiB"));
  spill_stats st;
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.granularity_bytes == 64u << 10);
  CHECK(st.small_limit_bytes == 128u << 10);
  CHECK(st.min_movable_bytes == (128u << 10) + 1); /* 128 KiB itself is a small request */
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, st.min_movable_bytes - 1, 0, NULL));
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.unswappable_bytes == 0); /* a small-pool block: not a candidate at all */
  CHECK_OK(spill_free(p, 0, NULL));
  REQUIRE_OK(spill_malloc(&p, st.min_movable_bytes, 0, NULL));
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.unswappable_bytes > 0); /* a large block, movable once declared */
  CHECK_OK(spill_free(p, 0, NULL));
  CHECK_OK(spill_shutdown());
  REQUIRE_OK(spill_init("device:sim,sim_granularity:64KiB,swap_threshold:4MiB"));
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.small_limit_bytes == 1u << 20);
  /* Large blocks under the threshold stay put too; a block is a granule multiple, so the
   * requests that round up to the threshold move. */
  CHECK(st.min_movable_bytes == (4u << 20) - (64u << 10) + 1);
  void* under = NULL;
  void* at = NULL;
  spill_residence r = SPILL_ON_HOST;
  REQUIRE_OK(spill_malloc(&under, st.min_movable_bytes - 1, 0, NULL));
  REQUIRE_OK(spill_malloc(&at, st.min_movable_bytes, 0, NULL));
  CHECK_OK(spill_set_swappable(under, 1));
  CHECK_OK(spill_set_swappable(at, 1));
  CHECK_OK(spill_evict(under)); /* a large block under the threshold: even asked, it stays */
  CHECK_OK(spill_evict(at));
  CHECK_OK(spill_get_residence(under, &r));
  CHECK(r == SPILL_RESIDENT);
  CHECK_OK(spill_get_residence(at, &r));
  CHECK(r == SPILL_SWAPPING_OUT || r == SPILL_ON_HOST);
  CHECK_OK(spill_free(under, 0, NULL));
  CHECK_OK(spill_free(at, 0, NULL));
  char* json = NULL;
  REQUIRE_OK(spill_stats_json(0, &json));
  CHECK(strstr(json, "\"min_movable_bytes\":4128769") != NULL);
  CHECK(strstr(json, "\"granularity_bytes\":65536") != NULL);
  spill_string_free(json);
}

TEST(stats_json_and_snapshot) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 3u << 20, 0, NULL));
  char* json = NULL;
  REQUIRE_OK(spill_stats_json(0, &json));
  CHECK(strstr(json, "\"allocated_bytes.current\":4194304") != NULL); /* 2 MiB granules */
  CHECK(strstr(json, "\"requested_bytes.current\":3145728") != NULL);
  CHECK(strstr(json, "\"swap.bytes_out\"") != NULL);
  CHECK(strstr(json, "\"simulated\":true") != NULL);
  /* The block's mapping: a physical allocation made and mapped, with the host's time in it. */
  CHECK(json_number(json, "vmm.create_calls") >= 1);
  CHECK(json_number(json, "vmm.map_calls") >= 1);
  CHECK(json_number(json, "vmm.host_s") > 0);
  CHECK(json_number(json, "vmm.host_s") >= json_number(json, "vmm.map_s"));
  spill_string_free(json);
  REQUIRE_OK(spill_snapshot_json(0, &json));
  CHECK(strstr(json, "\"segments\"") != NULL);
  CHECK(strstr(json, "\"device_traces\"") != NULL);
  CHECK(strstr(json, "spill-snapshot") != NULL);
  spill_string_free(json);
  spill_string_free(NULL);
  CHECK_STATUS(spill_stats_json(0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(spill_snapshot_json(0, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_OK(spill_free(p, 0, NULL));
}

TEST(trace_export) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 3u << 20, 0, NULL));
  REQUIRE_OK(spill_free(p, 0, NULL));
  /* A path that cannot be written is refused before the events are taken: the next export
   * still has them. */
  CHECK_STATUS(spill_trace_export("/nonexistent-dir/trace.json"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("/nonexistent-dir/trace.json");
  CHECK_STATUS(spill_trace_export(NULL), SPILL_ERROR_INVALID_ARGUMENT);
  char path[] = "/tmp/spill_c_trace_XXXXXX";
  TEMP_PATH(path);
  CHECK_OK(spill_trace_export(path));
  const char* buf = c_test_read_and_remove(path);
  CHECK(strstr(buf, "traceEvents") != NULL);
  CHECK(strstr(buf, "\"kind\":\"alloc\"") != NULL); /* the malloc before the failed export */
}

/* spill_shutdown while other threads are inside calls: it waits for them; their later calls
 * get SHUT_DOWN; nothing crashes or leaks into the next session. */
static atomic_int unexpected;
static void* hammer(void* arg) {
  (void)arg;
  long rounds = 0;
  for (;;) {
    void* p = NULL;
    spill_status s = spill_malloc(&p, (rounds % 3 == 0) ? (4u << 20) : 4096, 0, NULL);
    if (s == SPILL_ERROR_SHUT_DOWN) break;
    if (s != SPILL_OK) {
      atomic_fetch_add(&unexpected, 1);
      break;
    }
    spill_pin_token t;
    s = spill_pin(p, NULL, &t);
    if (s == SPILL_OK) s = spill_unpin(&t, NULL, 1);
    if (s != SPILL_OK && s != SPILL_ERROR_SHUT_DOWN) atomic_fetch_add(&unexpected, 1);
    s = spill_free(p, 0, NULL);
    if (s != SPILL_OK && s != SPILL_ERROR_SHUT_DOWN) atomic_fetch_add(&unexpected, 1);
    ++rounds;
  }
  return (void*)(intptr_t)rounds;
}

TEST(shutdown_while_other_threads_call) {
  for (int round = 0; round < 5; ++round) {
    REQUIRE_OK(spill_init(CONF));
    REQUIRE_OK(spill_device_open(0, NULL));
    pthread_t t[3];
    for (int i = 0; i < 3; ++i) pthread_create(&t[i], NULL, hammer, NULL);
    struct timespec pause = {0, 50 * 1000 * 1000};
    nanosleep(&pause, NULL);
    CHECK_OK(spill_shutdown());
    long total = 0;
    for (int i = 0; i < 3; ++i) {
      void* rounds = NULL;
      pthread_join(t[i], &rounds);
      total += (long)(intptr_t)rounds;
    }
    CHECK(total > 0);
    CHECK(atomic_load(&unexpected) == 0);
  }
}

/* In a child forked after spill started, every call fails with the parent's pid named, and
 * the parent's runtime is untouched. */
TEST(forked_child_is_refused) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 8u << 20, 0, NULL));
  memset(p, 7, 8u << 20);
  pid_t parent = getpid();
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    char parent_pid[32];
    snprintf(parent_pid, sizeof parent_pid, "pid %d", (int)parent);
    void* q = NULL;
    int bad = 0;
    bad += spill_malloc(&q, 64, 0, NULL) != SPILL_ERROR_FORKED_CHILD;
    bad += strstr(spill_last_error(), parent_pid) == NULL;
    bad += strstr(spill_last_error(), "fork") == NULL;
    bad += spill_free(p, 0, NULL) != SPILL_ERROR_FORKED_CHILD;
    bad += spill_record_stream(p, NULL) != SPILL_ERROR_FORKED_CHILD;
    bad += spill_empty_cache(0) != SPILL_ERROR_FORKED_CHILD;
    bad += spill_init(CONF) != SPILL_ERROR_FORKED_CHILD;
    bad += spill_shutdown() != SPILL_ERROR_FORKED_CHILD;
    spill_stats st;
    st.struct_size = sizeof st;
    bad += spill_get_stats(0, &st) != SPILL_ERROR_FORKED_CHILD;
    if (bad) fprintf(stderr, "child: %d unexpected results; last: %s\n", bad, spill_last_error());
    exit(bad ? 1 : 0); /* exit handlers run in the child too: they must not touch the runtime */
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  /* The parent's block and runtime are intact. */
  CHECK(((unsigned char*)p)[12345] == 7);
  CHECK_OK(spill_free(p, 0, NULL));
  CHECK_OK(spill_malloc(&p, 64, 0, NULL));
  CHECK_OK(spill_free(p, 0, NULL));
}

/* A child that makes no spill call exits, whatever the parent's other threads held at the
 * fork: a child whose parent was exporting a trace (the recorder's lock held) hung in exit(),
 * where its thread's trace ring is handed back. */
static atomic_int exporting_stop;
static void* export_in_a_loop(void* arg) {
  (void)arg;
  while (!atomic_load(&exporting_stop)) spill_trace_export("/dev/null");
  return NULL;
}

TEST(fork_child_exits_while_another_thread_exports_traces) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 1u << 20, 0, NULL)); /* this thread has a trace ring now */
  pthread_t exporter;
  REQUIRE(pthread_create(&exporter, NULL, export_in_a_loop, NULL) == 0);
  int hung = 0;
  for (int k = 0; k < 20; ++k) {
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) exit(0); /* exit handlers and thread_local destructors run */
    int status = 0, waited = 0;
    while (waited < 200 && waitpid(pid, &status, WNOHANG) == 0) { /* 2 s */
      nanosleep(&(struct timespec){0, 10000000}, NULL);
      ++waited;
    }
    if (waited == 200) {
      ++hung;
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
    } else {
      CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
  }
  atomic_store(&exporting_stop, 1);
  pthread_join(exporter, NULL);
  if (hung) fprintf(stderr, "%d of 20 children hung in exit()\n", hung);
  CHECK(hung == 0);
  CHECK_OK(spill_free(p, 0, NULL));
}

/* A stream whose worker thread cannot start (the simulated device runs each stream on a
 * thread; here RLIMIT_NPROC stops it) is OUT_OF_MEMORY saying so, not INTERNAL ("a bug in
 * spill") with a bare strerror (audit 42b #4); once threads can start again, all works. Root
 * ignores RLIMIT_NPROC, so the test runs as nobody in a child (skipped when not root). */
TEST(a_stream_thread_that_cannot_start_is_a_resource_error) {
  if (geteuid() != 0) SKIP("needs root to run as another user, where RLIMIT_NPROC applies");
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    /* The hard limit first: as nobody, only the soft limit moves (under it). */
    struct rlimit none = {1, 4096}, many = {4096, 4096};
    REQUIRE(setrlimit(RLIMIT_NPROC, &many) == 0);
    if (setgid(65534) != 0 || setuid(65534) != 0) _exit(77);
    int bad = 0;
    REQUIRE_OK(spill_init(CONF));
    REQUIRE(setrlimit(RLIMIT_NPROC, &none) == 0);
    bad += spill_device_open(0, NULL) != SPILL_ERROR_OUT_OF_MEMORY;
    bad += strstr(spill_last_error(), "cannot start the worker thread of a new stream") == NULL;
    bad += strstr(spill_last_error(), "ulimit -u") == NULL;
    if (bad) fprintf(stderr, "device_open: %s\n", spill_last_error());
    REQUIRE(setrlimit(RLIMIT_NPROC, &many) == 0);
    void* stream = NULL;
    bad += spill_stream_create(0, &stream) != SPILL_OK; /* opens the device too */
    REQUIRE(setrlimit(RLIMIT_NPROC, &none) == 0);
    void* more = NULL;
    bad += spill_stream_create(0, &more) != SPILL_ERROR_OUT_OF_MEMORY || more != NULL;
    bad += strstr(spill_last_error(), "spill_stream_create (device 0): SimDevice: cannot start") == NULL;
    if (bad) fprintf(stderr, "stream_create: %s\n", spill_last_error());
    REQUIRE(setrlimit(RLIMIT_NPROC, &many) == 0);
    bad += spill_stream_create(0, &more) != SPILL_OK;
    bad += spill_stream_destroy(0, more) != SPILL_OK;
    bad += spill_stream_destroy(0, stream) != SPILL_OK;
    bad += spill_shutdown() != SPILL_OK;
    _exit(bad ? 1 : 0);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 77) SKIP("cannot become nobody");
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* The simulated device keeps 256 streams at most: one more is OUT_OF_MEMORY (a resource that
 * ran out), not INVALID_ARGUMENT (audit 42b #8), and works again once one is destroyed. */
TEST(a_full_stream_table_is_a_resource_error) {
  REQUIRE_OK(spill_init(CONF));
  static void* streams[257];
  int made = 0;
  spill_status s = SPILL_OK;
  while (made < 257 && (s = spill_stream_create(0, &streams[made])) == SPILL_OK) ++made;
  CHECK(made == 256);
  CHECK(s == SPILL_ERROR_OUT_OF_MEMORY);
  void* more = NULL;
  CHECK_ERROR_HAS("streams already (the most spill keeps)");
  CHECK_ERROR_HAS("spill_stream_destroy");
  CHECK_OK(spill_stream_destroy(0, streams[--made]));
  CHECK_OK(spill_stream_create(0, &more));
  CHECK_OK(spill_stream_destroy(0, more));
  while (made > 0) CHECK_OK(spill_stream_destroy(0, streams[--made]));
}

/* A child forked before spill started in the parent may use spill itself. */
TEST(child_forked_before_start_may_use_spill) {
  REQUIRE_OK(spill_init(CONF)); /* a configuration only: no runtime yet */
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    void* q = NULL;
    int bad = spill_malloc(&q, 4096, 0, NULL) != SPILL_OK;
    bad += spill_free(q, 0, NULL) != SPILL_OK;
    if (bad) fprintf(stderr, "child: %s\n", spill_last_error());
    exit(bad ? 1 : 0);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  void* p = NULL;
  CHECK_OK(spill_malloc(&p, 4096, 0, NULL));
  CHECK_OK(spill_free(p, 0, NULL));
}

/* Blocks still held at exit: spill frees nothing, and frees that arrive during exit (from
 * other libraries' exit handlers and static destructors) succeed doing nothing. */
static void* held_at_exit;
static void free_during_exit(void) {
  spill_stats st;
  st.struct_size = sizeof st;
  if (spill_free(held_at_exit, 0, NULL) != SPILL_OK) _exit(3);
  if (spill_get_stats(0, &st) != SPILL_OK || st.frees != 0) _exit(4); /* freed nothing */
}

TEST(exit_with_blocks_held) {
  /* Registered before spill's own handler (at its first runtime): runs after it. */
  atexit(free_during_exit);
  REQUIRE_OK(spill_init(CONF));
  REQUIRE_OK(spill_malloc(&held_at_exit, 8u << 20, 0, NULL));
  void* stream = NULL;
  REQUIRE_OK(spill_stream_create(0, &stream));
  exit(c_test_failures ? 1 : 0);
}

#define TESTS(X)                                  \
  X(version_and_status_strings)                   \
  X(parse_size)                                   \
  X(oom_names_a_full_host_cap)                    \
  X(init_rejects_a_bad_configuration)             \
  X(init_while_running_with_another_configuration) \
  X(spill_conf_is_read_at_first_use)              \
  X(a_bad_spill_conf_is_an_error_at_first_use)    \
  X(malloc_and_free_small_and_large)              \
  X(size_zero_and_null)                           \
  X(bad_device_ordinals)                          \
  X(absurd_sizes_are_out_of_memory)               \
  X(out_of_memory_says_where_the_bytes_are)       \
  X(an_oom_note_is_added_to_out_of_memory_messages_until_removed) \
  X(the_allocated_peak_of_an_interval_leaves_the_users_peaks_alone) \
  X(free_of_an_unknown_pointer)                   \
  X(free_of_an_interior_pointer)                  \
  X(double_free)                                  \
  X(free_on_another_device)                       \
  X(calls_after_shutdown)                         \
  X(shutdown_before_anything_started)             \
  X(streams_on_the_simulated_device)              \
  X(record_stream_errors)                         \
  X(budget_at_run_time)                           \
  X(a_budget_below_a_small_segment_is_refused)    \
  X(empty_cache)                                  \
  X(stats_struct_grows)                           \
  X(stats_tell_which_requests_can_move)           \
  X(stats_json_and_snapshot)                      \
  X(trace_export)                                 \
  X(shutdown_while_other_threads_call)            \
  X(forked_child_is_refused)                      \
  X(child_forked_before_start_may_use_spill)      \
  X(a_stream_thread_that_cannot_start_is_a_resource_error) \
  X(a_full_stream_table_is_a_resource_error) \
  X(fork_child_exits_while_another_thread_exports_traces) \
  X(exit_with_blocks_held)

C_TEST_MAIN(TESTS)

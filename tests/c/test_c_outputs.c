/* The C API's outputs under bad conditions: a trace export to a full disk. Every test runs in
 * its own process on the simulated device. */
#define _POSIX_C_SOURCE 200809L
#include "c_test.h"

#include <stdint.h>

#define CONF "device:sim,sim_capacity:1GiB,budget:256MiB"

/* A write that fails after the file opened (ENOSPC) keeps the events for the next export, as
 * a path that cannot be opened does. */
TEST(a_trace_export_to_a_full_disk_keeps_the_events) {
  if (access("/dev/full", W_OK) != 0) SKIP("no /dev/full");
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 3u << 20, 0, NULL));
  REQUIRE_OK(spill_free(p, 0, NULL));
  CHECK_STATUS(spill_trace_export("/dev/full"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("/dev/full");
  char path[] = "/tmp/spill_c_trace_XXXXXX";
  TEMP_PATH(path);
  CHECK_OK(spill_trace_export(path));
  const char* buf = c_test_read_and_remove(path);
  CHECK(strstr(buf, "\"kind\":\"alloc\"") != NULL); /* the malloc before the failed export */
  CHECK(strstr(buf, "\"kind\":\"free\"") != NULL);
  /* Taken by the export that wrote them: the next has none of them. */
  char next[] = "/tmp/spill_c_trace_XXXXXX";
  TEMP_PATH(next);
  CHECK_OK(spill_trace_export(next));
  buf = c_test_read_and_remove(next);
  CHECK(strstr(buf, "\"kind\":\"alloc\"") == NULL);
}

#define TESTS(X)                                          \
  X(a_trace_export_to_a_full_disk_keeps_the_events)

C_TEST_MAIN(TESTS)

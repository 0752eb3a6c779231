/* Step scopes of one thread on several devices (a pipeline or multi-GPU controller driving
 * every device from one thread): each device keeps the thread's scope on it, whatever the
 * number of devices, and the scopes of ended sessions leave room for new ones. */
#define _POSIX_C_SOURCE 200809L
#include "c_test.h"

#include <stdint.h>

#define MIB (1024u * 1024u)
#define DEVICES 6 /* more than the 4 a thread's scope table held before */
#define STEPS 4
#define LAYERS 6

static spill_stats stats_of(int device) {
  spill_stats st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(device, &st));
  return st;
}

/* Before, a fifth device's scope took the first device's entry: device 0's pins went to
 * scope 0, its scope recorded nothing and was never planned, with no error anywhere. */
TEST(one_thread_keeps_a_scope_on_each_of_six_devices) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:256MiB,budget:16MiB,policy:plan,trace:off"));
  void* blocks[DEVICES][LAYERS];
  for (int d = 0; d < DEVICES; ++d) {
    for (int l = 0; l < LAYERS; ++l) {
      REQUIRE_OK(spill_malloc(&blocks[d][l], 4 * MIB, d, NULL));
      REQUIRE_OK(spill_set_swappable(blocks[d][l], 1));
    }
  }
  for (int step = 0; step < STEPS; ++step) {
    for (int d = 0; d < DEVICES; ++d) REQUIRE_OK(spill_begin_step(d, 100 + (uint64_t)d));
    for (int l = 0; l < LAYERS; ++l) {
      for (int d = 0; d < DEVICES; ++d) {
        spill_pin_token t;
        REQUIRE_OK(spill_pin_for_host(blocks[d][l], &t));
        ((char*)blocks[d][l])[0] = (char)step;
        REQUIRE_OK(spill_unpin(&t, NULL, 1));
      }
    }
    for (int d = 0; d < DEVICES; ++d) REQUIRE_OK(spill_end_step(d, 100 + (uint64_t)d));
  }
  for (int d = 0; d < DEVICES; ++d) {
    const spill_stats st = stats_of(d);
    if (st.steps_recorded != 1 || st.steps_planned != STEPS - 1)
      fprintf(stderr, "device %d: steps_recorded %llu, steps_planned %llu\n", d,
              (unsigned long long)st.steps_recorded, (unsigned long long)st.steps_planned);
    CHECK(st.steps_recorded == 1);
    CHECK(st.steps_planned == STEPS - 1);
    char path[] = "/tmp/spill_c_scopes_XXXXXX";
    TEMP_PATH(path);
    CHECK_OK(spill_write_step_graph(d, 100 + (uint64_t)d, path));
    const char* graph = c_test_read_and_remove(path);
    CHECK(strstr(graph, "4194304") != NULL); /* the scope's step pinned its 4 MiB blocks */
  }
  for (int d = 0; d < DEVICES; ++d)
    for (int l = 0; l < LAYERS; ++l) CHECK_OK(spill_free(blocks[d][l], d, NULL));
  CHECK_OK(spill_shutdown());
}

/* A thread's scope on a runtime that spill_shutdown ended takes no room for good: a thread
 * that uses a scope in many sessions (more than the 64 devices' worth it keeps) goes on. */
TEST(scopes_of_ended_sessions_make_room) {
  for (int session = 0; session < 70; ++session) {
    REQUIRE_OK(spill_init("device:sim,sim_capacity:64MiB,budget:16MiB,trace:off"));
    CHECK_OK(spill_begin_step(0, 7));
    CHECK_OK(spill_end_step(0, 7));
    REQUIRE_OK(spill_shutdown());
  }
}

#define TESTS(X)                                    \
  X(one_thread_keeps_a_scope_on_each_of_six_devices) \
  X(scopes_of_ended_sessions_make_room)

C_TEST_MAIN(TESTS)

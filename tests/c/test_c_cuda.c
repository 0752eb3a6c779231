/* The C API on a GPU (device:cuda): the calls work end to end, swapping included. Each test
 * skips (exit 77) with the reason when no GPU is usable; bench/gpu/run_all.sh runs them on
 * one. Data is checked on the simulated device (test_c_residency, test_c_fuzz): C without the
 * CUDA headers cannot read device memory. */
#define _POSIX_C_SOURCE 200809L
#include "c_test.h"

#include <stdint.h>

static void open_gpu_or_skip(void) {
  REQUIRE_OK(spill_init("device:cuda,budget:256MiB,policy:lru"));
  int simulated = 1;
  spill_status s = spill_device_open(0, &simulated);
  if (s == SPILL_ERROR_CUDA) SKIP(spill_last_error());
  REQUIRE(s == SPILL_OK);
  REQUIRE(simulated == 0);
}

TEST(cuda_malloc_free_and_streams) {
  open_gpu_or_skip();
  void* stream = NULL;
  REQUIRE_OK(spill_stream_create(0, &stream));
  void* small = NULL;
  void* large = NULL;
  REQUIRE_OK(spill_malloc(&small, 4096, 0, stream));
  REQUIRE_OK(spill_malloc(&large, 64u << 20, 0, stream));
  CHECK_OK(spill_record_stream(large, NULL));
  CHECK_OK(spill_free(small, 0, stream));
  CHECK_OK(spill_free(large, 0, stream));
  CHECK_OK(spill_stream_synchronize(0, stream));
  CHECK_OK(spill_stream_destroy(0, stream));
  spill_stats st;
  st.struct_size = sizeof st;
  CHECK_OK(spill_get_stats(0, &st));
  CHECK(st.simulated == 0 && st.allocations == 2 && st.frees == 2);
  CHECK_OK(spill_shutdown());
}

/* CUDA's special handles: cudaStreamLegacy (1) is the NULL stream (a block freed on one is
 * reused on the other at once); cudaStreamPerThread (2), a different stream on every thread,
 * is refused (spill uses a block's streams from whichever thread evicts or reuses it). */
TEST(cuda_special_default_stream_handles) {
  open_gpu_or_skip();
  void* p = NULL;
  CHECK_STATUS(spill_malloc(&p, 4096, 0, (void*)2), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("cudaStreamPerThread");
  CHECK(p == NULL);
  REQUIRE_OK(spill_malloc(&p, 4096, 0, (void*)1));
  CHECK_OK(spill_free(p, 0, (void*)1));
  void* q = NULL;
  REQUIRE_OK(spill_malloc(&q, 4096, 0, NULL));
  CHECK(q == p); /* the same stream: reused at once */
  CHECK_OK(spill_free(q, 0, NULL));
  CHECK_OK(spill_stream_synchronize(0, NULL));
  CHECK_OK(spill_shutdown());
}

TEST(cuda_swap_cycle) {
  open_gpu_or_skip();
  void* stream = NULL;
  REQUIRE_OK(spill_stream_create(0, &stream));
  void* blocks[6];
  for (int i = 0; i < 6; ++i) {
    REQUIRE_OK(spill_malloc(&blocks[i], 64u << 20, 0, stream));
    REQUIRE_OK(spill_set_swappable(blocks[i], 1));
  }
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < 6; ++i) {
      spill_pin_token t;
      REQUIRE_OK(spill_pin(blocks[i], stream, &t)); /* 6 x 64 MiB over a 256 MiB budget */
      REQUIRE_OK(spill_unpin(&t, stream, 1));
    }
  }
  spill_pin_token host;
  CHECK_OK(spill_pin_for_host(blocks[0], &host));
  CHECK_OK(spill_unpin(&host, NULL, 0));
  CHECK_OK(spill_stream_synchronize(0, stream));
  spill_stats st;
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.swap_outs > 0 && st.swap_ins > 0);
  CHECK(st.reserved_peak_bytes <= 256u << 20);
  for (int i = 0; i < 6; ++i) CHECK_OK(spill_free(blocks[i], 0, stream));
  CHECK_OK(spill_stream_destroy(0, stream));
  CHECK_OK(spill_shutdown());
}

#define TESTS(X)                          \
  X(cuda_malloc_free_and_streams)         \
  X(cuda_special_default_stream_handles)  \
  X(cuda_swap_cycle)

C_TEST_MAIN(TESTS)

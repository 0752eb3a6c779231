/* The residency rules and steps through the C API, from C (simulated device): undeclared
 * blocks never move, declaring makes a block dirty, no-op pins, stale tokens, step scopes on
 * two threads, the recorded step as a graph, generations read without a pin, budgets that
 * evict, memory freed while its prefetch lands, shutdown with live blocks. */
#define _POSIX_C_SOURCE 200809L
#include "c_test.h"

#include <pthread.h>
#include <stdint.h>
#include <time.h>

#define MIB (1024u * 1024u)
#define BLOCK (8u * MIB)

static void fill(void* p, size_t n, unsigned seed) {
  uint32_t* w = (uint32_t*)p;
  for (size_t i = 0; i < n / 4; i += 1024) w[i] = seed * 2654435761u + (uint32_t)i;
}
static int holds(const void* p, size_t n, unsigned seed) {
  const uint32_t* w = (const uint32_t*)p;
  for (size_t i = 0; i < n / 4; i += 1024)
    if (w[i] != seed * 2654435761u + (uint32_t)i) return 0;
  return 1;
}
/* Host access through the host pin. */
static void write_pinned(void* p, size_t n, unsigned seed) {
  spill_pin_token t;
  REQUIRE_OK(spill_pin_for_host(p, &t));
  fill(p, n, seed);
  REQUIRE_OK(spill_unpin(&t, NULL, 1));
}
static int check_pinned(void* p, size_t n, unsigned seed) {
  spill_pin_token t;
  REQUIRE_OK(spill_pin_for_host(p, &t));
  int ok = holds(p, n, seed);
  REQUIRE_OK(spill_unpin(&t, NULL, 0));
  return ok;
}
/* n blocks of 4 MiB declared swappable, block l holding pattern seed + l. */
static void swappable_blocks(void** b, int n, unsigned seed) {
  for (int l = 0; l < n; ++l) {
    REQUIRE_OK(spill_malloc(&b[l], 4 * MIB, 0, NULL));
    write_pinned(b[l], 4 * MIB, seed + (unsigned)l);
    REQUIRE_OK(spill_set_swappable(b[l], 1));
  }
}
static spill_stats stats(void) {
  spill_stats st;
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(0, &st));
  return st;
}
static spill_residence residence(const void* p) {
  spill_residence r = SPILL_SWAPPING_IN;
  REQUIRE_OK(spill_get_residence(p, &r));
  return r;
}

TEST(declared_blocks_swap_and_come_back) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:lru"));
  void* a = NULL;
  REQUIRE_OK(spill_malloc(&a, BLOCK, 0, NULL));
  fill(a, BLOCK, 1); /* before declaring: plain host writes are fine */
  REQUIRE_OK(spill_set_swappable(a, 1));
  CHECK_OK(spill_evict(a));
  CHECK(residence(a) == SPILL_SWAPPING_OUT || residence(a) == SPILL_ON_HOST);
  CHECK(check_pinned(a, BLOCK, 1));
  CHECK(residence(a) == SPILL_RESIDENT);
  spill_stats st = stats();
  CHECK(st.swap_outs == 1); /* the pin brought it back, or cancelled the swap-out in flight */
  CHECK_OK(spill_free(a, 0, NULL));
}

/* Rule 1: a fresh block is protected until declared; an unpinned undeclared block never moves. */
TEST(undeclared_blocks_are_never_evicted) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:lru"));
  void* keep = NULL;
  REQUIRE_OK(spill_malloc(&keep, BLOCK, 0, NULL));
  fill(keep, BLOCK, 5);
  void* blocks[3];
  for (int i = 0; i < 3; ++i) REQUIRE_OK(spill_malloc(&blocks[i], BLOCK, 0, NULL));
  void* extra = NULL;
  CHECK_STATUS(spill_malloc(&extra, BLOCK, 0, NULL), SPILL_ERROR_OUT_OF_MEMORY);
  for (int i = 0; i < 3; ++i) {
    write_pinned(blocks[i], BLOCK, 10 + i);
    REQUIRE_OK(spill_set_swappable(blocks[i], 1));
  }
  for (int round = 0; round < 6; ++round) {
    void* p = NULL;
    REQUIRE_OK(spill_malloc(&p, BLOCK, 0, NULL)); /* evicts declared blocks only */
    CHECK_OK(spill_evict(keep));                  /* a no-op */
    CHECK(residence(keep) == SPILL_RESIDENT);
    CHECK(holds(keep, BLOCK, 5)); /* read without any pin */
    CHECK_OK(spill_free(p, 0, NULL));
  }
  for (int i = 0; i < 3; ++i) CHECK(check_pinned(blocks[i], BLOCK, 10 + i));
  CHECK(stats().swap_outs > 0);
  CHECK(stats().unswappable_bytes == BLOCK);
  for (int i = 0; i < 3; ++i) CHECK_OK(spill_free(blocks[i], 0, NULL));
  CHECK_OK(spill_free(keep, 0, NULL));
}

/* Rule 2: declaring a block swappable makes it dirty; a read-only unpin keeps a copy current. */
TEST(declaring_makes_a_block_dirty) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB,policy:lru"));
  void* a = NULL;
  REQUIRE_OK(spill_malloc(&a, BLOCK, 0, NULL));
  fill(a, BLOCK, 1);
  REQUIRE_OK(spill_set_swappable(a, 1));
  REQUIRE_OK(spill_evict(a));
  CHECK(check_pinned(a, BLOCK, 1));
  REQUIRE_OK(spill_evict(a));
  CHECK(check_pinned(a, BLOCK, 1));
  CHECK(stats().clean_evictions == 1); /* the read-only use kept the host copy current */
  REQUIRE_OK(spill_set_swappable(a, 0)); /* comes back; the host may touch it */
  CHECK(residence(a) == SPILL_RESIDENT);
  fill(a, BLOCK, 2); /* outside the hooks */
  REQUIRE_OK(spill_set_swappable(a, 1));
  REQUIRE_OK(spill_evict(a));
  CHECK(check_pinned(a, BLOCK, 2));
  spill_stats st = stats();
  CHECK(st.clean_evictions == 1);
  CHECK(st.swap_outs == 2);
  CHECK_OK(spill_free(a, 0, NULL));
}

/* Declaring a block unswappable brings it back from the host. */
TEST(undeclaring_brings_a_block_back) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB,policy:lru"));
  void* a = NULL;
  REQUIRE_OK(spill_malloc(&a, BLOCK, 0, NULL));
  fill(a, BLOCK, 3);
  REQUIRE_OK(spill_set_swappable(a, 1));
  REQUIRE_OK(spill_evict(a));
  void* s = NULL;
  REQUIRE_OK(spill_stream_create(0, &s));
  REQUIRE_OK(spill_stream_synchronize(0, s));
  CHECK_OK(spill_set_swappable(a, 0));
  CHECK(residence(a) == SPILL_RESIDENT);
  CHECK(holds(a, BLOCK, 3));
  CHECK_OK(spill_free(a, 0, NULL));
  CHECK_OK(spill_stream_destroy(0, s));
}

/* Rule 3: blocks that never move give empty tokens; unknown pointers are named errors. */
TEST(pins_of_blocks_that_never_move) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB"));
  void* small = NULL;
  REQUIRE_OK(spill_malloc(&small, 4096, 0, NULL));
  spill_pin_token t;
  CHECK_OK(spill_pin(small, NULL, &t));
  CHECK(t.block == 0);
  CHECK_OK(spill_unpin(&t, NULL, 1));
  CHECK_OK(spill_pin_for_host(small, &t));
  CHECK(t.block == 0);
  CHECK_OK(spill_unpin(&t, NULL, 1));
  CHECK_OK(spill_set_swappable(small, 1));
  CHECK_OK(spill_evict(small));
  CHECK_OK(spill_prefetch(small));
  CHECK(residence(small) == SPILL_RESIDENT);
  /* A large undeclared block: a real (cheap) pin. */
  void* large = NULL;
  REQUIRE_OK(spill_malloc(&large, BLOCK, 0, NULL));
  CHECK_OK(spill_pin(large, NULL, &t));
  CHECK(t.block == (uint64_t)(uintptr_t)large && t.device == 0 && t.flags == 0);
  CHECK_OK(spill_unpin(&t, NULL, 1));
  int local = 0;
  CHECK_STATUS(spill_pin(&local, NULL, &t), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(&local));
  CHECK_STATUS(spill_pin_for_host(&local, &t), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(&local));
  CHECK_STATUS(spill_set_swappable(&local, 1), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(&local));
  CHECK(strstr(spill_last_error(), ".cpp:") == NULL); /* no "[c_api_residency.cpp:NN]" */
  CHECK_STATUS(spill_prefetch(&local), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(spill_evict(&local), SPILL_ERROR_INVALID_ARGUMENT);
  spill_residence r;
  CHECK_STATUS(spill_get_residence(&local, &r), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(spill_get_residence(large, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(spill_pin(large, NULL, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(spill_pin(NULL, NULL, &t), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(spill_unpin(NULL, NULL, 0), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(spill_pin(large, &local, &t), SPILL_ERROR_INVALID_ARGUMENT); /* stream */
  CHECK_ERROR_HAS("stream");
  CHECK_OK(spill_free(small, 0, NULL));
  CHECK_OK(spill_free(large, 0, NULL));
}

/* spill started under LRU with a 64 MiB budget, a stream of its own and a swappable block
 * allocated on it. */
static void* swappable_block_on_a_new_stream(void** stream) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB,policy:lru"));
  REQUIRE_OK(spill_stream_create(0, stream));
  void* a = NULL;
  REQUIRE_OK(spill_malloc(&a, BLOCK, 0, *stream));
  REQUIRE_OK(spill_set_swappable(a, 1));
  return a;
}

/* Rule 4: freeing a pinned block is normal; its late unpin cannot unpin the address's new
 * block; unpinning a token twice is an error. */
TEST(stale_tokens) {
  void* s = NULL;
  void* a = swappable_block_on_a_new_stream(&s);
  spill_pin_token old;
  REQUIRE_OK(spill_pin(a, s, &old));
  CHECK_OK(spill_free(a, 0, s)); /* the op using it is still queued: fine */
  void* b = NULL;
  REQUIRE_OK(spill_malloc(&b, BLOCK, 0, s));
  CHECK(b == a); /* the same address, a new block */
  REQUIRE_OK(spill_set_swappable(b, 1));
  spill_pin_token t;
  REQUIRE_OK(spill_pin(b, s, &t));
  CHECK(t.generation != old.generation);
  CHECK_OK(spill_unpin(&old, s, 1)); /* late: a counted no-op */
  CHECK(stats().stale_unpins == 1);
  CHECK_OK(spill_evict(b));
  CHECK(residence(b) == SPILL_RESIDENT); /* b is still pinned */
  CHECK_OK(spill_unpin(&t, s, 1));
  CHECK_STATUS(spill_unpin(&t, s, 1), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("unpinned twice");
  CHECK_OK(spill_evict(b));
  CHECK(residence(b) != SPILL_RESIDENT);
  CHECK_OK(spill_free(b, 0, s));
  CHECK_OK(spill_stream_destroy(0, s));
}

/* A token unpinned twice while another pin still holds the block is refused, and the block
 * stays pinned: before tokens told pins apart, the second unpin ended the other pin's hold,
 * an eviction moved the block while that pin's user still read it, and the error came later,
 * on the correct unpin. Pins past the four a block tells apart fall back to the count. */
TEST(a_token_unpinned_twice_is_refused_while_other_pins_hold_the_block) {
  void* s = NULL;
  void* a = swappable_block_on_a_new_stream(&s);
  spill_pin_token first, second;
  REQUIRE_OK(spill_pin(a, s, &first));
  REQUIRE_OK(spill_pin(a, s, &second));
  CHECK(first.pin != 0 && second.pin != 0 && first.pin != second.pin);
  CHECK_OK(spill_unpin(&first, s, 0));
  CHECK_STATUS(spill_unpin(&first, s, 0), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("unpinned twice");
  CHECK_OK(spill_evict(a));
  CHECK(residence(a) == SPILL_RESIDENT); /* `second` still holds it */
  CHECK_OK(spill_unpin(&second, s, 0));
  /* Six pins: four told apart, two counted; each token ends once, in any order. */
  spill_pin_token six[6];
  for (int i = 0; i < 6; ++i) REQUIRE_OK(spill_pin(a, s, &six[i]));
  CHECK(six[3].pin != 0 && six[4].pin == 0 && six[5].pin == 0);
  CHECK_OK(spill_unpin(&six[4], s, 0));
  CHECK_OK(spill_unpin(&six[1], s, 0));
  CHECK_STATUS(spill_unpin(&six[1], s, 0), SPILL_ERROR_INVALID_ARGUMENT);
  const int order[4] = {5, 0, 3, 2};
  for (int i = 0; i < 4; ++i) CHECK_OK(spill_unpin(&six[order[i]], s, 0));
  CHECK_STATUS(spill_unpin(&six[5], s, 0), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_OK(spill_evict(a));
  CHECK(residence(a) != SPILL_RESIDENT); /* no pin left */
  CHECK_OK(spill_free(a, 0, s));
  CHECK_OK(spill_stream_destroy(0, s));
}

/* A token naming a pin the block never had (corrupted or forged) is refused as such, not as
 * "unpinned twice": ids above the latest given out, and ids given out before the block's life
 * began (another block's pins). The block's real pin is left alone. */
TEST(a_token_with_a_pin_that_never_existed_is_named_so) {
  void* s = NULL;
  void* earlier = swappable_block_on_a_new_stream(&s);
  spill_pin_token other;
  REQUIRE_OK(spill_pin(earlier, s, &other));
  void* a = NULL;
  REQUIRE_OK(spill_malloc(&a, BLOCK, 0, s));
  REQUIRE_OK(spill_set_swappable(a, 1));
  spill_pin_token t;
  REQUIRE_OK(spill_pin(a, s, &t));
  spill_pin_token forged = t;
  forged.pin = t.pin + 12345;
  CHECK_STATUS(spill_unpin(&forged, s, 0), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("was never one of its pins (pins given out so far go up to");
  CHECK_ERROR_HAS("corrupted");
  CHECK(strstr(spill_last_error(), "unpinned twice") == NULL);
  forged.pin = other.pin; /* issued, but before this block's life: another block's pin */
  CHECK_STATUS(spill_unpin(&forged, s, 0), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("its pins have ids above");
  CHECK_OK(spill_evict(a));
  CHECK(residence(a) == SPILL_RESIDENT); /* its own pin still holds it */
  CHECK_OK(spill_unpin(&t, s, 0));
  CHECK_STATUS(spill_unpin(&t, s, 0), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("unpinned twice"); /* a real second unpin still says so */
  CHECK_OK(spill_unpin(&other, s, 0));
  CHECK_OK(spill_free(a, 0, s));
  CHECK_OK(spill_free(earlier, 0, s));
  CHECK_OK(spill_stream_destroy(0, s));
}

/* spill_evict is a hint, but one that cannot start at a full host cap says so (documented):
 * HOST_CAP naming the cap, and the block stays on the device with its bytes. */
TEST(an_eviction_past_the_host_cap_is_refused_and_the_block_stays) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB,host_cap:8MiB,policy:lru"));
  void* b[2];
  for (int i = 0; i < 2; ++i) {
    REQUIRE_OK(spill_malloc(&b[i], BLOCK, 0, NULL));
    write_pinned(b[i], BLOCK, 60 + i);
    REQUIRE_OK(spill_set_swappable(b[i], 1));
  }
  CHECK_OK(spill_evict(b[0])); /* takes the whole cap */
  CHECK_STATUS(spill_evict(b[1]), SPILL_ERROR_HOST_CAP);
  CHECK_ERROR_HAS("host_cap");
  CHECK(residence(b[1]) == SPILL_RESIDENT);
  CHECK(check_pinned(b[1], BLOCK, 61));
  CHECK(check_pinned(b[0], BLOCK, 60)); /* comes back: room for the other */
  CHECK_OK(spill_free(b[0], 0, NULL));
  CHECK_OK(spill_evict(b[1]));
  CHECK(check_pinned(b[1], BLOCK, 61));
  CHECK_OK(spill_free(b[1], 0, NULL));
}

/* Evicts `a` and waits until its bytes are only on the host (a failed evict ends the test:
 * the wait would never end). */
static void evict_whole(void* a) {
  REQUIRE_OK(spill_evict(a));
  while (residence(a) != SPILL_ON_HOST) {
  }
}

/* spill_discard: a block on the host whose bytes are dead comes back with no copy, then
 * holds what is written; a resident block is left alone (its bytes stay). */
TEST(a_discarded_block_comes_back_without_a_copy) {
  void* s = NULL;
  void* a = swappable_block_on_a_new_stream(&s);
  write_pinned(a, BLOCK, 3);
  CHECK_OK(spill_discard(a, BLOCK)); /* resident: nothing changes */
  CHECK(check_pinned(a, BLOCK, 3));
  evict_whole(a);
  const uint64_t in_before = stats().swap_in_bytes_total;
  CHECK_OK(spill_discard(a, BLOCK));
  write_pinned(a, BLOCK, 4); /* maps it back and overwrites it whole */
  CHECK(stats().swap_in_bytes_total == in_before);
  CHECK(check_pinned(a, BLOCK, 4));
  evict_whole(a); /* its new bytes go out and come back */
  CHECK(check_pinned(a, BLOCK, 4));
  CHECK(stats().swap_in_bytes_total == in_before + BLOCK);
  CHECK_OK(spill_free(a, 0, s));
  CHECK_OK(spill_stream_destroy(0, s));
}

/* A range over a part of a block (its first half, its second half: a tensor made over some
 * of its bytes) leaves the rest live: nothing is discarded, the block comes back by a copy
 * with all its bytes. Nonsense ranges are refused naming the block; nothing changes. */
TEST(discarding_part_of_a_block_keeps_all_its_bytes) {
  void* s = NULL;
  void* a = swappable_block_on_a_new_stream(&s);
  write_pinned(a, BLOCK, 5);
  char* half = (char*)a + BLOCK / 2;
  const void* parts[2] = {a, half};
  for (int i = 0; i < 2; ++i) {
    evict_whole(a);
    const uint64_t in_before = stats().swap_in_bytes_total;
    CHECK_OK(spill_discard((void*)parts[i], BLOCK / 2));
    CHECK(check_pinned(a, BLOCK, 5));
    CHECK(stats().swap_in_bytes_total == in_before + BLOCK);
  }
  evict_whole(a);
  const uint64_t in_before = stats().swap_in_bytes_total;
  int local = 0;
  CHECK_STATUS(spill_discard(&local, 4), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(spill_discard(a, 0), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("spill_discard");
  CHECK_ERROR_HAS("bytes is 0");
  CHECK_STATUS(spill_discard(a, BLOCK + 1), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("run past the end of the block at");
  CHECK_STATUS(spill_discard(half, BLOCK / 2 + 1), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("4194305 bytes at");
  CHECK_ERROR_HAS("(8388608 bytes allocated)");
  CHECK(residence(a) == SPILL_ON_HOST);
  CHECK(check_pinned(a, BLOCK, 5));
  CHECK(stats().swap_in_bytes_total == in_before + BLOCK);
  CHECK_OK(spill_free(a, 0, s));
  CHECK_STATUS(spill_discard(a, BLOCK), SPILL_ERROR_INVALID_ARGUMENT); /* freed */
  CHECK_OK(spill_stream_destroy(0, s));
}

/* Rule 5: two threads, two scopes, interleaved ops: no deviations; each scope plans. */
#define STEPS 4
#define LAYERS 6
static pthread_barrier_t barrier;

static void* training_loop(void* arg) {
  const int which = (int)(intptr_t)arg;
  const size_t size = which == 0 ? 4 * MIB : 6 * MIB;
  const uint64_t scope = 1000 + (uint64_t)which;
  void* s = NULL;
  REQUIRE_OK(spill_stream_create(0, &s));
  void* blocks[LAYERS];
  for (int l = 0; l < LAYERS; ++l) {
    REQUIRE_OK(spill_malloc(&blocks[l], size, 0, s));
    REQUIRE_OK(spill_set_swappable(blocks[l], 1));
  }
  for (int step = 0; step < STEPS; ++step) {
    REQUIRE_OK(spill_begin_step(0, scope));
    for (int l = 0; l < LAYERS; ++l) {
      pthread_barrier_wait(&barrier);
      REQUIRE_OK(spill_begin_op(0, scope, "layer"));
      spill_pin_token t;
      REQUIRE_OK(spill_pin(blocks[l], s, &t));
      REQUIRE_OK(spill_unpin(&t, s, 1));
    }
    REQUIRE_OK(spill_end_step(0, scope));
  }
  for (int l = 0; l < LAYERS; ++l) REQUIRE_OK(spill_free(blocks[l], 0, s));
  REQUIRE_OK(spill_stream_destroy(0, s));
  return NULL;
}

TEST(step_scopes_on_two_threads) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:96MiB,policy:plan"));
  pthread_barrier_init(&barrier, NULL, 2);
  pthread_t t0, t1;
  pthread_create(&t0, NULL, training_loop, (void*)(intptr_t)0);
  pthread_create(&t1, NULL, training_loop, (void*)(intptr_t)1);
  pthread_join(t0, NULL);
  pthread_join(t1, NULL);
  spill_stats st = stats();
  CHECK(st.deviations == 0);
  CHECK(st.steps_recorded == 2);
  CHECK(st.steps_planned == 2 * (STEPS - 1));
  /* The recorded step of a scope, as a graph for spill plan. */
  char path[] = "/tmp/spill_c_graph_XXXXXX";
  TEMP_PATH(path);
  REQUIRE_OK(spill_write_step_graph(0, 1001, path));
  const char* buf = c_test_read_and_remove(path);
  CHECK(strstr(buf, "\"ops\"") != NULL);
  CHECK(strstr(buf, "6291456") != NULL); /* scope 1001's blocks are 6 MiB */
  CHECK(strstr(buf, "4194304") == NULL);
  CHECK_STATUS(spill_write_step_graph(0, 7, "/tmp/never-written.json"), SPILL_ERROR_NOT_FOUND);
  CHECK_ERROR_HAS("scope 7");
  CHECK_STATUS(spill_write_step_graph(0, 1000, "/nonexistent-dir/g.json"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("/nonexistent-dir/g.json");
  CHECK_STATUS(spill_write_step_graph(0, 1000, NULL), SPILL_ERROR_INVALID_ARGUMENT);
}

/* A step that skips an op its plan has (a dropped layer) resynchronises with the plan: the
 * deviation is counted, the step counts in steps_resynced (not steps_planned), the C struct
 * and the JSON agree, and every block keeps its bytes. */
TEST(a_step_that_skips_an_op_resynchronises) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:16MiB,policy:plan"));
  void* b[LAYERS];
  swappable_blocks(b, LAYERS, 50u);
  for (int step = 0; step < 5; ++step) {
    REQUIRE_OK(spill_begin_step(0, 3000));
    for (int l = 0; l < LAYERS; ++l) {
      if (step == 3 && l == 2) continue; /* the dropped layer */
      REQUIRE_OK(spill_begin_op(0, 3000, "layer"));
      CHECK(check_pinned(b[l], 4 * MIB, 50u + (unsigned)l));
    }
    REQUIRE_OK(spill_end_step(0, 3000));
  }
  spill_stats st = stats();
  CHECK(st.steps_planned == 2);  /* steps 1 and 2 follow the first step's recording exactly */
  CHECK(st.steps_resynced == 2); /* step 3 skips layer 2; step 4 runs it, off step 3's plan */
  CHECK(st.deviations == 2);
  char* json = NULL;
  REQUIRE_OK(spill_stats_json(0, &json));
  CHECK(strstr(json, "\"swap.steps_resynced\":2") != NULL);
  spill_string_free(json);
  for (int l = 0; l < LAYERS; ++l) CHECK_OK(spill_free(b[l], 0, NULL));
}

/* spill_end_scope drops a scope's recording (the other scope's stays), abandons a step in
 * progress, is OK for a scope that holds nothing, and a later step of the number starts it
 * afresh. */
TEST(end_scope_drops_its_recording) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:96MiB,policy:plan"));
  void* b[2][LAYERS];
  for (int k = 0; k < 2; ++k)
    for (int l = 0; l < LAYERS; ++l) {
      REQUIRE_OK(spill_malloc(&b[k][l], (size_t)(4 + 2 * k) * MIB, 0, NULL));
      fill(b[k][l], (size_t)(4 + 2 * k) * MIB, 10 * k + l);
      REQUIRE_OK(spill_set_swappable(b[k][l], 1));
    }
  for (int step = 0; step < 2; ++step)
    for (int k = 0; k < 2; ++k) {
      REQUIRE_OK(spill_begin_step(0, 2000 + (uint64_t)k));
      for (int l = 0; l < LAYERS; ++l) {
        spill_pin_token t;
        REQUIRE_OK(spill_pin_for_host(b[k][l], &t));
        REQUIRE_OK(spill_unpin(&t, NULL, 0));
      }
      REQUIRE_OK(spill_end_step(0, 2000 + (uint64_t)k));
    }
  CHECK(stats().steps_recorded == 2);
  CHECK_OK(spill_end_scope(0, 2001));
  CHECK_STATUS(spill_write_step_graph(0, 2001, "/tmp/never-written.json"), SPILL_ERROR_NOT_FOUND);
  char path[] = "/tmp/spill_c_scope_XXXXXX";
  TEMP_PATH(path);
  CHECK_OK(spill_write_step_graph(0, 2000, path)); /* the other scope keeps its recording */
  unlink(path);
  CHECK_OK(spill_end_scope(0, 2001));    /* already ended */
  CHECK_OK(spill_end_scope(0, 424242));  /* never begun */
  CHECK_STATUS(spill_end_scope(-1, 2000), SPILL_ERROR_INVALID_ARGUMENT);
  /* A step in progress is abandoned: not recorded; the next step of the number is. */
  REQUIRE_OK(spill_begin_step(0, 2001));
  spill_pin_token t;
  REQUIRE_OK(spill_pin_for_host(b[1][0], &t));
  CHECK_OK(spill_end_scope(0, 2001));
  REQUIRE_OK(spill_unpin(&t, NULL, 0));
  CHECK_OK(spill_end_step(0, 2001)); /* nothing left to end */
  CHECK(stats().steps_recorded == 2);
  CHECK_STATUS(spill_write_step_graph(0, 2001, "/tmp/never-written.json"), SPILL_ERROR_NOT_FOUND);
  REQUIRE_OK(spill_begin_step(0, 2001));
  REQUIRE_OK(spill_pin_for_host(b[1][0], &t));
  REQUIRE_OK(spill_unpin(&t, NULL, 0));
  REQUIRE_OK(spill_end_step(0, 2001));
  CHECK(stats().steps_recorded == 3);
  for (int k = 0; k < 2; ++k)
    for (int l = 0; l < LAYERS; ++l) {
      CHECK(check_pinned(b[k][l], (size_t)(4 + 2 * k) * MIB, 10 * k + l));
      CHECK_OK(spill_free(b[k][l], 0, NULL));
    }
}

/* A backward on another thread (PyTorch's CUDA backward runs on autograd's device thread) that
 * names the step's scope with spill_set_scope before its pins: its pins make the same ops as on
 * the step's own thread, later steps follow the plan, and every block keeps its bytes. Named
 * with spill_begin_op instead, the rest of the step (backward and optimizer) is one op: the
 * recording has fewer ops and the plan prefetches nothing inside it. Each step: forward (read
 * the layer's weight, write a new activation), backward in reverse (read the activation and
 * the weight, free the activation), optimizer (read the weight, write its state). */
enum join { JOIN_NONE, JOIN_SET_SCOPE, JOIN_BEGIN_OP };
#define JOIN_SCOPE 4000u
#define JOIN_STEPS 5

struct backward_args {
  enum join join;
  int step;
  void** weights;
  void** acts;
  int failures; /* checks that failed on the backward thread */
};

static void* backward(void* arg) {
  struct backward_args* b = (struct backward_args*)arg;
  if (b->join == JOIN_SET_SCOPE) REQUIRE_OK(spill_set_scope(0, JOIN_SCOPE));
  if (b->join == JOIN_BEGIN_OP) REQUIRE_OK(spill_begin_op(0, JOIN_SCOPE, NULL));
  for (int l = LAYERS - 1; l >= 0; --l) {
    b->failures += !check_pinned(b->acts[l], 4 * MIB, 1000u * (unsigned)b->step + (unsigned)l);
    b->failures += !check_pinned(b->weights[l], 4 * MIB, 100u + (unsigned)l);
    REQUIRE_OK(spill_free(b->acts[l], 0, NULL));
  }
  return NULL;
}

/* The ops of the scope's last recorded step: every op of the graph has a "reads" field (the
 * tensors have none). */
static int recorded_ops(uint64_t scope) {
  char path[] = "/tmp/spill_c_join_XXXXXX";
  TEMP_PATH(path);
  REQUIRE_OK(spill_write_step_graph(0, scope, path));
  const char* buf = c_test_read_and_remove(path);
  int count = 0;
  for (const char* p = strstr(buf, "\"reads\""); p != NULL; p = strstr(p + 1, "\"reads\"")) ++count;
  return count;
}

struct join_result {
  int ops;
  spill_stats st;
  uint64_t demand[JOIN_STEPS + 1]; /* demand fetches of each step (1-based) */
};

static struct join_result join_run(enum join join) {
  struct join_result r;
  memset(&r, 0, sizeof r);
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:24MiB,policy:plan"));
  void* w[LAYERS];
  void* state[LAYERS];
  void* acts[LAYERS];
  swappable_blocks(w, LAYERS, 100u);
  uint64_t demand = 0;
  for (int step = 1; step <= JOIN_STEPS; ++step) {
    REQUIRE_OK(spill_begin_step(0, JOIN_SCOPE));
    for (int l = 0; l < LAYERS; ++l) {
      CHECK(check_pinned(w[l], 4 * MIB, 100u + (unsigned)l));
      REQUIRE_OK(spill_malloc(&acts[l], 4 * MIB, 0, NULL));
      write_pinned(acts[l], 4 * MIB, 1000u * (unsigned)step + (unsigned)l);
      REQUIRE_OK(spill_set_swappable(acts[l], 1));
    }
    struct backward_args b = {join, step, w, acts, 0};
    if (join == JOIN_NONE) {
      backward(&b);
    } else {
      pthread_t t;
      REQUIRE(pthread_create(&t, NULL, backward, &b) == 0);
      pthread_join(t, NULL);
    }
    CHECK(b.failures == 0);
    for (int l = 0; l < LAYERS; ++l) {
      CHECK(check_pinned(w[l], 4 * MIB, 100u + (unsigned)l));
      if (step == 1) {
        REQUIRE_OK(spill_malloc(&state[l], 4 * MIB, 0, NULL));
      } else {
        CHECK(check_pinned(state[l], 4 * MIB, 5000u + (unsigned)step - 1));
      }
      write_pinned(state[l], 4 * MIB, 5000u + (unsigned)step);
      if (step == 1) REQUIRE_OK(spill_set_swappable(state[l], 1));
    }
    REQUIRE_OK(spill_end_step(0, JOIN_SCOPE));
    const uint64_t total = stats().demand_fetches;
    r.demand[step] = total - demand;
    demand = total;
  }
  r.ops = recorded_ops(JOIN_SCOPE);
  r.st = stats();
  for (int l = 0; l < LAYERS; ++l) {
    CHECK(check_pinned(w[l], 4 * MIB, 100u + (unsigned)l));
    CHECK(check_pinned(state[l], 4 * MIB, 5000u + JOIN_STEPS));
    CHECK_OK(spill_free(w[l], 0, NULL));
    CHECK_OK(spill_free(state[l], 0, NULL));
  }
  REQUIRE_OK(spill_shutdown());
  return r;
}

/* Step 1 is recorded; step 2 reads the optimizer state step 1 created (a deviation: recorded
 * again); steps 3 to 5 follow the plan. */
TEST(a_backward_on_another_thread_that_sets_the_scope_keeps_its_ops) {
  struct join_result r[3];
  for (int j = JOIN_NONE; j <= JOIN_BEGIN_OP; ++j) r[j] = join_run((enum join)j);
  for (int j = JOIN_NONE; j <= JOIN_BEGIN_OP; ++j)
    fprintf(stderr, "%s: %d ops; steps planned %llu; prefetch hits %llu; demand fetches by step"
            " %llu %llu %llu %llu %llu\n",
            j == JOIN_NONE ? "one thread" : j == JOIN_SET_SCOPE ? "set_scope" : "begin_op", r[j].ops,
            (unsigned long long)r[j].st.steps_planned, (unsigned long long)r[j].st.prefetch_hits,
            (unsigned long long)r[j].demand[1], (unsigned long long)r[j].demand[2],
            (unsigned long long)r[j].demand[3], (unsigned long long)r[j].demand[4],
            (unsigned long long)r[j].demand[5]);
  /* Each pin_for_host of a block after an unpin starts an op: forward 2 per layer, backward 2,
   * optimizer 3 (weight, state read, state write). */
  CHECK(r[JOIN_NONE].ops == 7 * LAYERS);
  CHECK(r[JOIN_SET_SCOPE].ops == r[JOIN_NONE].ops); /* the backward thread's pins, as on one */
  CHECK(r[JOIN_BEGIN_OP].ops == 2 * LAYERS + 1);    /* the forward's ops, then one */
  CHECK(r[JOIN_SET_SCOPE].st.steps_planned == r[JOIN_NONE].st.steps_planned);
  CHECK(r[JOIN_SET_SCOPE].st.steps_planned >= JOIN_STEPS - 2);
  CHECK(r[JOIN_SET_SCOPE].st.prefetch_hits > 0);
  /* The planned steps fetch on demand less than the recorded first step did; with begin_op the
   * one op of backward and optimizer is where the plan prefetches nothing. */
  uint64_t planned_demand[3] = {0, 0, 0};
  for (int j = JOIN_NONE; j <= JOIN_BEGIN_OP; ++j)
    for (int step = 3; step <= JOIN_STEPS; ++step) planned_demand[j] += r[j].demand[step];
  for (int step = 3; step <= JOIN_STEPS; ++step)
    CHECK(r[JOIN_SET_SCOPE].demand[step] < r[JOIN_SET_SCOPE].demand[1]);
  CHECK(planned_demand[JOIN_SET_SCOPE] < planned_demand[JOIN_BEGIN_OP]);
}

/* spill_set_scope's errors name the call: an ordinal that is no device, and any device after
 * spill_shutdown. A device without a runtime yet gets one (its first use), and a runtime
 * without a swapper (policy:none) has no scopes to set: both are SPILL_OK. */
TEST(set_scope_errors_name_the_call) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:plan"));
  CHECK_STATUS(spill_set_scope(-1, 5), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("spill_set_scope: device -1 is not a device ordinal");
  CHECK_STATUS(spill_set_scope(SPILL_MAX_DEVICES, 5), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("spill_set_scope");
  CHECK_OK(spill_set_scope(0, 5));
  CHECK_OK(spill_set_scope(3, 5)); /* device 3's first use: its own simulated device */
  spill_stats st;
  st.struct_size = sizeof st;
  CHECK_OK(spill_get_stats(3, &st));
  CHECK(st.device == 3 && st.simulated == 1);
  REQUIRE_OK(spill_shutdown());
  CHECK_STATUS(spill_set_scope(0, 5), SPILL_ERROR_SHUT_DOWN);
  CHECK_ERROR_HAS("spill_set_scope: spill was shut down");
  CHECK_STATUS(spill_set_scope(3, 5), SPILL_ERROR_SHUT_DOWN);
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:none"));
  CHECK_OK(spill_set_scope(0, 5));
  REQUIRE_OK(spill_shutdown());
}

/* Steps of two variants (a wide step also makes and uses a second block in each layer, an
 * activation: a batch of another length has tensors over swap_threshold that a shorter one
 * keeps under it), each keyed with spill_step_key right after spill_begin_step: the first wide
 * step leaves the narrow plan and is recorded; from then on each step follows its own
 * variant's plan, and every block keeps its bytes. */
static void variant_step(void* a[], int step, int wide) {
  REQUIRE_OK(spill_begin_step(0, 4000));
  REQUIRE_OK(spill_step_key(0, 4000, wide ? 48 : 32));
  void* b[LAYERS];
  for (int l = 0; l < LAYERS; ++l) {
    REQUIRE_OK(spill_begin_op(0, 4000, "layer"));
    CHECK(check_pinned(a[l], 4 * MIB, 60u + (unsigned)l));
    if (!wide) continue;
    REQUIRE_OK(spill_malloc(&b[l], 4 * MIB, 0, NULL));
    write_pinned(b[l], 4 * MIB, 80u + (unsigned)(step * LAYERS + l));
    REQUIRE_OK(spill_set_swappable(b[l], 1));
  }
  for (int l = LAYERS - 1; l >= 0 && wide; --l) {
    REQUIRE_OK(spill_begin_op(0, 4000, "back"));
    CHECK(check_pinned(b[l], 4 * MIB, 80u + (unsigned)(step * LAYERS + l)));
    REQUIRE_OK(spill_free(b[l], 0, NULL));
  }
  REQUIRE_OK(spill_end_step(0, 4000));
}

TEST(steps_keyed_by_variant_follow_their_own_plans) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:16MiB,policy:plan"));
  void* a[LAYERS];
  swappable_blocks(a, LAYERS, 60u);
  const int wide[] = {0, 1, 0, 1, 1, 0, 0, 1, 0};
  const int steps = (int)(sizeof wide / sizeof wide[0]);
  for (int step = 0; step < steps; ++step) variant_step(a, step, wide[step]);
  spill_stats st = stats();
  CHECK(st.steps_recorded == 2); /* the narrow step 0, the wide step 1 */
  CHECK(st.deviations == 1);     /* step 1 */
  CHECK(st.steps_planned == (uint64_t)steps - 2);
  /* No step in progress: nothing to key. */
  CHECK_OK(spill_step_key(0, 4000, 32));
  CHECK_OK(spill_step_key(0, 4001, 32));
  for (int l = 0; l < LAYERS; ++l) CHECK_OK(spill_free(a[l], 0, NULL));
}

/* spill_step_key from one thread while another ends the scope after steps whose ends issue
 * planned prefetches: the key's wait for those prefetches looks the scope up again at each
 * wake-up (audit 33a: it kept a reference to the scope's state, which spill_end_scope freed;
 * ASan reported the use after free). */
static volatile int keying_stops = 0;
static void* keyer(void* arg) {
  (void)arg;
  for (uint64_t k = 0; !keying_stops; ++k) REQUIRE_OK(spill_step_key(0, 5, k & 1));
  return NULL;
}

TEST(step_key_while_the_scope_ends_on_another_thread) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:16MiB,policy:plan"));
  void* w[8];
  swappable_blocks(w, 8, 90u);
  keying_stops = 0;
  pthread_t th;
  pthread_create(&th, NULL, keyer, NULL);
  for (int r = 0; r < 60; ++r) {
    REQUIRE_OK(spill_begin_step(0, 5));
    for (int l = 0; l < 8; ++l) {
      REQUIRE_OK(spill_begin_op(0, 5, "layer"));
      CHECK(check_pinned(w[l], 4 * MIB, 90u + (unsigned)l));
    }
    REQUIRE_OK(spill_end_step(0, 5)); /* the next step's first prefetches */
    if (r % 3 == 2) REQUIRE_OK(spill_end_scope(0, 5));
  }
  keying_stops = 1;
  pthread_join(th, NULL);
  for (int l = 0; l < 8; ++l) CHECK_OK(spill_free(w[l], 0, NULL));
}

/* The accesses in the reads of the scope's recorded step. */
static int recorded_reads(uint64_t scope) {
  char path[] = "/tmp/spill_c_reads_XXXXXX";
  TEMP_PATH(path);
  REQUIRE_OK(spill_write_step_graph(0, scope, path));
  const char* buf = c_test_read_and_remove(path);
  int count = 0;
  for (const char* p = strstr(buf, "\"reads\": ["); p != NULL; p = strstr(p + 1, "\"reads\": [")) {
    const char* q = p + strlen("\"reads\": [");
    if (*q == ']') continue;
    for (++count; *q != ']'; ++q) count += *q == ',';
  }
  return count;
}

/* spill_step_key for another scope (another model's next step) leaves the calling thread's
 * current scope: the pins that follow without spill_begin_op (an optimizer's) stay in the
 * thread's step. Before (audit 33a F4), they went to the keyed scope, which had no step open. */
static int reads_of_a_step_with_a_key_for(uint64_t other) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB,policy:plan"));
  void* w[6];
  swappable_blocks(w, 6, 70u);
  REQUIRE_OK(spill_begin_step(0, 1));
  for (int l = 0; l < 6; ++l) {
    REQUIRE_OK(spill_begin_op(0, 1, "layer"));
    CHECK(check_pinned(w[l], 4 * MIB, 70u + (unsigned)l));
  }
  if (other != 0) REQUIRE_OK(spill_step_key(0, other, 5));
  for (int l = 0; l < 6; ++l) CHECK(check_pinned(w[l], 4 * MIB, 70u + (unsigned)l));
  REQUIRE_OK(spill_end_step(0, 1));
  const int reads = recorded_reads(1);
  for (int l = 0; l < 6; ++l) CHECK_OK(spill_free(w[l], 0, NULL));
  REQUIRE_OK(spill_shutdown());
  return reads;
}

TEST(step_key_for_another_scope_leaves_the_current_scope) {
  const int plain = reads_of_a_step_with_a_key_for(0);
  CHECK(plain >= 6);
  CHECK(reads_of_a_step_with_a_key_for(2) == plain);
}

/* spill_step_key's errors name the call, as spill_set_scope's do; on a runtime without a
 * swapper it does nothing. */
TEST(step_key_errors_name_the_call) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:plan"));
  CHECK_STATUS(spill_step_key(-1, 5, 1), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("spill_step_key: device -1 is not a device ordinal");
  CHECK_STATUS(spill_step_key(SPILL_MAX_DEVICES, 5, 1), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("spill_step_key");
  CHECK_OK(spill_step_key(0, 5, UINT64_MAX));
  REQUIRE_OK(spill_shutdown());
  CHECK_STATUS(spill_step_key(0, 5, 1), SPILL_ERROR_SHUT_DOWN);
  CHECK_ERROR_HAS("spill_step_key: spill was shut down");
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:none"));
  CHECK_OK(spill_step_key(0, 5, 1));
  REQUIRE_OK(spill_shutdown());
}

/* Lowering the budget evicts declared blocks; their bytes survive. */
/* The ops a step of `scope` records when it pins a, unpins it, then reads b's generation
 * (read_b 1) or pins and unpins b (read_b 2), then pins and unpins a again. */
static int ops_around_a_look_at(void* a, void* b, uint64_t scope, int read_b,
                                uint64_t* generation) {
  REQUIRE_OK(spill_begin_step(0, scope));
  spill_pin_token t;
  REQUIRE_OK(spill_pin_for_host(a, &t));
  REQUIRE_OK(spill_unpin(&t, NULL, 0));
  if (read_b == 1) {
    REQUIRE_OK(spill_get_generation(b, generation));
  } else {
    REQUIRE_OK(spill_pin_for_host(b, &t));
    *generation = t.generation;
    REQUIRE_OK(spill_unpin(&t, NULL, 0));
  }
  REQUIRE_OK(spill_pin_for_host(a, &t));
  REQUIRE_OK(spill_unpin(&t, NULL, 0));
  REQUIRE_OK(spill_end_step(0, scope));
  return recorded_ops(scope);
}

/* spill_get_generation: a pin token's generation, read without a pin (the step records no
 * use: spill.torch's window keeps addresses across frees and reads them so); a new block at
 * a freed block's address has another; 0 for a block that never moves; named errors. */
TEST(generations_are_read_without_a_pin) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB,policy:plan"));
  void* a = NULL;
  void* b = NULL;
  REQUIRE_OK(spill_malloc(&a, BLOCK, 0, NULL));
  REQUIRE_OK(spill_malloc(&b, BLOCK, 0, NULL));
  REQUIRE_OK(spill_set_swappable(a, 1));
  REQUIRE_OK(spill_set_swappable(b, 1));
  uint64_t read = 0, pinned = 0;
  CHECK(ops_around_a_look_at(a, b, 6001, 1, &read) == 2);
  CHECK(ops_around_a_look_at(a, b, 6002, 2, &pinned) == 3); /* a pin of b is an op */
  CHECK(read != 0 && read == pinned);
  uint64_t inside = 0;
  CHECK_OK(spill_get_generation((char*)b + MIB, &inside)); /* an interior pointer */
  CHECK(inside == read);
  CHECK_OK(spill_evict(b));
  CHECK_OK(spill_get_generation(b, &inside)); /* wherever its bytes are */
  CHECK(inside == read);
  CHECK_OK(spill_free(b, 0, NULL));
  void* again = NULL;
  REQUIRE_OK(spill_malloc(&again, BLOCK, 0, NULL));
  uint64_t next = 0;
  CHECK_OK(spill_get_generation(again, &next));
  CHECK(next != 0 && next != read);
  void* small = NULL;
  REQUIRE_OK(spill_malloc(&small, 4096, 0, NULL));
  uint64_t never = 1;
  CHECK_OK(spill_get_generation(small, &never));
  CHECK(never == 0);
  int local = 0;
  CHECK_STATUS(spill_get_generation(&local, &never), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(&local));
  CHECK_STATUS(spill_get_generation(a, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("generation is NULL");
  CHECK_OK(spill_free(small, 0, NULL));
  CHECK_OK(spill_free(again, 0, NULL));
  CHECK_OK(spill_free(a, 0, NULL));
}

/* spill_get_block_info: what a check of uses without pins reads (declared swappable, open
 * pins, residence) follows the block through a declaration, pins, an eviction and a free, from
 * an interior pointer too; pinning it for a look is not needed (the step records no use); a
 * block that never moves reads movable 0; named errors. */
TEST(block_info_follows_declarations_pins_and_residence) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB,policy:plan"));
  void* a = NULL;
  REQUIRE_OK(spill_malloc(&a, BLOCK - 1000, 0, NULL));
  spill_block_info info;
  REQUIRE_OK(spill_get_block_info((char*)a + MIB, &info));
  CHECK(info.base == (uint64_t)(uintptr_t)a && info.size == BLOCK - 1000);
  CHECK(info.movable == 1 && info.swappable == 0 && info.pins == 0);
  CHECK(info.residence == SPILL_RESIDENT && info.generation != 0);
  uint64_t generation = 0;
  CHECK_OK(spill_get_generation(a, &generation));
  CHECK(info.generation == generation);
  REQUIRE_OK(spill_set_swappable(a, 1));
  spill_pin_token t1, t2;
  REQUIRE_OK(spill_pin_for_host(a, &t1));
  REQUIRE_OK(spill_pin_for_host((char*)a + 64, &t2));
  CHECK_OK(spill_get_block_info(a, &info));
  CHECK(info.swappable == 1 && info.pins == 2);
  CHECK_OK(spill_unpin(&t2, NULL, 0));
  CHECK_OK(spill_get_block_info(a, &info));
  CHECK(info.pins == 1);
  CHECK_OK(spill_unpin(&t1, NULL, 0));
  CHECK_OK(spill_evict(a));
  CHECK_OK(spill_get_block_info(a, &info));
  CHECK(info.pins == 0 && info.swappable == 1);
  CHECK(info.residence == SPILL_ON_HOST || info.residence == SPILL_SWAPPING_OUT);
  spill_stats before = stats();
  CHECK_OK(spill_get_block_info(a, &info)); /* a look brings nothing back */
  CHECK(stats().swap_ins == before.swap_ins);
  CHECK(info.residence == SPILL_ON_HOST || info.residence == SPILL_SWAPPING_OUT);
  REQUIRE_OK(spill_set_swappable(a, 0));
  CHECK_OK(spill_get_block_info(a, &info));
  CHECK(info.swappable == 0 && info.residence == SPILL_RESIDENT);
  void* small = NULL;
  REQUIRE_OK(spill_malloc(&small, 4096, 0, NULL));
  CHECK_OK(spill_get_block_info(small, &info));
  CHECK(info.base == (uint64_t)(uintptr_t)small && info.size == 4096);
  CHECK(info.movable == 0 && info.swappable == 0 && info.pins == 0 && info.generation == 0);
  CHECK(info.residence == SPILL_RESIDENT);
  int local = 0;
  CHECK_STATUS(spill_get_block_info(&local, &info), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("spill_get_block_info");
  CHECK_ERROR_HAS(c_test_address(&local));
  CHECK_STATUS(spill_get_block_info(a, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("info is NULL");
  CHECK_OK(spill_free(small, 0, NULL));
  CHECK_OK(spill_free(a, 0, NULL));
  CHECK_STATUS(spill_get_block_info(a, &info), SPILL_ERROR_INVALID_ARGUMENT);
}

TEST(lowering_the_budget_evicts) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB,policy:lru"));
  void* b[6];
  for (int i = 0; i < 6; ++i) {
    REQUIRE_OK(spill_malloc(&b[i], BLOCK, 0, NULL));
    fill(b[i], BLOCK, 20 + i);
    REQUIRE_OK(spill_set_swappable(b[i], 1));
  }
  CHECK_OK(spill_set_budget(0, 24u * MIB));
  spill_stats st = stats();
  CHECK(st.reserved_bytes <= 24u * MIB);
  CHECK(st.swapped_out_bytes >= 24u * MIB);
  for (int i = 0; i < 6; ++i) CHECK(check_pinned(b[i], BLOCK, 20 + i));
  for (int i = 0; i < 6; ++i) CHECK_OK(spill_free(b[i], 0, NULL));
}

/* Lowering the budget stopped by a full host cap says so (before, it blamed pinned and
 * undeclared blocks, then listed none of either). The blocks it evicted before giving up stay
 * on the host, their bytes intact, and the stats agree with the blocks' residences. */
TEST(lowering_the_budget_names_a_full_host_cap) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB,host_cap:16MiB,policy:lru"));
  enum { N = 10 };
  const size_t size = 4u * MIB;
  void* b[N];
  for (int i = 0; i < N; ++i) {
    REQUIRE_OK(spill_malloc(&b[i], size, 0, NULL));
    write_pinned(b[i], size, 40 + i);
    REQUIRE_OK(spill_set_swappable(b[i], 1));
  }
  CHECK_STATUS(spill_set_budget(0, 8u * MIB), SPILL_ERROR_OUT_OF_MEMORY);
  CHECK_ERROR_HAS("the host cap is full: host_cap 16.00 MiB, 16.00 MiB of it in use");
  CHECK_ERROR_HAS("raise host_cap:");
  CHECK_ERROR_HAS("the budget stays 64.00 MiB (blocks evicted on the way stay on the host, "
                  "16.00 MiB swapped out now)");
  { /* The source location stays last, after the residency report (audit 41a #4). */
    const char* msg = spill_last_error();
    const char* loc = strstr(msg, " [allocator_budget.cpp:");
    CHECK(loc != NULL && strchr(loc, ']') == msg + strlen(msg) - 1);
  }
  uint64_t budget = 0;
  CHECK_OK(spill_get_budget(0, &budget));
  CHECK(budget == 64u * MIB);
  size_t away = 0;
  for (int i = 0; i < N; ++i)
    if (residence(b[i]) != SPILL_RESIDENT) away += size;
  spill_stats st = stats();
  CHECK(away == 16u * MIB);
  CHECK(st.swapped_out_bytes == away);
  CHECK(st.allocated_bytes == N * size);
  CHECK(st.reserved_bytes == N * size - away);
  for (int i = 0; i < N; ++i) CHECK(check_pinned(b[i], size, 40 + i));
  for (int i = 0; i < N; ++i) CHECK_OK(spill_free(b[i], 0, NULL));
}

/* A block freed while its prefetch lands: the memory's next owner, handed out at once and
 * written by the host, keeps its bytes (spill_free waits on the host for the copy of a block
 * ever pinned for the host; before, the copy landed over the new bytes). time_scale makes the
 * copy take about 7 ms of wall time; the test waits 100 ms before it reads. */
TEST(memory_freed_while_its_prefetch_lands_keeps_its_next_owners_bytes) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:lru,time_scale:20"));
  void* a = NULL;
  REQUIRE_OK(spill_malloc(&a, BLOCK, 0, NULL));
  REQUIRE_OK(spill_set_swappable(a, 1));
  write_pinned(a, BLOCK, 31);
  evict_whole(a);
  REQUIRE_OK(spill_prefetch(a));
  REQUIRE(residence(a) == SPILL_SWAPPING_IN);
  CHECK_OK(spill_free(a, 0, NULL));
  void* b = NULL;
  REQUIRE_OK(spill_malloc(&b, BLOCK, 0, NULL));
  REQUIRE(b == a); /* the same memory, handed out again at once */
  write_pinned(b, BLOCK, 32);
  const struct timespec later = {0, 100 * 1000 * 1000};
  nanosleep(&later, NULL);
  CHECK(check_pinned(b, BLOCK, 32));
  CHECK_OK(spill_free(b, 0, NULL));
}

/* Rule 6: shutdown with blocks pinned, on the host and in flight frees everything. */
TEST(shutdown_with_live_blocks) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:lru,chaos:7"));
  void* s = NULL;
  REQUIRE_OK(spill_stream_create(0, &s));
  void* b[6];
  for (int i = 0; i < 6; ++i) {
    REQUIRE_OK(spill_malloc(&b[i], BLOCK, 0, s));
    fill(b[i], BLOCK, i);
    REQUIRE_OK(spill_set_swappable(b[i], 1));
    if (i >= 3) REQUIRE_OK(spill_evict(b[i - 3]));
  }
  spill_pin_token t;
  REQUIRE_OK(spill_pin(b[5], s, &t));
  REQUIRE_OK(spill_prefetch(b[0]));
  CHECK_OK(spill_shutdown());
  CHECK_STATUS(spill_unpin(&t, s, 1), SPILL_ERROR_SHUT_DOWN);
  CHECK_STATUS(spill_pin(b[1], NULL, &t), SPILL_ERROR_SHUT_DOWN);
  CHECK_STATUS(spill_set_swappable(b[1], 1), SPILL_ERROR_SHUT_DOWN);
  CHECK_STATUS(spill_begin_step(0, 1), SPILL_ERROR_SHUT_DOWN);
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:lru"));
  void* p = NULL;
  CHECK_OK(spill_malloc(&p, BLOCK, 0, NULL));
  CHECK_OK(spill_free(p, 0, NULL));
}

/* Rule 5 across sessions: a token kept across spill_shutdown and spill_init is stale in the
 * new session, even when a new block has the old one's address (generations are unique in the
 * process; each runtime used to count them from 1, and the old token unpinned the new block). */
TEST(a_token_from_an_earlier_session_is_stale) {
  spill_pin_token old = {0};
  int address_reused = 0;
  for (int session = 0; session < 10 && !address_reused; ++session) {
    REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB,policy:lru"));
    void* p = NULL;
    REQUIRE_OK(spill_malloc(&p, BLOCK, 0, NULL));
    REQUIRE_OK(spill_set_swappable(p, 1));
    spill_pin_token t;
    REQUIRE_OK(spill_pin(p, NULL, &t));
    if (session > 0) CHECK(t.generation != old.generation);
    if (session > 0 && t.block == old.block) {
      address_reused = 1;
      CHECK_OK(spill_unpin(&old, NULL, 1)); /* a stale no-op */
      CHECK(stats().stale_unpins == 1);
      CHECK_OK(spill_evict(p));
      CHECK(residence(p) == SPILL_RESIDENT); /* still pinned by its own token */
      CHECK_OK(spill_unpin(&t, NULL, 1));    /* not "unpinned twice" */
    }
    old = t; /* kept open across the shutdown */
    REQUIRE_OK(spill_shutdown());
  }
  if (!address_reused) fprintf(stderr, "note: no session reused the old block's address\n");
}

/* The same before the new session has started the token's device (audit 41a #1): the unpin
 * was refused ("device 0 has no runtime yet") until some call started it, so a framework's
 * queued unpins after a re-init failed or not by call order. A device the new session never
 * starts is the same. */
TEST(a_token_from_an_earlier_session_unpins_before_its_device_starts_again) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB,policy:lru"));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, BLOCK, 0, NULL));
  REQUIRE_OK(spill_set_swappable(p, 1));
  spill_pin_token t, h;
  REQUIRE_OK(spill_pin(p, NULL, &t));
  void* q = NULL;
  REQUIRE_OK(spill_malloc(&q, BLOCK, 1, NULL));
  REQUIRE_OK(spill_set_swappable(q, 1));
  REQUIRE_OK(spill_pin_for_host(q, &h));
  REQUIRE_OK(spill_shutdown());
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:64MiB,policy:lru"));
  CHECK_OK(spill_unpin(&t, NULL, 1)); /* device 0 not started yet */
  CHECK_OK(spill_unpin(&h, NULL, 0)); /* device 1 never is */
  void* r = NULL;
  REQUIRE_OK(spill_malloc(&r, BLOCK, 0, NULL)); /* device 0 starts: its counters are new */
  CHECK(stats().stale_unpins == 0);
  CHECK_OK(spill_free(r, 0, NULL));
  /* A token of a device that was never valid is still an error. */
  spill_pin_token bad = t;
  bad.device = 99;
  CHECK_STATUS(spill_unpin(&bad, NULL, 1), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("device 99 is not a device ordinal");
  REQUIRE_OK(spill_shutdown());
}

/* Pinned host memory is scarce on a real host (it cannot be paged out): spill_empty_cache
 * gives back the host pool's chunks that hold no swapped-out bytes, and keeps those that do. */
TEST(empty_cache_gives_back_pinned_host_memory_that_holds_nothing) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:lru"));
  enum { N = 8 };
  void* b[N];
  for (int i = 0; i < N; ++i) { /* 64 MiB of blocks in a 32 MiB budget */
    REQUIRE_OK(spill_malloc(&b[i], BLOCK, 0, NULL));
    write_pinned(b[i], BLOCK, 20 + i);
    REQUIRE_OK(spill_set_swappable(b[i], 1));
  }
  CHECK(stats().swap_outs > 0);
  CHECK(stats().host_pinned_bytes > 0);
  /* One block stays on the host; the others go. */
  evict_whole(b[0]);
  for (int i = 1; i < N; ++i) REQUIRE_OK(spill_free(b[i], 0, NULL));
  CHECK_OK(spill_empty_cache(0));
  spill_stats st = stats();
  CHECK(st.swapped_out_bytes == BLOCK);
  CHECK(st.host_pinned_bytes >= BLOCK); /* the chunk that holds its bytes stays */
  CHECK(residence(b[0]) == SPILL_ON_HOST);
  CHECK(check_pinned(b[0], BLOCK, 20));
  CHECK_OK(spill_free(b[0], 0, NULL));
  CHECK_OK(spill_empty_cache(0));
  st = stats();
  CHECK(st.swapped_out_bytes == 0);
  CHECK(st.host_pinned_bytes == 0);
}

#define TESTS(X)                       \
  X(declared_blocks_swap_and_come_back) \
  X(undeclared_blocks_are_never_evicted) \
  X(declaring_makes_a_block_dirty)     \
  X(undeclaring_brings_a_block_back)   \
  X(pins_of_blocks_that_never_move)    \
  X(stale_tokens)                      \
  X(a_token_from_an_earlier_session_is_stale) \
  X(a_token_from_an_earlier_session_unpins_before_its_device_starts_again) \
  X(empty_cache_gives_back_pinned_host_memory_that_holds_nothing) \
  X(a_token_unpinned_twice_is_refused_while_other_pins_hold_the_block) \
  X(a_token_with_a_pin_that_never_existed_is_named_so) \
  X(an_eviction_past_the_host_cap_is_refused_and_the_block_stays) \
  X(a_discarded_block_comes_back_without_a_copy) \
  X(discarding_part_of_a_block_keeps_all_its_bytes) \
  X(step_scopes_on_two_threads)        \
  X(a_step_that_skips_an_op_resynchronises) \
  X(end_scope_drops_its_recording)     \
  X(a_backward_on_another_thread_that_sets_the_scope_keeps_its_ops) \
  X(set_scope_errors_name_the_call)   \
  X(steps_keyed_by_variant_follow_their_own_plans) \
  X(step_key_errors_name_the_call)    \
  X(step_key_for_another_scope_leaves_the_current_scope) \
  X(step_key_while_the_scope_ends_on_another_thread) \
  X(generations_are_read_without_a_pin) \
  X(block_info_follows_declarations_pins_and_residence) \
  X(lowering_the_budget_evicts)        \
  X(lowering_the_budget_names_a_full_host_cap) \
  X(memory_freed_while_its_prefetch_lands_keeps_its_next_owners_bytes) \
  X(shutdown_with_live_blocks)

C_TEST_MAIN(TESTS)

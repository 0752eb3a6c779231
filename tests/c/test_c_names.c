/* Block names (spill_set_block_name, spill_get_block_name): naming, renaming, clearing, bad
 * pointers and names, a freed block's address reused without the name, and the name in the
 * views that list blocks: the snapshot (block, history), the out-of-memory messages (the
 * allocator's and a failed pin's) and the trace. Every test runs in its own process on the
 * simulated device. */
#define _POSIX_C_SOURCE 200809L
#include "c_test.h"

#include <stdint.h>

#define CONF "device:sim,sim_capacity:1GiB,budget:256MiB"
#define MiB ((size_t)1 << 20)

/* The block's name as spill_get_block_name gives it, in a buffer the next call reuses. */
static const char* name_of(const void* p) {
  static char buf[512];
  char* name = NULL;
  buf[0] = '\0';
  if (spill_get_block_name(p, &name) != SPILL_OK) return "(error)";
  snprintf(buf, sizeof buf, "%s", name);
  spill_string_free(name);
  return buf;
}

/* Takes the trace's events (a snapshot's history is what the trace still holds). */
static void drop_trace(void) {
  char path[] = "/tmp/spill_c_names_trace_XXXXXX";
  TEMP_PATH(path);
  REQUIRE_OK(spill_trace_export(path));
  unlink(path);
}

TEST(a_block_is_named_renamed_and_cleared) {
  REQUIRE_OK(spill_init(CONF));
  void* big = NULL;
  void* small = NULL;
  REQUIRE_OK(spill_malloc(&big, 4 * MiB, 0, NULL));
  REQUIRE_OK(spill_malloc(&small, 4096, 0, NULL)); /* a small-pool block: named the same way */
  CHECK(strcmp(name_of(big), "") == 0);
  CHECK_OK(spill_set_block_name(big, "layers.0.weight (param)"));
  CHECK_OK(spill_set_block_name(small, "layers.0.bias (param)"));
  CHECK(strcmp(name_of(big), "layers.0.weight (param)") == 0);
  CHECK(strcmp(name_of(small), "layers.0.bias (param)") == 0);
  CHECK_OK(spill_set_block_name(big, "renamed"));
  CHECK(strcmp(name_of(big), "renamed") == 0);
  CHECK_OK(spill_set_block_name(big, NULL));
  CHECK(strcmp(name_of(big), "") == 0);
  CHECK_OK(spill_set_block_name(small, ""));
  CHECK(strcmp(name_of(small), "") == 0);
  CHECK_OK(spill_set_block_name(small, "")); /* clearing twice is fine */
  /* The name is copied. */
  char text[] = "copied";
  CHECK_OK(spill_set_block_name(big, text));
  text[0] = 'X';
  CHECK(strcmp(name_of(big), "copied") == 0);
  CHECK_OK(spill_free(big, 0, NULL));
  CHECK_OK(spill_free(small, 0, NULL));
}

TEST(a_pointer_that_is_not_a_live_block_start_is_refused) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 4 * MiB, 0, NULL));
  char* inside = (char*)p + 512;
  CHECK_STATUS(spill_set_block_name(inside, "x"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(inside));
  CHECK_ERROR_HAS("points inside the block at");
  CHECK_ERROR_HAS(c_test_address(p));
  char* got = NULL;
  CHECK_STATUS(spill_get_block_name(inside, &got), SPILL_ERROR_INVALID_ARGUMENT);
  int local = 0;
  CHECK_STATUS(spill_set_block_name(&local, "x"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(&local));
  CHECK_STATUS(spill_set_block_name(NULL, "x"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_STATUS(spill_get_block_name(p, NULL), SPILL_ERROR_INVALID_ARGUMENT);
  /* Nothing changed: the block is still unnamed. */
  CHECK(strcmp(name_of(p), "") == 0);
  REQUIRE_OK(spill_free(p, 0, NULL));
  CHECK_STATUS(spill_set_block_name(p, "freed"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS(c_test_address(p));
  CHECK_ERROR_HAS("not the start of a block allocated by spill");
}

/* A name that is not UTF-8 is refused naming the argument; a long one is cut at 255 bytes,
 * between characters. */
TEST(a_long_name_is_cut_and_bad_text_refused) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 4 * MiB, 0, NULL));
  CHECK_STATUS(spill_set_block_name(p, "bad\xff"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("name is not valid UTF-8");
  CHECK(strcmp(name_of(p), "") == 0);
  static char long_name[2 + 2 * 200 + 1];
  memcpy(long_name, "xy", 2); /* the 255th byte is the first of an e-acute: cut before it */
  for (int i = 0; i < 200; ++i) memcpy(long_name + 2 + 2 * i, "\xc3\xa9", 2);
  long_name[sizeof long_name - 1] = '\0';
  CHECK_OK(spill_set_block_name(p, long_name));
  CHECK(strlen(name_of(p)) == 254); /* "xy" and 126 whole e-acutes */
  CHECK(SPILL_MAX_BLOCK_NAME == 255);
  CHECK(strncmp(name_of(p), long_name, 254) == 0);
  long_name[255] = '\0'; /* 255 bytes that end a character: kept whole */
  long_name[254] = 'z';
  CHECK_OK(spill_set_block_name(p, long_name));
  CHECK(strlen(name_of(p)) == 255);
  CHECK_OK(spill_free(p, 0, NULL));
}

/* A freed block's name goes with it: the next block at that address (the cache gives the same
 * one back) has none, in the getter and in the snapshot. */
TEST(a_freed_blocks_address_reused_has_no_name) {
  REQUIRE_OK(spill_init(CONF));
  size_t sizes[2] = {4 * MiB, 8192}; /* a large block and a small-pool one */
  for (int i = 0; i < 2; ++i) {
    void* p = NULL;
    void* q = NULL;
    REQUIRE_OK(spill_malloc(&p, sizes[i], 0, NULL));
    REQUIRE_OK(spill_set_block_name(p, "stale name"));
    REQUIRE_OK(spill_free(p, 0, NULL));
    REQUIRE_OK(spill_malloc(&q, sizes[i], 0, NULL));
    REQUIRE(q == p);
    CHECK(strcmp(name_of(q), "") == 0);
    drop_trace(); /* the history would show the first block's name, rightly */
    char* json = NULL;
    REQUIRE_OK(spill_snapshot_json(0, &json));
    CHECK(strstr(json, "stale name") == NULL);
    spill_string_free(json);
    REQUIRE_OK(spill_free(q, 0, NULL));
  }
}

TEST(the_snapshot_shows_the_name) {
  REQUIRE_OK(spill_init(CONF));
  drop_trace();
  void* p = NULL;
  void* other = NULL;
  REQUIRE_OK(spill_malloc(&p, 16 * MiB, 0, NULL));
  REQUIRE_OK(spill_malloc(&other, 4 * MiB, 0, NULL));
  REQUIRE_OK(spill_set_block_name(p, "model.fc1.weight (param)"));
  char* json = NULL;
  REQUIRE_OK(spill_snapshot_json(0, &json));
  /* The block: a frame memory_viz shows, and spill's own field. */
  CHECK(strstr(json, "\"frames\":[{\"filename\":\"spill\",\"line\":0,"
                     "\"name\":\"model.fc1.weight (param)\"}],"
                     "\"name\":\"model.fc1.weight (param)\"") != NULL);
  /* Its alloc action in the history, named after the fact. */
  char alloc[256];
  snprintf(alloc, sizeof alloc,
           "\"action\":\"alloc\",\"addr\":%llu,\"frames\":[{\"filename\":\"spill\",\"line\":0,"
           "\"name\":\"model.fc1.weight (param)\"}]",
           (unsigned long long)(uintptr_t)p);
  CHECK(strstr(json, alloc) != NULL);
  /* The other block has no name field. */
  CHECK(strstr(json, "\"name\":\"") == strstr(json, "\"name\":\"model.fc1.weight (param)\""));
  spill_string_free(json);
  CHECK_OK(spill_free(p, 0, NULL));
  CHECK_OK(spill_free(other, 0, NULL));
}

TEST(the_trace_shows_the_name) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 4 * MiB, 0, NULL));
  REQUIRE_OK(spill_set_block_name(p, "exp_avg of fc1.weight"));
  char path[] = "/tmp/spill_c_names_trace_XXXXXX";
  TEMP_PATH(path);
  REQUIRE_OK(spill_trace_export(path));
  const char* buf = c_test_read_and_remove(path);
  CHECK(strstr(buf, "\"name\":\"name exp_avg of fc1.weight\"") != NULL);
  CHECK(strstr(buf, "\"kind\":\"name\"") != NULL);
  CHECK_OK(spill_free(p, 0, NULL));
}

/* The allocator's out-of-memory message lists the largest named resident blocks, largest
 * first, at most 5 of them, and says how many there are in all, and what is resident
 * without a name. */
TEST(the_oom_message_lists_the_largest_named_blocks) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:1GiB,budget:64MiB,policy:none"));
  const char* names[7] = {"a (param)", "b", "c", "d", "e", "f", "g"};
  size_t sizes[7] = {2, 16, 4, 8, 2, 2, 2};
  void* p[7];
  void* unnamed = NULL;
  REQUIRE_OK(spill_malloc(&unnamed, 20 * MiB, 0, NULL)); /* larger than all: not listed */
  for (int i = 0; i < 7; ++i) {
    REQUIRE_OK(spill_malloc(&p[i], sizes[i] * MiB, 0, NULL));
    REQUIRE_OK(spill_set_block_name(p[i], names[i]));
  }
  void* q = NULL;
  CHECK_STATUS(spill_malloc(&q, 32 * MiB, 0, NULL), SPILL_ERROR_OUT_OF_MEMORY);
  CHECK_ERROR_HAS("largest named resident blocks: \"b\" 16.00 MiB, \"d\" 8.00 MiB, "
                  "\"c\" 4.00 MiB, \"");
  CHECK_ERROR_HAS(" (5 of 7 named, 36.00 MiB in all), and 20.00 MiB in 1 unnamed");
  char* oom = NULL;
  REQUIRE_OK(spill_last_oom_message(0, &oom));
  CHECK(strstr(oom, "\"b\" 16.00 MiB") != NULL);
  spill_string_free(oom);
  /* Freed, renamed and cleared blocks are listed as they are now. */
  REQUIRE_OK(spill_free(p[1], 0, NULL));
  REQUIRE_OK(spill_set_block_name(p[3], NULL));
  REQUIRE_OK(spill_set_block_name(p[2], "c2"));
  CHECK_STATUS(spill_malloc(&q, 60 * MiB, 0, NULL), SPILL_ERROR_OUT_OF_MEMORY);
  CHECK_ERROR_HAS("largest named resident blocks: \"c2\" 4.00 MiB, \"");
  CHECK_ERROR_HAS(", and 28.00 MiB in 2 unnamed"); /* the cleared one with the unnamed */
  CHECK(strstr(spill_last_error(), "\"b\"") == NULL);
  CHECK(strstr(spill_last_error(), "\"d\"") == NULL);
  CHECK(strstr(spill_last_error(), " of 5 named") == NULL); /* all listed: no count */
}

/* A pin that cannot bring its block back names the blocks that hold the budget, with their
 * names. */
TEST(a_failed_pin_names_the_pinned_blocks) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:1GiB,budget:64MiB,policy:lru"));
  void *a = NULL, *b = NULL, *c = NULL;
  REQUIRE_OK(spill_malloc(&a, 24 * MiB, 0, NULL));
  REQUIRE_OK(spill_malloc(&b, 24 * MiB, 0, NULL));
  REQUIRE_OK(spill_set_block_name(a, "pinned one"));
  REQUIRE_OK(spill_set_swappable(a, 1));
  REQUIRE_OK(spill_set_swappable(b, 1));
  spill_pin_token ta, tb, tc;
  REQUIRE_OK(spill_pin_for_host(a, &ta));
  REQUIRE_OK(spill_malloc(&c, 24 * MiB, 0, NULL)); /* evicts b, the one that can go */
  REQUIRE_OK(spill_set_block_name(c, "pinned two"));
  REQUIRE_OK(spill_set_swappable(c, 1));
  REQUIRE_OK(spill_pin_for_host(c, &tc));
  CHECK_STATUS(spill_pin_for_host(b, &tb), SPILL_ERROR_OUT_OF_MEMORY);
  CHECK_ERROR_HAS("cannot evict: pinned 48.00 MiB in 2 blocks");
  CHECK_ERROR_HAS("(24.00 MiB, \"pinned one\")");
  CHECK_ERROR_HAS("(24.00 MiB, \"pinned two\")");
  CHECK_OK(spill_unpin(&ta, NULL, 0));
  CHECK_OK(spill_unpin(&tc, NULL, 0));
}

/* How many times `what` occurs in `text`. */
static int occurrences(const char* text, const char* what) {
  int n = 0;
  for (const char* p = strstr(text, what); p != NULL; p = strstr(p + 1, what)) ++n;
  return n;
}

/* One step of `scope` that pins `p` (recorded: the first step with policy:plan). */
static void one_step(uint64_t scope, void* p) {
  REQUIRE_OK(spill_begin_step(0, scope));
  spill_pin_token t;
  REQUIRE_OK(spill_pin_for_host(p, &t));
  REQUIRE_OK(spill_unpin(&t, NULL, 0));
  REQUIRE_OK(spill_end_step(0, scope));
}

/* A scope's name goes into the trace when it is named and before each of its step marks (so a
 * trace whose start was dropped still has it), and into its step graph's name; cleared, or
 * dropped with the scope, it is not recorded again. */
TEST(a_scope_is_named_in_the_trace_and_its_step_graph) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:1GiB,budget:64MiB,policy:plan"));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 4 * MiB, 0, NULL));
  REQUIRE_OK(spill_set_swappable(p, 1));
  drop_trace();
  const uint64_t scope = ((uint64_t)1 << 63) + 3;
  CHECK_OK(spill_set_scope_name(0, scope, "first"));
  CHECK_OK(spill_set_scope_name(0, scope, "offload GPT"));
  one_step(scope, p);
  one_step(scope, p);
  char graph_path[] = "/tmp/spill_c_names_graph_XXXXXX";
  TEMP_PATH(graph_path);
  REQUIRE_OK(spill_write_step_graph(0, scope, graph_path));
  const char* graph = c_test_read_and_remove(graph_path);
  CHECK(strstr(graph, "recorded step (scope 9223372036854775811, offload GPT)") != NULL);
  char path[] = "/tmp/spill_c_names_trace_XXXXXX";
  TEMP_PATH(path);
  REQUIRE_OK(spill_trace_export(path));
  const char* buf = c_test_read_and_remove(path);
  CHECK(occurrences(buf, "\"name\":\"scope_name first\"") == 1);
  CHECK(occurrences(buf, "\"name\":\"scope_name offload GPT\"") == 3); /* named, two steps */
  CHECK(strstr(buf, "\"addr\":\"0x8000000000000003\"") != NULL);
  /* Cleared: a scope_name event without a tag, none before the next step's mark. */
  CHECK_OK(spill_set_scope_name(0, scope, NULL));
  one_step(scope, p);
  CHECK_OK(spill_set_scope_name(0, scope, "again"));
  CHECK_OK(spill_end_scope(0, scope)); /* drops the name */
  one_step(scope, p);
  REQUIRE_OK(spill_trace_export(path));
  buf = c_test_read_and_remove(path);
  CHECK(occurrences(buf, "\"name\":\"scope_name\"") == 1);
  CHECK(occurrences(buf, "\"name\":\"scope_name again\"") == 1);
  CHECK(occurrences(buf, "\"name\":\"scope_name offload GPT\"") == 0);
  CHECK(occurrences(buf, "\"name\":\"mark step begins\"") == 2);
  CHECK_OK(spill_free(p, 0, NULL));
}

/* Bad names and ordinals are refused naming the call; a long name is cut at
 * SPILL_MAX_BLOCK_NAME bytes; without a swapper naming does nothing. */
TEST(a_scope_name_is_checked_and_cut) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:1GiB,budget:64MiB,policy:plan"));
  drop_trace();
  CHECK_STATUS(spill_set_scope_name(-1, 1, "x"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("spill_set_scope_name: device -1 is not a device ordinal");
  CHECK_STATUS(spill_set_scope_name(0, 1, "bad \xff"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("spill_set_scope_name");
  CHECK_ERROR_HAS("name is not valid UTF-8");
  char long_name[SPILL_MAX_BLOCK_NAME + 40];
  memset(long_name, 'a', sizeof long_name - 1);
  long_name[sizeof long_name - 1] = '\0';
  CHECK_OK(spill_set_scope_name(0, 1, long_name));
  char path[] = "/tmp/spill_c_names_trace_XXXXXX";
  TEMP_PATH(path);
  REQUIRE_OK(spill_trace_export(path));
  const char* buf = c_test_read_and_remove(path);
  CHECK(occurrences(buf, "\"name\":\"scope_name ") == 1); /* the bad name recorded nothing */
  long_name[SPILL_MAX_BLOCK_NAME] = '"';
  long_name[SPILL_MAX_BLOCK_NAME + 1] = '\0';
  CHECK(strstr(buf, long_name) != NULL); /* 255 bytes, then the end of the name */
  REQUIRE_OK(spill_shutdown());
  CHECK_STATUS(spill_set_scope_name(0, 1, "x"), SPILL_ERROR_SHUT_DOWN);
  CHECK_ERROR_HAS("spill_set_scope_name: spill was shut down");
  REQUIRE_OK(spill_init("device:sim,sim_capacity:1GiB,policy:none"));
  CHECK_OK(spill_set_scope_name(0, 1, "x"));
}

#define TESTS(X)                                          \
  X(a_block_is_named_renamed_and_cleared)                 \
  X(a_pointer_that_is_not_a_live_block_start_is_refused)  \
  X(a_long_name_is_cut_and_bad_text_refused)              \
  X(a_freed_blocks_address_reused_has_no_name)            \
  X(the_snapshot_shows_the_name)                          \
  X(the_trace_shows_the_name)                             \
  X(the_oom_message_lists_the_largest_named_blocks)       \
  X(a_failed_pin_names_the_pinned_blocks)                 \
  X(a_scope_is_named_in_the_trace_and_its_step_graph)     \
  X(a_scope_name_is_checked_and_cut)

C_TEST_MAIN(TESTS)

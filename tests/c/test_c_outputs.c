/* The C API's outputs under bad conditions: a trace export to a full disk, a step graph whose
 * write fails, names and notes that are not UTF-8, an out-of-memory message when the process
 * ran out of file descriptors. Every test runs in its own process on the simulated device. */
#define _POSIX_C_SOURCE 200809L
#include "c_test.h"

#include <fcntl.h>
#include <glob.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>

#define CONF "device:sim,sim_capacity:1GiB,budget:256MiB"

/* A write that fails after the file opened (ENOSPC) keeps the events for the next export, as
 * a path that cannot be opened does. */
TEST(a_trace_export_to_a_full_disk_keeps_the_events) {
  if (access("/dev/full", W_OK) != 0) SKIP("no /dev/full");
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 3u << 20, 0, NULL));
  REQUIRE_OK(spill_free(p, 0, NULL));
  CHECK_STATUS(spill_trace_export("/dev/full"), SPILL_ERROR_WRITE_FAILED);
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

/* A request past 2^63 - 1 bytes (a wrapped negative size) was recorded whole as an oom event,
 * which the exporter refused: every later export failed, also after a shutdown and init
 * (audit 37b, F4). The event's size now saturates at 2^63 - 1. */
TEST(a_request_past_2to63_does_not_spoil_later_trace_exports) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  CHECK_STATUS(spill_malloc(&p, SIZE_MAX, 0, NULL), SPILL_ERROR_OUT_OF_MEMORY);
  CHECK_STATUS(spill_malloc(&p, (size_t)1 << 63, 0, NULL), SPILL_ERROR_OUT_OF_MEMORY);
  REQUIRE_OK(spill_malloc(&p, 4u << 20, 0, NULL));
  REQUIRE_OK(spill_free(p, 0, NULL));
  char path[] = "/tmp/spill_c_trace_XXXXXX";
  TEMP_PATH(path);
  CHECK_OK(spill_trace_export(path));
  const char* buf = c_test_read_and_remove(path);
  CHECK(strstr(buf, "\"kind\":\"oom\"") != NULL);
  CHECK(strstr(buf, "\"bytes\":9223372036854775807") != NULL);
  CHECK(strstr(buf, "\"kind\":\"alloc\"") != NULL); /* the run after it */
}

/* Op names go into the step graph's JSON: bytes that are not UTF-8 are refused at
 * spill_begin_op, naming the argument (before, the graph's write failed as INTERNAL). */
TEST(an_op_name_that_is_not_utf8_is_refused) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:plan"));
  REQUIRE_OK(spill_begin_step(0, 1));
  CHECK_STATUS(spill_begin_op(0, 1, "bad\xff\xfename"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("spill_begin_op");
  CHECK_ERROR_HAS("name is not valid UTF-8 (byte 0xff at offset 3");
  CHECK_STATUS(spill_begin_op(0, 1, "cut \xc3"), SPILL_ERROR_INVALID_ARGUMENT);
  /* A surrogate's encoding. */
  CHECK_STATUS(spill_begin_op(0, 1, "\xed\xa0\x80"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_OK(spill_begin_op(0, 1, "entr\xc3\xa9" "e \xe2\x86\x92 \xf0\x9f\x94\xa5"));
  CHECK_OK(spill_begin_op(0, 1, NULL));
  REQUIRE_OK(spill_end_step(0, 1));
  /* Also without a swapper to record it: the input is wrong either way. */
  REQUIRE_OK(spill_shutdown());
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:none"));
  CHECK_STATUS(spill_begin_op(0, 1, "bad\xff"), SPILL_ERROR_INVALID_ARGUMENT);
}

/* The first byte of a character cut off at its end, or 0 when every character is whole. */
static int cut_character(const char* s) {
  const unsigned char* u = (const unsigned char*)s;
  for (size_t i = 0; u[i] != 0;) {
    size_t len = u[i] < 0x80 ? 1 : u[i] >= 0xF0 ? 4 : u[i] >= 0xE0 ? 3 : 2;
    for (size_t k = 1; k < len; ++k)
      if ((u[i + k] & 0xC0) != 0x80) return u[i];
    i += len;
  }
  return 0;
}

/* A note longer than 4096 bytes is cut at a character boundary (Python decodes it), and a
 * note that is not UTF-8 is refused. */
TEST(a_long_oom_note_is_cut_between_characters) {
  REQUIRE_OK(spill_init(CONF));
  static char note[1 + 2 * 3000 + 1];
  note[0] = 'x'; /* so that byte 4096 is the second byte of an e-acute */
  for (int i = 0; i < 3000; ++i) memcpy(note + 1 + 2 * i, "\xc3\xa9", 2);
  note[sizeof note - 1] = '\0';
  CHECK_OK(spill_set_oom_note(0, note));
  void* p = NULL;
  CHECK_STATUS(spill_malloc(&p, (size_t)1 << 40, 0, NULL), SPILL_ERROR_OUT_OF_MEMORY);
  char* oom = NULL;
  REQUIRE_OK(spill_last_oom_message(0, &oom));
  CHECK(cut_character(oom) == 0);
  const char* kept = strstr(oom, "x\xc3\xa9");
  CHECK(kept != NULL && strlen(kept) >= 4095 && strncmp(kept, note, 4095) == 0);
  spill_string_free(oom);
  CHECK_STATUS(spill_set_oom_note(0, "note \xc3"), SPILL_ERROR_INVALID_ARGUMENT);
  CHECK_ERROR_HAS("note is not valid UTF-8");
}

/* The graph of a recorded step replaces its file whole or not at all: a write that fails
 * (here past RLIMIT_FSIZE, as on a full disk) leaves the previous graph. */
TEST(a_failed_step_graph_write_keeps_the_previous_file) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:plan"));
  void* a[4];
  for (int i = 0; i < 4; ++i) {
    REQUIRE_OK(spill_malloc(&a[i], 6u << 20, 0, NULL));
    REQUIRE_OK(spill_set_swappable(a[i], 1));
  }
  REQUIRE_OK(spill_begin_step(0, 1));
  for (int i = 0; i < 4; ++i) {
    spill_pin_token t;
    REQUIRE_OK(spill_begin_op(0, 1, "op"));
    REQUIRE_OK(spill_pin(a[i], NULL, &t));
    REQUIRE_OK(spill_unpin(&t, NULL, 1));
  }
  REQUIRE_OK(spill_end_step(0, 1));
  char path[] = "/tmp/spill_c_graph_XXXXXX";
  TEMP_PATH(path);
  FILE* f = fopen(path, "w");
  REQUIRE(f != NULL);
  fputs("previous graph\n", f);
  fclose(f);
  signal(SIGXFSZ, SIG_IGN); /* writes past the limit fail with EFBIG instead */
  struct rlimit old, small;
  REQUIRE(getrlimit(RLIMIT_FSIZE, &old) == 0);
  small = old;
  small.rlim_cur = 64;
  REQUIRE(setrlimit(RLIMIT_FSIZE, &small) == 0);
  CHECK_STATUS(spill_write_step_graph(0, 1, path), SPILL_ERROR_WRITE_FAILED);
  REQUIRE(setrlimit(RLIMIT_FSIZE, &old) == 0);
  CHECK_ERROR_HAS(path);
  CHECK_ERROR_HAS("failed");
  CHECK_ERROR_HAS("spill_write_step_graph(device 0, scope 1)");
  {
    FILE* kept = fopen(path, "r");
    char line[64] = "";
    REQUIRE(kept != NULL);
    CHECK(fgets(line, sizeof line, kept) != NULL && strcmp(line, "previous graph\n") == 0);
    fclose(kept);
  }
  /* The write succeeds once it can, and leaves no temporary file. */
  CHECK_OK(spill_write_step_graph(0, 1, path));
  char pattern[sizeof path + 8];
  snprintf(pattern, sizeof pattern, "%s.tmp-*", path);
  CHECK(strstr(c_test_read_and_remove(path), "\"ops\"") != NULL);
  glob_t found;
  CHECK(glob(pattern, 0, NULL, &found) == GLOB_NOMATCH);
  globfree(&found);
  for (int i = 0; i < 4; ++i) CHECK_OK(spill_free(a[i], 0, NULL));
}

static double seconds_now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* A FIFO in a new directory: `dir` (a mkdtemp pattern) and `fifo` (room for dir + "/f"). */
static void make_fifo(char* dir, char* fifo, size_t size) {
  REQUIRE(mkdtemp(dir) != NULL);
  snprintf(fifo, size, "%s/f", dir);
  REQUIRE(mkfifo(fifo, 0600) == 0);
}

/* A FIFO nobody reads: the export fails after its bounded wait, naming the path and why (it
 * blocked for ever in open(), holding the export lock), and a reader that comes within the
 * wait gets the whole trace. */
TEST(a_trace_export_to_a_fifo_without_reader_fails_in_bounded_time) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 3u << 20, 0, NULL));
  char dir[] = "/tmp/spill_c_fifo_XXXXXX", fifo[64];
  make_fifo(dir, fifo, sizeof fifo);
  const double t0 = seconds_now();
  CHECK_STATUS(spill_trace_export(fifo), SPILL_ERROR_INVALID_ARGUMENT);
  const double waited = seconds_now() - t0;
  CHECK(waited >= 4.0 && waited < 15.0);
  CHECK_ERROR_HAS(fifo);
  CHECK_ERROR_HAS("is a FIFO with no reader (waited 5 s)");
  /* A reader that starts late (here 0.3 s) still gets the trace: the events were kept. */
  pid_t reader = fork();
  REQUIRE(reader >= 0);
  if (reader == 0) {
    nanosleep(&(struct timespec){0, 300000000}, NULL);
    FILE* in = fopen(fifo, "r");
    static char text[1 << 20];
    size_t n = in ? fread(text, 1, sizeof text - 1, in) : 0;
    text[n] = '\0';
    _exit(strstr(text, "\"kind\":\"alloc\"") != NULL ? 0 : 1);
  }
  CHECK_OK(spill_trace_export(fifo));
  int status = 0;
  REQUIRE(waitpid(reader, &status, 0) == reader);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  unlink(fifo);
  rmdir(dir);
  CHECK_OK(spill_free(p, 0, NULL));
}

/* Starts spill with policy:plan and records step 1 of scope 1 (two blocks, each pinned once). */
static void record_a_step(void) {
  REQUIRE_OK(spill_init("device:sim,sim_capacity:512MiB,budget:32MiB,policy:plan"));
  void* a[2];
  for (int i = 0; i < 2; ++i) {
    REQUIRE_OK(spill_malloc(&a[i], 6u << 20, 0, NULL));
    REQUIRE_OK(spill_set_swappable(a[i], 1));
  }
  REQUIRE_OK(spill_begin_step(0, 1));
  for (int i = 0; i < 2; ++i) {
    spill_pin_token t;
    REQUIRE_OK(spill_begin_op(0, 1, "op"));
    REQUIRE_OK(spill_pin(a[i], NULL, &t));
    REQUIRE_OK(spill_unpin(&t, NULL, 1));
  }
  REQUIRE_OK(spill_end_step(0, 1));
}

/* A file that only an in-place rewrite could replace (its directory takes no new file) and
 * that cannot be opened either: the refusal gives the reason, as spill_trace_export's does
 * (audit 42b #7: "cannot write '...'" alone). As nobody, so that permissions apply. */
TEST(a_refused_in_place_rewrite_gives_the_reason) {
  if (geteuid() != 0) SKIP("needs root to make a file another user cannot write");
  char dir[] = "/tmp/spill_c_ro_XXXXXX", file[64];
  REQUIRE(mkdtemp(dir) != NULL);
  REQUIRE(chmod(dir, 0755) == 0);
  snprintf(file, sizeof file, "%s/g.json", dir);
  FILE* f = fopen(file, "w");
  REQUIRE(f != NULL);
  fputs("old\n", f);
  fclose(f);
  REQUIRE(chmod(file, 0444) == 0);
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    if (setgid(65534) != 0 || setuid(65534) != 0) _exit(77);
    record_a_step();
    int bad = spill_write_step_graph(0, 1, file) != SPILL_ERROR_INVALID_ARGUMENT;
    bad += strstr(spill_last_error(), "Permission denied") == NULL;
    bad += strstr(spill_last_error(), file) == NULL;
    if (bad) fprintf(stderr, "child: %s\n", spill_last_error());
    _exit(bad ? 1 : 0);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  unlink(file);
  rmdir(dir);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 77) SKIP("cannot become nobody");
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* Out of file descriptors is the process's resource, not a path that cannot be used:
 * WRITE_FAILED, not INVALID_ARGUMENT (audit 42b #8). */
TEST(a_trace_export_without_a_file_descriptor_left_is_write_failed) {
  REQUIRE_OK(spill_init(CONF));
  void* p = NULL;
  REQUIRE_OK(spill_malloc(&p, 3u << 20, 0, NULL));
  char path[] = "/tmp/spill_c_trace_XXXXXX";
  TEMP_PATH(path);
  const int next = open("/dev/null", O_RDONLY); /* the lowest free descriptor */
  REQUIRE(next >= 0);
  close(next);
  struct rlimit old, none;
  REQUIRE(getrlimit(RLIMIT_NOFILE, &old) == 0);
  none = old;
  none.rlim_cur = (rlim_t)next; /* no descriptor from `next` on */
  REQUIRE(setrlimit(RLIMIT_NOFILE, &none) == 0);
  CHECK_STATUS(spill_trace_export(path), SPILL_ERROR_WRITE_FAILED);
  REQUIRE(setrlimit(RLIMIT_NOFILE, &old) == 0);
  CHECK_ERROR_HAS("Too many open files");
  CHECK_ERROR_HAS(path);
  CHECK_OK(spill_trace_export(path)); /* the events were kept */
  CHECK(strstr(c_test_read_and_remove(path), "\"kind\":\"alloc\"") != NULL);
  CHECK_OK(spill_free(p, 0, NULL));
}

static char graph_fifo[64];
static spill_status graph_status;
static char graph_error[512]; /* spill_last_error is the calling thread's */
static void* write_graph_to_fifo(void* arg) {
  (void)arg;
  graph_status = spill_write_step_graph(0, 1, graph_fifo);
  snprintf(graph_error, sizeof graph_error, "%s", spill_last_error());
  return NULL;
}

/* A step graph bound for a FIFO nobody reads fails after the bounded wait, and the wait does
 * not hold the device: spill_shutdown meanwhile finishes at once (it waited for ever). */
TEST(a_step_graph_to_a_fifo_without_reader_does_not_hold_the_device) {
  record_a_step();
  char dir[] = "/tmp/spill_c_fifo_XXXXXX";
  make_fifo(dir, graph_fifo, sizeof graph_fifo);
  pthread_t writer;
  REQUIRE(pthread_create(&writer, NULL, write_graph_to_fifo, NULL) == 0);
  nanosleep(&(struct timespec){0, 500000000}, NULL); /* the writer waits for a reader now */
  const double t0 = seconds_now();
  CHECK_OK(spill_shutdown());
  CHECK(seconds_now() - t0 < 3.0);
  pthread_join(writer, NULL);
  CHECK(graph_status == SPILL_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(graph_error, "is a FIFO with no reader") != NULL);
  CHECK(strstr(graph_error, "spill_write_step_graph(device 0, scope 1)") != NULL);
  unlink(graph_fifo);
  rmdir(dir);
}

/* The simulated device holds a file descriptor per physical allocation: when the process runs
 * out of them, the out-of-memory message says so and what to do, not "the device itself is
 * full" with advice about RAM. */
TEST(running_out_of_file_descriptors_is_named_in_the_oom_message) {
  /* spill raises the soft limit to the hard one at start: lower both, for this process. */
  struct rlimit low = {64, 64};
  REQUIRE(setrlimit(RLIMIT_NOFILE, &low) == 0);
  REQUIRE_OK(spill_init("device:sim,sim_capacity:1GiB,budget:512MiB,sim_granularity:64KiB,"
                        "swap_threshold:128KiB"));
  enum { N = 200 }; /* one descriptor each: far more than 64, far less than the budget */
  void* p[N];
  int n = 0;
  spill_status s = SPILL_OK;
  for (; n < N; ++n) {
    s = spill_malloc(&p[n], 200u << 10, 0, NULL);
    if (s != SPILL_OK) break;
  }
  CHECK(s == SPILL_ERROR_OUT_OF_MEMORY);
  CHECK(n > 0 && n < N);
  CHECK_ERROR_HAS("Too many open files");
  CHECK_ERROR_HAS("out of file descriptors");
  CHECK_ERROR_HAS("ulimit -n");
  CHECK_ERROR_HAS("sim_granularity");
  CHECK(strstr(spill_last_error(), "the device itself is full") == NULL);
  CHECK(strstr(spill_last_error(), "RAM") == NULL);
  for (int i = 0; i < n; ++i) CHECK_OK(spill_free(p[i], 0, NULL));
}

#define TESTS(X)                                          \
  X(a_trace_export_to_a_full_disk_keeps_the_events)       \
  X(a_request_past_2to63_does_not_spoil_later_trace_exports) \
  X(an_op_name_that_is_not_utf8_is_refused)               \
  X(a_long_oom_note_is_cut_between_characters)            \
  X(a_failed_step_graph_write_keeps_the_previous_file)      \
  X(a_trace_export_to_a_fifo_without_reader_fails_in_bounded_time) \
  X(a_step_graph_to_a_fifo_without_reader_does_not_hold_the_device) \
  X(a_refused_in_place_rewrite_gives_the_reason) \
  X(a_trace_export_without_a_file_descriptor_left_is_write_failed) \
  X(running_out_of_file_descriptors_is_named_in_the_oom_message)

C_TEST_MAIN(TESTS)

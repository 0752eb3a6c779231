/* A tiny test harness for the C API tests, in C11 (no GoogleTest: these programs check that
 * the public header compiles and works from C). Each test is `TEST(name) { ... }`, listed in
 * the file's TESTS(X) macro; tests/c/CMakeLists.txt registers every TEST(name) found in a
 * file as the ctest `c.<file>.<name>`, which runs `<program> <name>` in its own process. With
 * no argument a program runs all its tests, each in a forked child. Exit status 77 skips. */
#ifndef SPILL_C_TEST_H
#define SPILL_C_TEST_H

#include <spill/spill.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int c_test_failures = 0;

#define TEST(name) static void test_##name(void)

#define CHECK(cond)                                                                         \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      fprintf(stderr, "%s:%d: CHECK(%s) failed (spill_last_error: %s)\n", __FILE__, __LINE__, \
              #cond, spill_last_error());                                                   \
      c_test_failures++;                                                                    \
    }                                                                                       \
  } while (0)

/* Like CHECK, but ends the test at once (what follows depends on it). */
#define REQUIRE(cond)                                                                       \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      fprintf(stderr, "%s:%d: REQUIRE(%s) failed (spill_last_error: %s)\n", __FILE__,        \
              __LINE__, #cond, spill_last_error());                                         \
      exit(1);                                                                              \
    }                                                                                       \
  } while (0)

#define CHECK_STATUS(call, expected)                                                         \
  do {                                                                                       \
    spill_status c_test_s = (call);                                                          \
    if (c_test_s != (expected)) {                                                            \
      fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d (%s); spill_last_error: %s\n", \
              __FILE__, __LINE__, #call, (int)c_test_s, spill_status_string(c_test_s),       \
              (int)(expected), spill_status_string(expected), spill_last_error());           \
      c_test_failures++;                                                                     \
    }                                                                                        \
  } while (0)

#define CHECK_OK(call) CHECK_STATUS(call, SPILL_OK)

#define REQUIRE_OK(call)                                                                  \
  do {                                                                                    \
    spill_status c_test_s = (call);                                                       \
    if (c_test_s != SPILL_OK) {                                                           \
      fprintf(stderr, "%s:%d: %s returned %s: %s\n", __FILE__, __LINE__, #call,           \
              spill_status_string(c_test_s), spill_last_error());                        \
      exit(1);                                                                            \
    }                                                                                     \
  } while (0)

/* The thread's last error message contains `text`. */
#define CHECK_ERROR_HAS(text)                                                                   \
  do {                                                                                          \
    if (strstr(spill_last_error(), (text)) == NULL) {                                           \
      fprintf(stderr, "%s:%d: spill_last_error lacks \"%s\": %s\n", __FILE__, __LINE__, (text), \
              spill_last_error());                                                              \
      c_test_failures++;                                                                        \
    }                                                                                           \
  } while (0)

/* The address as spill's messages print it. */
static inline const char* c_test_address(const void* p) {
  static char buf[4][32];
  static int next = 0;
  char* out = buf[next++ % 4];
  snprintf(out, 32, "%p", p);
  return out;
}

/* A fresh temporary file's path in `path` (a "/tmp/..._XXXXXX" template, as mkstemp takes). */
#define TEMP_PATH(path)         \
  do {                          \
    int fd_ = mkstemp(path);    \
    REQUIRE(fd_ >= 0);          \
    close(fd_);                 \
  } while (0)

/* The file at `path`, NUL-terminated, in a buffer of 1 MiB that the next call reuses; the file
 * is removed. Ends the test if the file cannot be read or does not fit. */
static inline const char* c_test_read_and_remove(const char* path) {
  static char buf[1 << 20];
  FILE* f = fopen(path, "r");
  REQUIRE(f != NULL);
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  buf[n] = '\0';
  fclose(f);
  unlink(path);
  REQUIRE(n < sizeof buf - 1);
  return buf;
}

#define SKIP(reason)                                        \
  do {                                                      \
    fprintf(stderr, "skipped: %s\n", (reason));             \
    exit(77);                                               \
  } while (0)

struct c_test_case {
  const char* name;
  void (*fn)(void);
};

#define C_TEST_ENTRY(name) {#name, test_##name},

static inline int c_test_main(int argc, char** argv, const struct c_test_case* tests, int n) {
  if (argc > 1) {
    for (int i = 0; i < n; ++i) {
      if (strcmp(argv[1], tests[i].name) == 0) {
        tests[i].fn();
        if (c_test_failures) fprintf(stderr, "%s: %d check(s) failed\n", argv[1], c_test_failures);
        return c_test_failures ? 1 : 0;
      }
    }
    fprintf(stderr, "no test named %s (is it listed in TESTS?)\n", argv[1]);
    return 2;
  }
  int failed = 0;
  for (int i = 0; i < n; ++i) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
      tests[i].fn();
      _exit(c_test_failures ? 1 : 0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
    printf("%-40s %s\n", tests[i].name, code == 0 ? "ok" : code == 77 ? "skipped" : "FAILED");
    failed += code != 0 && code != 77;
  }
  return failed ? 1 : 0;
}

#define C_TEST_MAIN(TESTS)                                                                    \
  int main(int argc, char** argv) {                                                           \
    static const struct c_test_case tests[] = {TESTS(C_TEST_ENTRY)};                         \
    return c_test_main(argc, argv, tests, (int)(sizeof tests / sizeof tests[0]));             \
  }

#endif /* SPILL_C_TEST_H */

/* A program outside the spill tree, built against an installed spill (spill/spill.h and
 * libspill.so only): version, init on the simulated device, malloc/free, a block's name, stats,
 * an error path.
 * Usage: consumer EXPECTED_VERSION */
#include <spill/spill.h>

#include <stdio.h>
#include <string.h>

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      fprintf(stderr, "consumer: %s failed (line %d): %s\n", #cond, __LINE__,         \
              spill_last_error());                                                    \
      return 1;                                                                       \
    }                                                                                 \
  } while (0)

int main(int argc, char** argv) {
  CHECK(argc == 2);
  CHECK(strcmp(spill_version(), argv[1]) == 0);
  int major = -1, minor = -1, patch = -1;
  spill_version_numbers(&major, &minor, &patch);
  char numbers[64];
  snprintf(numbers, sizeof numbers, "%d.%d.%d", major, minor, patch);
  CHECK(strcmp(numbers, argv[1]) == 0);

  CHECK(spill_init("device:sim,sim_capacity:256MiB,budget:64MiB") == SPILL_OK);
  int simulated = 0;
  CHECK(spill_device_open(0, &simulated) == SPILL_OK && simulated == 1);

  void* p = NULL;
  CHECK(spill_malloc(&p, (size_t)8 << 20, 0, NULL) == SPILL_OK && p != NULL);
  spill_stats st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  CHECK(spill_get_stats(0, &st) == SPILL_OK);
  CHECK(st.allocated_bytes >= ((uint64_t)8 << 20) && st.budget_bytes == ((uint64_t)64 << 20));
  CHECK(spill_free((char*)p + 512, 0, NULL) == SPILL_ERROR_INVALID_ARGUMENT); /* interior */
  CHECK(strstr(spill_last_error(), "0x") != NULL);
  char* name = NULL; /* block names (since 0.2.0): exported by the installed library */
  CHECK(spill_set_block_name(p, "consumer block") == SPILL_OK);
  CHECK(spill_get_block_name(p, &name) == SPILL_OK && strcmp(name, "consumer block") == 0);
  spill_string_free(name);
  CHECK(spill_free(p, 0, NULL) == SPILL_OK);

  char* json = NULL;
  CHECK(spill_stats_json(0, &json) == SPILL_OK && strstr(json, "\"num_allocs\":1") != NULL);
  spill_string_free(json);
  CHECK(spill_shutdown() == SPILL_OK);
  CHECK(spill_malloc(&p, 64, 0, NULL) == SPILL_ERROR_SHUT_DOWN);
  printf("consumer: spill %s on the simulated device: malloc, stats, errors, shutdown ok\n",
         spill_version());
  return 0;
}

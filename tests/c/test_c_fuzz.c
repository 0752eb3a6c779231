/* A multi-threaded fuzz through the C API on the simulated device with chaos: 4 threads and
 * 4 streams (plus the default one) do random malloc, free, record_stream, set_swappable, pin,
 * unpin (some pins held across other operations, so blocks are freed while pinned and their
 * late unpins go stale), pin_for_host, prefetch and evict on 96 shared slots, under a budget of
 * 25% of the live footprint (set with spill_set_budget once the slots are full). Every block's
 * pattern is checked at each host pin, and before each write; a block nobody declared
 * swappable is checked to be resident and read without any pin (on the simulated device,
 * touching a block that was evicted faults). At the end: nothing leaked, swapping happened.
 *   SPILL_FUZZ_OPS (default 200000) operations per seed, SPILL_FUZZ_SEEDS (default 1) e.g.
 *   "1,2,3"; scripts/soak.sh runs millions. */
#define _POSIX_C_SOURCE 200809L
#include "c_test.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#define THREADS 4
#define STREAMS 4
#define SLOTS 96
#define MIB (1024u * 1024u)
#define HOT 4 /* slots in a thread's sliding window */
#define MAX_UNDECLARED 3 /* large blocks not declared swappable at once (they never move) */

typedef struct slot {
  pthread_mutex_t m;
  void* ptr;
  size_t size;
  uint64_t seed;
  int large;
  int swappable;
  /* The latest operations on the slot, for the failure report. */
  struct {
    char what;
    uint64_t seed;
    void* ptr;
  } history[16];
  unsigned n_history;
} slot;

static void note(slot* s, char what) {
  unsigned i = s->n_history++ % 16;
  s->history[i].what = what;
  s->history[i].seed = s->seed;
  s->history[i].ptr = s->ptr;
}

static slot slots[SLOTS];
static void* streams[STREAMS];
static atomic_long ops_left;
static atomic_int failed;
static atomic_int undeclared_large;
static atomic_long n_checks, n_ooms, n_undeclared_reads;
static uint64_t budget;

static uint64_t next_rand(uint64_t* s) {
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return *s * 2685821657736338717ull;
}

/* The pattern: one 8-byte word per 4 KiB and the last word, from the block's seed. */
static uint64_t word(uint64_t seed, size_t offset) {
  uint64_t x = seed ^ (offset * 0x9E3779B97F4A7C15ull);
  x ^= x >> 31;
  return x * 0xBF58476D1CE4E5B9ull;
}
static size_t last_word(size_t size) { return (size - 8) & ~(size_t)7; }
static void write_pattern(void* p, size_t size, uint64_t seed) {
  char* c = (char*)p;
  for (size_t off = 0; off + 8 <= size; off += 4096) memcpy(c + off, &(uint64_t){word(seed, off)}, 8);
  memcpy(c + last_word(size), &(uint64_t){word(seed, last_word(size))}, 8);
}
static void fail_now(const char* what, const slot* s) {
  if (atomic_exchange(&failed, 1)) return;
  fprintf(stderr, "FUZZ FAILURE: %s: block %p (%zu bytes, %s, seed %llu); spill_last_error: %s\n",
          what, s ? s->ptr : NULL, s ? s->size : 0,
          s ? (s->swappable ? "swappable" : "not swappable") : "-",
          s ? (unsigned long long)s->seed : 0ull, spill_last_error());
}
static void report_history(const slot* s, uint64_t found) {
  size_t bad = 0, words = 0;
  for (size_t off = 0; off + 8 <= s->size; off += 4096, ++words) {
    uint64_t w;
    memcpy(&w, (const char*)s->ptr + off, 8);
    bad += w != word(s->seed, off);
  }
  fprintf(stderr, "  %zu of %zu sampled words differ; found %016llx\n", bad, words,
          (unsigned long long)found);
  unsigned n = s->n_history < 16 ? s->n_history : 16;
  for (unsigned k = 0; k < n; ++k) {
    unsigned i = (s->n_history - n + k) % 16;
    fprintf(stderr, "  history: %c ptr %p seed %llu%s\n", s->history[i].what, s->history[i].ptr,
            (unsigned long long)s->history[i].seed,
            word(s->history[i].seed, 0) == found ? "  <- its pattern was found" : "");
  }
}

static void check_pattern(const slot* s) {
  const char* c = (const char*)s->ptr;
  uint64_t w;
  for (size_t off = 0; off + 8 <= s->size; off += 4096) {
    memcpy(&w, c + off, 8);
    if (w != word(s->seed, off)) {
      char msg[128];
      snprintf(msg, sizeof msg, "bytes differ at offset %zu", off);
      fail_now(msg, s);
      report_history(s, w);
      return;
    }
  }
  memcpy(&w, c + last_word(s->size), 8);
  if (w != word(s->seed, last_word(s->size))) fail_now("the last word differs", s);
  atomic_fetch_add(&n_checks, 1);
}
static void expect(spill_status got, const char* what, const slot* s) {
  if (got == SPILL_OK) return;
  if (got == SPILL_ERROR_OUT_OF_MEMORY) { /* pinned + undeclared blocks filled the budget */
    atomic_fetch_add(&n_ooms, 1);
    return;
  }
  fail_now(what, s);
}
/* An undeclared block never moves: it must be resident, and plain reads must work. */
static void check_undeclared(const slot* s) {
  spill_residence r;
  if (spill_get_residence(s->ptr, &r) != SPILL_OK || r != SPILL_RESIDENT) {
    fail_now("an unpinned block nobody declared swappable is not resident", s);
    return;
  }
  check_pattern(s);
  atomic_fetch_add(&n_undeclared_reads, 1);
}
static void* any_stream(uint64_t* rng) {
  unsigned k = (unsigned)(next_rand(rng) % (STREAMS + 1));
  return k == STREAMS ? NULL : streams[k];
}

static void allocate(slot* s, uint64_t* rng) {
  size_t size = next_rand(rng) % 4 == 0 ? 64 + next_rand(rng) % (200u << 10)  /* small */
                                        : (300u << 10) + next_rand(rng) % (3 * MIB - (300u << 10));
  void* p = NULL;
  void* stream = any_stream(rng);
  spill_status st = spill_malloc(&p, size, 0, stream);
  if (st != SPILL_OK) {
    expect(st, "spill_malloc", NULL);
    return;
  }
  /* The memory is ready for work on `stream` (it may have been freed there a moment ago, with
   * work still queued): host code synchronises the stream first, as after cudaMallocAsync. */
  expect(spill_stream_synchronize(0, stream), "spill_stream_synchronize", NULL);
  s->ptr = p;
  s->size = size;
  s->large = size > (256u << 10);
  s->seed = next_rand(rng);
  s->swappable = 0;
  write_pattern(p, size, s->seed); /* before any declaration: plain host writes are allowed */
  note(s, 'a');
  if (next_rand(rng) % 5 == 0) { /* stays undeclared for a while */
    if (!s->large) return;
    if (atomic_fetch_add(&undeclared_large, 1) < MAX_UNDECLARED) return;
    atomic_fetch_sub(&undeclared_large, 1);
  }
  expect(spill_set_swappable(p, 1), "spill_set_swappable(1)", s);
  s->swappable = 1;
  note(s, 'D');
}

static void release(slot* s, uint64_t* rng) {
  if (!s->swappable) check_undeclared(s);
  if (!s->swappable && s->large) atomic_fetch_sub(&undeclared_large, 1);
  expect(spill_free(s->ptr, 0, any_stream(rng)), "spill_free", s);
  note(s, 'f');
  s->ptr = NULL;
}

/* A host pin: check, maybe write a new pattern, unpin. */
static void host_use(slot* s, uint64_t* rng, int write) {
  if (!s->swappable) {
    check_undeclared(s);
    if (write) {
      s->seed = next_rand(rng);
      write_pattern(s->ptr, s->size, s->seed);
    }
    note(s, write ? 'w' : 'r');
    return;
  }
  spill_pin_token t;
  spill_status st = spill_pin_for_host(s->ptr, &t);
  if (st != SPILL_OK) {
    expect(st, "spill_pin_for_host", s);
    return;
  }
  check_pattern(s);
  if (write) {
    s->seed = next_rand(rng);
    write_pattern(s->ptr, s->size, s->seed);
  }
  expect(spill_unpin(&t, NULL, write), "spill_unpin (host)", s);
  note(s, write ? 'W' : 'R');
}

/* The caller is about to overwrite the block whole (spill_discard of all its bytes: one on the
 * host comes back without a copy, and only the new bytes are checked from then on), or says
 * so of a part of it (which discards nothing: every old byte must still be there). */
static void overwrite(slot* s, uint64_t* rng) {
  const int whole = (int)(next_rand(rng) % 2);
  expect(spill_discard(s->ptr, whole ? s->size : s->size / 2 + 1), "spill_discard", s);
  note(s, whole ? 'X' : 'x');
  if (!whole) {
    host_use(s, rng, 1); /* checks every byte, then writes */
    return;
  }
  spill_pin_token t = {0, 0, 0, 0, 0};
  if (s->swappable) {
    spill_status st = spill_pin_for_host(s->ptr, &t);
    if (st != SPILL_OK) {
      expect(st, "spill_pin_for_host (overwrite)", s);
      return;
    }
  }
  s->seed = next_rand(rng);
  write_pattern(s->ptr, s->size, s->seed);
  if (s->swappable) expect(spill_unpin(&t, NULL, 1), "spill_unpin (overwrite)", s);
}

typedef struct held_pin {
  spill_pin_token token;
  void* stream;
  int left; /* operations until the unpin */
} held_pin;

static void* worker(void* arg) {
  uint64_t rng = (uint64_t)(uintptr_t)arg * 0x9E3779B97F4A7C15ull + 1;
  held_pin held = {{0, 0, 0, 0, 0}, NULL, 0};
  unsigned window = (unsigned)(next_rand(&rng) % SLOTS);
  while (atomic_fetch_sub(&ops_left, 1) > 0 && !atomic_load(&failed)) {
    if (held.left > 0 && --held.left == 0) {
      /* Its block may have been freed meanwhile, its address reused: the unpin goes stale. */
      expect(spill_unpin(&held.token, held.stream, 0), "spill_unpin (held)", NULL);
    }
    /* Mostly a small window of slots that slides, as a training step's working set moves
     * (uniformly random slots would make nearly every operation a swap); sometimes any. */
    if (next_rand(&rng) % 64 == 0) window = (window + 1) % SLOTS;
    slot* s = &slots[next_rand(&rng) % 32 == 0 ? next_rand(&rng) % SLOTS
                                                : (window + next_rand(&rng) % HOT) % SLOTS];
    pthread_mutex_lock(&s->m);
    if (s->ptr == NULL) {
      allocate(s, &rng);
      pthread_mutex_unlock(&s->m);
      continue;
    }
    unsigned op = (unsigned)(next_rand(&rng) % 100);
    if (op >= 84 && next_rand(&rng) % 4) op = 30 + op % 25; /* hints a quarter as often */
    if (op < 8) {
      release(s, &rng);
    } else if (op < 30) {
      if (next_rand(&rng) % 8 == 0) overwrite(s, &rng);
      else host_use(s, &rng, 1);
    } else if (op < 55) {
      host_use(s, &rng, 0);
    } else if (op < 70) {
      void* stream = any_stream(&rng);
      spill_pin_token t;
      spill_status st = spill_pin(s->ptr, stream, &t);
      note(s, 'p');
      if (st == SPILL_OK && held.left == 0 && next_rand(&rng) % 3 == 0) {
        held.token = t;
        held.stream = stream;
        held.left = 1 + (int)(next_rand(&rng) % 8);
      } else if (st == SPILL_OK) {
        expect(spill_unpin(&t, stream, 0), "spill_unpin", s);
      } else {
        expect(st, "spill_pin", s);
      }
    } else if (op < 76) {
      expect(spill_record_stream(s->ptr, any_stream(&rng)), "spill_record_stream", s);
      note(s, 'r');
    } else if (op < 84) {
      if (s->swappable && s->large && atomic_fetch_add(&undeclared_large, 1) < MAX_UNDECLARED) {
        spill_status st = spill_set_swappable(s->ptr, 0);
        if (st == SPILL_OK) {
          s->swappable = 0;
          note(s, 'U');
          check_undeclared(s); /* back, and the host may touch it at once */
        } else {
          atomic_fetch_sub(&undeclared_large, 1);
          expect(st, "spill_set_swappable(0)", s);
        }
      } else {
        if (s->swappable && s->large) atomic_fetch_sub(&undeclared_large, 1);
        if (!s->swappable) {
          check_undeclared(s);
          if (s->large) atomic_fetch_sub(&undeclared_large, 1);
          expect(spill_set_swappable(s->ptr, 1), "spill_set_swappable(1)", s);
          s->swappable = 1;
          note(s, 'D');
        }
      }
    } else if (op < 96) {
      expect(spill_prefetch(s->ptr), "spill_prefetch", s);
      note(s, '>');
      if (!s->swappable) check_undeclared(s);
    } else {
      expect(spill_evict(s->ptr), "spill_evict", s);
      note(s, '<');
      if (!s->swappable) check_undeclared(s);
    }
    pthread_mutex_unlock(&s->m);
    if (op % 16 == 0) {
      spill_stats st;
      st.struct_size = sizeof st;
      if (spill_get_stats(0, &st) != SPILL_OK) fail_now("spill_get_stats", NULL);
      else if (st.reserved_bytes > budget) fail_now("more mapped than the budget", NULL);
    }
  }
  if (held.left > 0) expect(spill_unpin(&held.token, held.stream, 0), "spill_unpin (last)", NULL);
  return NULL;
}

static void run_seed(unsigned long seed, long ops) {
  char conf[256];
  snprintf(conf, sizeof conf,
           "device:sim,sim_capacity:2GiB,budget:1GiB,swap_threshold:256KiB,policy:lru,"
           "trace:off,chaos:%lu",
           seed);
  REQUIRE_OK(spill_init(conf));
  for (int i = 0; i < STREAMS; ++i) REQUIRE_OK(spill_stream_create(0, &streams[i]));
  uint64_t rng = seed * 7919 + 3;
  for (int i = 0; i < SLOTS; ++i) {
    pthread_mutex_init(&slots[i].m, NULL);
    slots[i].ptr = NULL;
    allocate(&slots[i], &rng);
    REQUIRE(slots[i].ptr != NULL);
  }
  /* The budget: 25% of the live footprint, in granules (never below what held pins and
   * undeclared blocks can need at once). */
  spill_stats st;
  st.struct_size = sizeof st;
  REQUIRE_OK(spill_get_stats(0, &st));
  budget = st.allocated_bytes / 4 / (2 * MIB) * (2 * MIB);
  const uint64_t floor = 32ull * MIB;
  if (budget < floor) budget = floor;
  REQUIRE_OK(spill_set_budget(0, budget));
  printf("seed %lu: live footprint %.1f MiB, budget %.1f MiB\n", seed,
         (double)st.allocated_bytes / MIB, (double)budget / MIB);

  atomic_store(&ops_left, ops);
  pthread_t threads[THREADS];
  for (int t = 0; t < THREADS; ++t)
    pthread_create(&threads[t], NULL, worker, (void*)(uintptr_t)(seed * 100 + (unsigned long)t));
  for (int t = 0; t < THREADS; ++t) pthread_join(threads[t], NULL);
  REQUIRE(!atomic_load(&failed));

  /* Every block still holds its pattern; then nothing may be left behind. */
  for (int i = 0; i < SLOTS; ++i) {
    if (slots[i].ptr == NULL) continue;
    host_use(&slots[i], &rng, 0);
    release(&slots[i], &rng);
  }
  REQUIRE(!atomic_load(&failed));
  REQUIRE_OK(spill_get_stats(0, &st));
  printf("seed %lu: %ld ops, %ld pattern checks (%ld unpinned reads of undeclared blocks), "
         "%llu swap-outs, %llu swap-ins, %llu clean evictions, %llu stale unpins, %ld OOMs\n",
         seed, ops, atomic_load(&n_checks), atomic_load(&n_undeclared_reads),
         (unsigned long long)st.swap_outs, (unsigned long long)st.swap_ins,
         (unsigned long long)st.clean_evictions, (unsigned long long)st.stale_unpins,
         atomic_load(&n_ooms));
  CHECK(st.allocated_bytes == 0);
  CHECK(st.swapped_out_bytes == 0);
  CHECK(st.pinned_bytes == 0);
  CHECK(st.swap_outs > 0 && st.swap_ins > 0);
  CHECK(st.reserved_peak_bytes <= (uint64_t)1 << 30);
  CHECK(atomic_load(&n_checks) > ops / 4);
  CHECK(atomic_load(&n_ooms) < ops / 20); /* pressure, not a wall */
  for (int i = 0; i < STREAMS; ++i) CHECK_OK(spill_stream_destroy(0, streams[i]));
  CHECK_OK(spill_empty_cache(0));
  REQUIRE_OK(spill_get_stats(0, &st));
  CHECK(st.reserved_bytes == 0);
  CHECK_OK(spill_shutdown());
}

TEST(four_threads_random_operations) {
  const char* env_ops = getenv("SPILL_FUZZ_OPS");
  const char* env_seeds = getenv("SPILL_FUZZ_SEEDS");
  long ops = env_ops ? atol(env_ops) : 200000;
  char seeds[256];
  snprintf(seeds, sizeof seeds, "%s", env_seeds ? env_seeds : "1");
  for (char* tok = strtok(seeds, ","); tok; tok = strtok(NULL, ",")) {
    atomic_store(&n_checks, 0);
    atomic_store(&n_ooms, 0);
    atomic_store(&n_undeclared_reads, 0);
    atomic_store(&undeclared_large, 0);
    run_seed(strtoul(tok, NULL, 10), ops);
  }
}

#define TESTS(X) X(four_threads_random_operations)

C_TEST_MAIN(TESTS)

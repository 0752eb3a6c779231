/* spill's C API: the stable door for frameworks and other languages (the Python package, the
 * PyTorch and CuPy allocators). C11 and C++; includes no CUDA header: a stream is a `void*`
 * holding a cudaStream_t (the simulated device's streams come from spill_stream_create).
 *
 * Conventions
 * - Every function returns a spill_status (SPILL_OK = 0) unless it says otherwise. On failure
 *   spill_last_error() holds a message for the calling thread that names the input (pointer,
 *   size, device, stream); bad input changes nothing. No C++ exception crosses this API.
 * - Every function is thread-safe, also when called from destructors that run as a thread
 *   ends (C++ thread_local objects, pthread key destructors) or at exit (static destructors).
 * - Devices are ordinals 0..SPILL_MAX_DEVICES-1. Each ordinal has its own runtime (caching
 *   allocator, budget, pinned host pool, swapper), created on its first use from the
 *   configuration (spill_init, else the SPILL_CONF environment variable, else defaults) with
 *   the configuration's `gpu:` replaced by the ordinal. With `device:sim` (or `device:auto`
 *   and no GPU) each ordinal is its own simulated GPU.
 * - Strings that spill allocates for the caller (JSON, messages) are returned through a
 *   `char** out` and released with spill_string_free.
 * - Stream semantics follow CUDA's: spill never synchronises the caller's streams unless a
 *   function says so. A block freed on stream S may be reused at once by work on S, and by
 *   other streams once S (and every stream named by spill_record_stream) has passed the free.
 *   NULL and cudaStreamLegacy name the legacy default stream. cudaStreamPerThread is refused
 *   (INVALID_ARGUMENT): it names a different stream on every thread, and spill uses the
 *   streams it was given from whichever thread later evicts or reuses a block.
 *
 * Residency (swapping). A large block (spill's `swap_threshold`, 1 MiB by default, or more)
 * may have its bytes moved to pinned host memory and back at the same address, but only once
 * the caller declared it swappable (spill_set_swappable): from then on every use of it must be
 * bracketed by spill_pin / spill_unpin (or spill_pin_for_host). Blocks nobody declared are
 * never evicted: frameworks allocate buffers no hook ever sees in use. So a fresh block is
 * protected until it is declared, and its allocation counts as a use by the allocating stream:
 * an eviction orders after the work its producer enqueued there. An eviction copies the bytes
 * unless spill knows the host copy is current (declaring a block swappable makes it dirty;
 * an unpin with wrote = 0 keeps a current copy current). Pins and unpins of blocks that never
 * move (smaller blocks) are cheap no-ops with an empty token.
 *
 * Steps belong to a scope, a caller-chosen number (e.g. a stream handle or a model's id), so
 * that two training loops in one process do not see each other's steps as deviations.
 * spill_begin_step, spill_begin_op and spill_set_scope make their scope the calling thread's
 * current scope on that device (a thread keeps one on each device, all 64 of them at once);
 * every pin belongs to the current scope of the thread that makes
 * it (scope 0 for a thread that never named one). Frameworks whose backward pass runs on other
 * threads call spill_set_scope there before the pins (spill_begin_op would also make the
 * scope's ops the caller's to mark for the rest of the step).
 *
 * Lifecycle. spill_shutdown frees every runtime, including blocks still allocated; later calls
 * fail with SPILL_ERROR_SHUT_DOWN (pointers from before stay invalid) until spill_init starts a
 * new session. At process exit spill frees nothing (the CUDA runtime may already be gone; the
 * operating system reclaims the memory) and frees that arrive during exit succeed doing
 * nothing. In a child created by fork() after spill started in the parent, every call fails
 * with SPILL_ERROR_FORKED_CHILD and touches nothing of the parent's runtime. */
#ifndef SPILL_SPILL_H
#define SPILL_SPILL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h> /* ssize_t, for the PyTorch entry points */

#if defined(_WIN32) && defined(SPILL_BUILDING_LIBRARY)
#define SPILL_API __declspec(dllexport)
#elif defined(_WIN32)
#define SPILL_API __declspec(dllimport)
#elif defined(__GNUC__)
#define SPILL_API __attribute__((visibility("default")))
#else
#define SPILL_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The version of this interface; bumped when a function or struct changes incompatibly.
 * 2 (spill 0.2.0): spill_pin_token gained its `pin` field (24 -> 32 bytes).
 * Functions added beside the others change nothing a caller built earlier relies on and leave
 * it as it is; each says since which spill version it is there (spill_discard,
 * spill_set_block_name, spill_get_block_name, spill_get_block_info: 0.2.0). */
#define SPILL_C_API_VERSION 2
#define SPILL_MAX_DEVICES 64

typedef enum spill_status {
  SPILL_OK = 0,
  SPILL_ERROR_INVALID_ARGUMENT = 1, /* a bad pointer, size, device, stream or string */
  SPILL_ERROR_OUT_OF_MEMORY = 2,    /* the budget or the device cannot hold the request */
  SPILL_ERROR_HOST_CAP = 3,         /* pinned host memory for swapped bytes ran out (host_cap,
                                       or the host refused to pin more: the message says which) */
  SPILL_ERROR_CUDA = 4,             /* a CUDA call failed (the message names it) */
  SPILL_ERROR_SHUT_DOWN = 5,        /* spill_shutdown was called (spill_init starts again) */
  SPILL_ERROR_FORKED_CHILD = 6,     /* this process is a fork of one where spill had started */
  SPILL_ERROR_ALREADY_INITIALIZED = 7, /* spill_init with another configuration while running */
  SPILL_ERROR_NOT_FOUND = 8,        /* nothing to return (e.g. no step recorded yet) */
  SPILL_ERROR_WRITE_FAILED = 9,     /* a file could not be written whole: no room or I/O error */
  SPILL_ERROR_INTERNAL = 99         /* a bug in spill: please report the message */
} spill_status;

/* ------------------------------------------------------------------ errors and version */

/* A static description of a status code ("out of memory", ...); never NULL. */
SPILL_API const char* spill_status_string(spill_status status);
/* The message of the calling thread's latest failed call ("" when none failed yet). Valid
 * until the next failing call on this thread, or the thread's end. Successful calls leave it
 * unchanged. Calls failing in destructors that run at a thread's end (C++ thread_local) or at
 * exit (static destructors) set it as any other. */
SPILL_API const char* spill_last_error(void);
/* The library's version, e.g. "0.2.0"; never NULL. */
SPILL_API const char* spill_version(void);
/* The same as numbers (any pointer may be NULL). */
SPILL_API void spill_version_numbers(int* major, int* minor, int* patch);
/* Reads a size the way the configuration string does ("8GiB", "512MiB", "1.5GB", "4096"):
 * binary and decimal units (B to EiB, KB to EB), case-insensitive, optional fraction (rounded
 * to bytes). INVALID_ARGUMENT for NULL arguments, text that is not a size, a capital prefix
 * before a small b ("1Gb": bits), a fraction of a byte, or a size past 2^63 bytes (the message
 * quotes the text); *bytes is unchanged then. Needs no initialisation. */
SPILL_API spill_status spill_parse_size(const char* text, uint64_t* bytes);

/* ------------------------------------------------------------------ lifecycle */

/* Sets the configuration, e.g. "budget:8GiB,host_cap:64GiB" (see the README's table); NULL
 * takes SPILL_CONF (or the defaults when it is unset). The string alone decides: SPILL_CONF is
 * not read when `conf` is given. Runtimes are still created per device on first use.
 * Errors: INVALID_ARGUMENT for a malformed string (nothing changes); ALREADY_INITIALIZED when
 * runtimes exist with a different configuration (the same configuration again is SPILL_OK).
 * After spill_shutdown it starts a new session. */
SPILL_API spill_status spill_init(const char* conf);
/* Frees every runtime: blocks still allocated, cached memory, swapped-out bytes, streams made
 * by spill_stream_create. Waits for calls in progress on other threads and for the devices'
 * queued work. Idempotent (SPILL_OK when nothing runs). Later calls: SHUT_DOWN. */
SPILL_API spill_status spill_shutdown(void);
/* Creates device `device`'s runtime now (else it is created on first use); *simulated (may be
 * NULL) tells whether it is the simulated device. Errors: INVALID_ARGUMENT (ordinal, or
 * SPILL_CONF malformed), CUDA (device:cuda without a usable GPU), OUT_OF_MEMORY (also no
 * thread for the simulated device's streams), SHUT_DOWN, FORKED_CHILD. */
SPILL_API spill_status spill_device_open(int device, int* simulated);

/* ------------------------------------------------------------------ streams */

/* A new stream on `device`: a cudaStream_t on a GPU, the only kind on the simulated device.
 * The caller destroys it with spill_stream_destroy. Errors: OUT_OF_MEMORY when the simulated
 * device holds 256 streams already, or no thread can be started to run the stream (each
 * simulated stream has one: the process's thread limit, ulimit -u); nothing is left behind. */
SPILL_API spill_status spill_stream_create(int device, void** stream);
/* Waits for the stream's work, forgets it (as spill_stream_destroyed) and destroys it. */
SPILL_API spill_status spill_stream_destroy(int device, void* stream);
/* Waits on the host until the work queued on `stream` is done. */
SPILL_API spill_status spill_stream_synchronize(int device, void* stream);
/* Call before destroying a stream that was passed to spill (a framework's own stream): waits
 * for it, then forgets it as a user of blocks. */
SPILL_API spill_status spill_stream_destroyed(int device, void* stream);

/* ------------------------------------------------------------------ memory */

/* Allocates `size` bytes on `device` for use on `stream` (NULL: the default stream), aligned
 * to 512 bytes. The memory is ready for work enqueued on `stream`: work queued there earlier
 * may still use it (a block freed on `stream` is reused at once), so host code synchronises
 * `stream` before touching it, as after cudaMallocAsync. size 0 gives *out = NULL and SPILL_OK
 * (spill_free accepts NULL). The block is
 * not swappable until declared. Under pressure cached memory is released and swappable blocks
 * are evicted first. Errors: INVALID_ARGUMENT (out NULL, device, stream), OUT_OF_MEMORY (the
 * message says where every byte is; also in spill_last_oom_message), CUDA, SHUT_DOWN,
 * FORKED_CHILD. *out is NULL on failure. */
SPILL_API spill_status spill_malloc(void** out, size_t size, int device, void* stream);
/* Frees a block from spill_malloc, stream-ordered on `stream` (the bytes may be reused by work
 * on `stream` at once; see the conventions). A pinned block may be freed: a later unpin of its
 * token is a no-op. A block ever pinned with spill_pin_for_host whose swap-in (a prefetch) is
 * still landing is waited for on the host here, so host code writing the memory's next owner
 * at once is not overwritten by that copy. NULL is SPILL_OK. Errors: INVALID_ARGUMENT naming
 * the pointer for an unknown pointer, a pointer inside a block, a double free, or a block of
 * another device (nothing changes); SHUT_DOWN (the block was already freed by spill_shutdown). */
SPILL_API spill_status spill_free(void* ptr, int device, void* stream);
/* The block containing `ptr` is also used by work on `stream`: its memory is reused, and its
 * bytes swapped out, only once that work is done. At most four streams besides the allocation
 * stream per block. Errors: INVALID_ARGUMENT (unknown pointer, stream, too many streams). */
SPILL_API spill_status spill_record_stream(void* ptr, void* stream);
/* Returns cached (free) memory of `device` to the device, waiting for queued work on it, and
 * gives back the pinned host memory that holds no swapped-out bytes (it is otherwise kept for
 * the next swap-out; stats: host_pinned), the host copies of blocks freed while a copy of
 * theirs was in flight included (waiting for those copies). */
SPILL_API spill_status spill_empty_cache(int device);
/* Changes `device`'s budget of mapped device bytes. Raising it takes effect at once (up to
 * the device's memory). Lowering it releases cached memory and evicts swappable blocks until
 * the mapped bytes fit; when they cannot, OUT_OF_MEMORY names what holds them (pinned and
 * undeclared blocks, small blocks, a host cap too full to take more swapped-out bytes) and the
 * budget stays as it was; blocks evicted before it gave up stay on the host (they come back
 * when pinned; the stats count them as swapped out). INVALID_ARGUMENT for a budget above the
 * device, below one mapping granule, or below one small-pool segment (2 MiB, whatever the
 * granule: small requests share segments of that size; with swap_threshold:0 there is no
 * small pool and one granule is enough). */
SPILL_API spill_status spill_set_budget(int device, uint64_t bytes);
/* The budget in effect (bytes). */
SPILL_API spill_status spill_get_budget(int device, uint64_t* bytes);

/* ------------------------------------------------------------------ residency */

/* What spill_pin returns and spill_unpin takes. An empty token (block 0) comes from a block
 * that never moves; unpinning it does nothing. A token whose block was freed meanwhile (its
 * address perhaps reused by a new block, also one of a later spill_init) unpins nothing: the
 * generation, unique in the process, tells them apart.
 * `pin` tells this pin from the block's other pins, so that unpinning it twice is refused
 * while they still hold the block (0 when the block already had four pins open: such a
 * token's second unpin is caught only once it would end more pins than are open). */
typedef struct spill_pin_token {
  uint64_t block;      /* the block's base address, 0 for an empty token */
  uint64_t generation; /* which life of that address */
  int32_t device;
  uint32_t flags;      /* SPILL_PIN_HOST for a token from spill_pin_for_host */
  uint64_t pin;        /* which of the block's pins (since 0.2.0) */
} spill_pin_token;

#define SPILL_PIN_HOST 1u

typedef enum spill_residence {
  SPILL_RESIDENT = 0,     /* on the device */
  SPILL_SWAPPING_OUT = 1, /* copy to the host in flight; the device bytes are still valid */
  SPILL_ON_HOST = 2,      /* only on the host: touching it on the device faults */
  SPILL_SWAPPING_IN = 3   /* mapped again, copy back in flight */
} spill_residence;

/* Declares whether the block containing `ptr` may be swapped out. Declaring it swappable
 * promises that every later use is bracketed by a pin and an unpin; its bytes count as
 * changed (the next eviction copies them). Declare it once the work that writes it is
 * enqueued (an eviction still waits for the allocating stream and for streams named by pins
 * or spill_record_stream). Declaring it not swappable brings it back
 * first if it is on the host, and returns once the host may touch it. Blocks below the swap
 * threshold never move: accepted and ignored. INVALID_ARGUMENT naming ptr when no block
 * contains it; OUT_OF_MEMORY when it cannot come back (nothing changes). */
SPILL_API spill_status spill_set_swappable(void* ptr, int swappable);
/* Work about to be enqueued on `stream` uses the block containing `ptr` (interior pointers
 * and nested pins are fine): it stays on the device until the matching spill_unpin. If it is
 * on the host it is mapped and copied back, and `stream` waits for the copy (no host wait).
 * Blocks that never move give an empty token. Errors: INVALID_ARGUMENT (unknown pointer,
 * stream, token NULL), OUT_OF_MEMORY when it cannot come back because pinned or unswappable
 * blocks fill the budget (the message names them; nothing changes), CUDA. */
SPILL_API spill_status spill_pin(void* ptr, void* stream, spill_pin_token* token);
/* The pin for host code (a CPU framework on the simulated device, a caller without streams):
 * returns once the block is resident and no copy of spill's touches it, so the host may read
 * and write its bytes (on the simulated device they are host memory while resident). It does
 * not wait for the caller's own work on streams. Unpin with spill_unpin (any stream). */
SPILL_API spill_status spill_pin_for_host(void* ptr, spill_pin_token* token);
/* The work that used the pinned block is enqueued on `stream` (a swap-out waits for it);
 * `wrote` nonzero if it may have written the block (else a current host copy stays current
 * and a later eviction copies nothing). Each token is unpinned once. A token whose block was
 * freed meanwhile is a no-op (counted in spill_stats.stale_unpins), also one from before
 * spill_shutdown (whether or not the new session has started its device). The unpin belongs
 * to the calling thread's current step scope (see spill_begin_step), as the pin did to the pinning
 * thread's: unpin from the thread that pinned, or from one in the same scope (a thread reading
 * another scope's blocks then neither enters nor splits that scope's recorded ops). Errors:
 * INVALID_ARGUMENT (token NULL, stream, a token unpinned twice, a token whose `pin` was never
 * one of the block's pins: corrupted, or not from spill_pin), SHUT_DOWN. */
SPILL_API spill_status spill_unpin(const spill_pin_token* token, void* stream, int wrote);
/* Hints. spill_prefetch starts bringing the block back now (only into free budget: it never
 * evicts other blocks); spill_evict starts moving it to the host now (a no-op for a pinned,
 * unswappable or fresh block, and for one under swap_threshold). Both return without waiting.
 * Errors: INVALID_ARGUMENT (unknown pointer); spill_evict returns HOST_CAP when host_cap leaves
 * no room for the block's bytes, or the host refuses to pin them (the block stays on the
 * device, unchanged; room comes back as swapped-out blocks return or are freed). An evicted
 * block reads SWAPPING_OUT until its copy has finished; its device memory goes back when spill
 * next looks after that: a residence query of the block, another spill_evict, an allocation or
 * pin that needs room, an op of a step. */
SPILL_API spill_status spill_prefetch(void* ptr);
SPILL_API spill_status spill_evict(void* ptr);
/* The caller is about to overwrite the `bytes` bytes at `ptr` whole (a framework zeroing a
 * gradient in place). When they cover all of a block's allocation (`ptr` is the address the
 * allocation returned, `bytes` the size it asked for), the block's bytes are dead: if it is on
 * the host, the next pin maps it back without copying them (undefined until written). A range
 * covering less (a part of a block: a tensor made over its first bytes or inside it) leaves
 * the rest live, so nothing is discarded; on the device nothing changes either. Errors:
 * INVALID_ARGUMENT for an unknown pointer, `bytes` 0, or a range that runs past the end of
 * the block's allocation; nothing changes then. (Since 0.2.0.) */
SPILL_API spill_status spill_discard(void* ptr, size_t bytes);
/* Where the bytes of the block containing `ptr` are now (blocks that never move: resident).
 * A swap-out whose copy has finished is completed here (ON_HOST, its device memory given
 * back). */
SPILL_API spill_status spill_get_residence(const void* ptr, spill_residence* residence);
/* Which life of its address the block containing `ptr` is in: the generation a pin's token
 * carries, read without pinning (so no use of the block, nothing a step records). A caller
 * keeping an address across frees tells a new block there from the one it knew. 0 for
 * blocks that never move. Errors: INVALID_ARGUMENT (unknown pointer, generation NULL). */
SPILL_API spill_status spill_get_generation(const void* ptr, uint64_t* generation);
/* What spill knows of the block containing `ptr` now, read without pinning it (no use of the
 * block, nothing a step records): for tools and checks, e.g. one that finds a use of a
 * swappable block without a pin (Python: spill.torch.check_pins()). `base` and `size` are the
 * allocation's address and the bytes it asked for. A block that can move (a swapper runs and
 * the block is not under swap_threshold) has `movable` 1 and the rest as it is now: its
 * `residence` (as spill_get_residence's, except that a swap-out whose copy has finished is
 * not completed here: it may still read SWAPPING_OUT), whether it is declared `swappable`, its
 * open `pins`
 * (pins not yet unpinned; spill's own brief holds while it copies the block count too) and its
 * `generation` (as spill_get_generation's). Any other block reads movable 0, resident, not
 * swappable, no pins, generation 0. Errors: INVALID_ARGUMENT (unknown pointer, info NULL).
 * (Since 0.2.0.) */
typedef struct spill_block_info {
  uint64_t base;
  uint64_t size;
  uint64_t generation;
  spill_residence residence;
  int32_t movable;
  int32_t swappable;
  int32_t pins;
} spill_block_info;
SPILL_API spill_status spill_get_block_info(const void* ptr, spill_block_info* info);

/* ------------------------------------------------------------------ steps */

/* A training step of `scope` on `device` begins / ends; spill_begin_op marks the start of an
 * op (a kernel or layer; `name` may be NULL) within it. Each makes `scope` the calling thread's
 * current scope on the device (see the top of this file). Without begin_op, an op starts at
 * the first pin after an unpin; after a begin_op, ops start only at begin_op until the step
 * ends. With policy:plan and a budget, the first step of a scope is recorded; later steps
 * follow the plan made from it (prefetches and evictions ahead of use) until a step deviates,
 * which is recorded again. Unbalanced calls are not errors, so that a loop that caught an
 * exception mid-step (out of memory with too large a batch) simply goes on: a begin_step while
 * a step of its scope is in progress abandons that step (not recorded, not counted) and
 * begins anew, and an end_step with no step of its scope in progress does nothing.
 * spill_begin_op refuses a name that is not UTF-8 (INVALID_ARGUMENT naming `name`): names go
 * into the step graph's JSON. Names past SPILL_MAX_BLOCK_NAME bytes are cut there (before a
 * character that would be split), as block names are (a graph file holds names of at most
 * 1024 bytes). */
SPILL_API spill_status spill_begin_step(int device, uint64_t scope);
SPILL_API spill_status spill_end_step(int device, uint64_t scope);
SPILL_API spill_status spill_begin_op(int device, uint64_t scope, const char* name);
/* Makes `scope` the calling thread's current scope on `device` and nothing else: no step or op
 * begins, no scope is created, ops keep starting at the first pin after an unpin. For a thread
 * that joins a step another thread began (PyTorch's CUDA backward runs on autograd's device
 * thread). Like the other step calls it creates the device's runtime on its first use, and on
 * a runtime without a swapper (policy:none) it is SPILL_OK and does nothing. Errors, with a
 * message naming spill_set_scope: INVALID_ARGUMENT for an ordinal outside
 * 0..SPILL_MAX_DEVICES-1, SHUT_DOWN after spill_shutdown, FORKED_CHILD. */
SPILL_API spill_status spill_set_scope(int device, uint64_t scope);
/* Says which variant the step of `scope` in progress is, by a key of the caller's choosing (a
 * hash of the batch's shapes), for steps that differ in the blocks they make from variant to
 * variant: batches of a few lengths, where a tensor under swap_threshold at one length (never
 * moved, not seen by the swapper) is over it at another. (Steps that differ in which blocks
 * from before them they use, as layers skipped at random, are spliced into one plan, keys or
 * not.) Without keys each change of variant leaves the plan and is recorded again. With them
 * the scope keeps the plan of each variant (up to 8, the least recently followed dropped) by
 * the keys of the steps that ended on it, and a step
 * whose key belongs to another plan than the one it would follow switches to that plan, when
 * the call comes before the step's first pin (call it right after spill_begin_step); later, the
 * key only goes with the plan the step ends on. Keys near as numbers are taken for steps alike:
 * a key no plan has had follows the plan of the nearest key met, when that is another plan's
 * (make keys grow with the batch's size, as spill.torch's do, so that a length not met before
 * follows the plan of the nearest length met). Steps all of one key, or without keys, behave
 * as before. A call with no step of the scope in progress does nothing; unlike the other step
 * calls it does not change the calling thread's current scope; spill_set_budget drops the
 * plans. Errors as spill_set_scope's, naming spill_step_key. (Since 0.2.0.) */
SPILL_API spill_status spill_step_key(int device, uint64_t scope, uint64_t key);
/* Names `scope` on `device` for traces and reports, e.g. after the model it trains ("GPT
 * (offload)"): the trace gets a "scope_name" event (address: the scope, the name its tag) now
 * and just before each of the scope's step marks, and `spill report` shows the name beside the
 * scope's number; spill_write_step_graph's graph carries it. The name is copied; NULL or ""
 * clears it; naming again replaces it; it stays until spill_end_scope (a name per scope: a
 * caller naming ever new scopes ends them). While tracing (trace:1, the default) each
 * distinct name is also kept as a trace tag for the process's life, as block names are, so
 * name scopes after what they are, not with ever new text. Names past
 * SPILL_MAX_BLOCK_NAME bytes are cut there (before a character that would be split). Touches
 * no step and not the calling thread's current scope; does nothing without a swapper
 * (policy:none). Errors as spill_set_scope's, naming spill_set_scope_name, and
 * INVALID_ARGUMENT naming `name` when the (cut) name is not UTF-8; nothing changes then.
 * (Since 0.2.0.) */
SPILL_API spill_status spill_set_scope_name(int device, uint64_t scope, const char* name);
/* Ends `scope` on `device` for good: spill drops its recorded step and plan (it keeps them
 * otherwise, for the process's life: about 3.5 KiB a scope, and every free of a block and
 * every choice of an eviction looks at each scope: with thousands of scopes never ended they
 * slow down, see docs/c-api.md for figures). Call
 * it when the model or loop that used the scope is done, e.g. after each run of a
 * hyperparameter sweep; do not take a new scope per step. A step of the scope in progress is
 * abandoned (not recorded, not counted; copies it started finish as usual). Pins made later
 * in the scope by a thread whose current scope it still is touch no step state; a later
 * spill_begin_step or spill_begin_op of the same number starts it afresh (recorded again).
 * Ending a scope that holds nothing (never begun, already ended, or a device without a
 * swapper) is SPILL_OK and does nothing. Thread-safe, like the other step calls: a thread
 * issuing the scope's prefetches is waited for. */
SPILL_API spill_status spill_end_scope(int device, uint64_t scope);
/* Writes the last recorded step of `scope` on `device` as a graph (docs/graph-format.md) to
 * `path`, for `spill plan`. NOT_FOUND when no step of that scope was recorded (recording needs
 * policy:plan and a budget); INVALID_ARGUMENT when the file cannot be created (the message
 * names it), WRITE_FAILED when writing it fails (a full disk). A file already
 * at `path` is replaced whole or not at all (written beside it, then renamed over it). */
SPILL_API spill_status spill_write_step_graph(int device, uint64_t scope, const char* path);

/* ------------------------------------------------------------------ observability */

/* Releases a string spill returned through a `char** out` (NULL is fine). */
SPILL_API void spill_string_free(char* text);

/* A device's statistics. The caller sets struct_size = sizeof(spill_stats); spill fills the
 * fields that fit in it (newer fields are appended, so an older caller keeps working) and
 * sets struct_size to the bytes it filled. Byte figures are "now" unless named peak/total. */
typedef struct spill_stats {
  size_t struct_size;
  int32_t device;
  int32_t simulated;            /* 1 on the simulated device */
  uint64_t budget_bytes;        /* the limit on mapped device bytes */
  uint64_t allocated_bytes;     /* handed out (rounded sizes), swapped-out blocks included
                                 * (out-of-memory messages say "resident" for the rest) */
  uint64_t allocated_peak_bytes;
  uint64_t requested_bytes;     /* asked for */
  uint64_t reserved_bytes;      /* mapped physical device memory (what the budget limits) */
  uint64_t reserved_peak_bytes;
  uint64_t cached_bytes;        /* mapped but free, ready for reuse */
  uint64_t swapped_out_bytes;   /* allocated blocks whose bytes are on the host */
  uint64_t host_pinned_bytes;   /* pinned host memory held */
  uint64_t allocations, frees, cache_hits, ooms;
  uint64_t swap_out_bytes_total, swap_in_bytes_total;  /* copied each way so far */
  uint64_t swap_outs, swap_ins;
  uint64_t clean_evictions;     /* evicted with no copy (the host copy was current) */
  uint64_t prefetches, prefetch_hits, demand_fetches;
  uint64_t evictions_reactive, evictions_planned;
  uint64_t stale_unpins;        /* unpins whose block was freed meanwhile (ignored) */
  uint64_t pinned_bytes;        /* swapper-tracked blocks pinned now */
  uint64_t unswappable_bytes;   /* large blocks not declared swappable */
  uint64_t steps_recorded, steps_planned, deviations;
  uint64_t free_errors;         /* failed spill_torch_free calls (they cannot return a code) */
  /* The rules an integration declares by (constant for a runtime): */
  uint64_t granularity_bytes;   /* mapping granule: a movable block maps a multiple of it */
  uint64_t small_limit_bytes;   /* requests up to this share small-pool segments (never move) */
  uint64_t min_movable_bytes;   /* the smallest request whose block can move (swap_threshold,
                                   past the small pool): declare only these swappable */
  uint64_t steps_resynced;      /* steps that left their plan (a deviation) and followed it again
                                   where they matched it: ops skipped, added or repeated */
} spill_stats;

/* Fills `stats` for `device` (see spill_stats). INVALID_ARGUMENT when stats is NULL or
 * struct_size is smaller than the struct_size field itself. */
SPILL_API spill_status spill_get_stats(int device, spill_stats* stats);
/* The same and more as one JSON object with flat dotted keys in the style of PyTorch's
 * memory_stats: "allocated_bytes.current" / ".peak" / ".allocated" / ".freed" (likewise
 * requested_bytes, reserved_bytes, cached_bytes, host_pinned_bytes), counters "num_allocs",
 * "num_frees", "num_cache_hits", "num_ooms", ..., the swapper's "swap.bytes_out", ...,
 * "budget_bytes", "device", "device_name", "simulated", and the device's virtual-memory calls
 * so far with the host's seconds in them, "vmm.map_calls" / "vmm.map_s" (likewise reserve,
 * create, unmap, release, unreserve) and "vmm.host_s" (all kinds). *json is freed with
 * spill_string_free. */
SPILL_API spill_status spill_stats_json(int device, char** json);
/* A memory snapshot of `device` as JSON in the layout of PyTorch's memory_viz (segments with
 * their blocks, and the allocation history still in the trace buffer); blocks whose bytes are
 * on the host carry an "[on host]" frame. tools/snapshot_to_pickle.py turns it into the pickle
 * memory_viz opens. *json is freed with spill_string_free. */
SPILL_API spill_status spill_snapshot_json(int device, char** json);
/* Writes the trace events recorded since the previous export (every device: allocations,
 * maps, pins, swaps, stalls, OOMs) as Chrome/Perfetto trace JSON to `path`, and starts a new
 * trace. Recording is on unless the configuration says `trace:off`. INVALID_ARGUMENT when the
 * file cannot be created, WRITE_FAILED when writing it fails (a full disk), the message naming
 * it; the events are taken only once written, so after either error they are still there for
 * the next export. Memory is bounded without exports: each thread that records keeps its newest
 * 65536 events (3 MiB) while it lives, and the threads that have exited share one store of
 * the newest 65536 of theirs; older events are dropped. */
SPILL_API spill_status spill_trace_export(const char* path);
/* The message of `device`'s latest out-of-memory failure (where every byte was), or "" when
 * there was none. *message is freed with spill_string_free. */
SPILL_API spill_status spill_last_oom_message(int device, char** message);
/* Starts the peaks of `device`'s statistics (allocated, requested, reserved, cached and pinned
 * host bytes) again from their current values (PyTorch's reset_peak_memory_stats). */
SPILL_API spill_status spill_reset_peak_stats(int device);
/* An integration's own interval peak, apart from the peaks above (which
 * spill_reset_peak_stats restarts for the user): `*peak_bytes` is the most bytes allocated on
 * `device` at once since the previous call (the first call: since the device started), and
 * the next interval starts from the bytes allocated now. spill.torch.offload takes it at each
 * step boundary (its quiet steps). INVALID_ARGUMENT when peak_bytes is NULL. */
SPILL_API spill_status spill_take_allocated_peak(int device, uint64_t* peak_bytes);
/* A sentence spill adds to every out-of-memory message of `device` (spill_malloc's error, so
 * also spill_torch_malloc's and the PyTorch integrations', and spill_last_oom_message) until it
 * is replaced; NULL or "" removes it. For an integration to say what it changed that matters
 * to an OOM (spill.torch.offload: a step run without swapping activations, and how to turn
 * that off). Notes longer than 4096 bytes are cut there (before a character that would be
 * split). INVALID_ARGUMENT naming `note` when the (cut) note is not UTF-8. */
SPILL_API spill_status spill_set_oom_note(int device, const char* note);

/* The longest block name kept, in bytes (longer ones are cut). */
#define SPILL_MAX_BLOCK_NAME 255
/* Names the block that starts at `ptr` (the address spill_malloc returned), e.g. after the
 * tensor it holds ("layers.3.fc1.weight (param)"), for the views that list blocks:
 * spill_snapshot_json (a frame with the name and a "name" field on the block, and on its
 * alloc and free actions in the history while the trace holds them), the out-of-memory
 * messages (the largest named resident blocks, up to 5; the blocks a failed pin or budget
 * change names as unevictable) and the trace (a "name" event with the block's address and
 * size, the name its tag). The name is copied; NULL or "" clears it; naming again replaces it.
 * It goes with the block: once the block is freed, no later block at that address shows it.
 * Names past SPILL_MAX_BLOCK_NAME bytes are cut there (before a character that would be
 * split). Naming takes the allocator's lock once; freeing a named block drops its name
 * (unnamed blocks cost nothing more). Each distinct name stays in the trace's tag table for
 * the process's life. Errors: INVALID_ARGUMENT naming the address when no live block of
 * spill's starts at `ptr` (an interior pointer, a freed block, memory not spill's), naming
 * `name` when the (cut) name is not UTF-8; nothing changes then. (Since 0.2.0.) */
SPILL_API spill_status spill_set_block_name(void* ptr, const char* name);
/* The name of the block that starts at `ptr` ("" when it has none); *name is freed with
 * spill_string_free. Errors as spill_set_block_name's for `ptr`. (Since 0.2.0.) */
SPILL_API spill_status spill_get_block_name(const void* ptr, char** name);

/* ------------------------------------------------------------------ PyTorch */

/* The allocator hooks of PyTorch's CUDAPluggableAllocator, with the signatures it calls
 * (streams are cudaStream_t). Prefer spill.torch.enable() (Python), which installs them with a
 * C++ shim that raises torch.cuda.OutOfMemoryError; the bare symbols behave as follows.
 * - spill_torch_malloc: size 0 returns NULL (as PyTorch's own allocator does; a null DataPtr
 *   is never freed). PyTorch never checks for NULL, so a failure (out of memory, a negative
 *   size, a bad device, after shutdown, in a fork child) calls the failure handler (see
 *   spill_set_oom_handler) and, if the handler returns, returns NULL.
 * - spill_torch_free: as spill_free; a failure cannot be returned: it is counted
 *   (spill_stats.free_errors), kept in spill_last_error, and the first one per device is
 *   printed to stderr. NULL is ignored.
 * - spill_torch_record_stream: as spill_record_stream; a failure cannot be returned: it is
 *   kept in spill_last_error and the first one in the process is printed to stderr (not
 *   counted in free_errors, which counts frees).
 * - spill_torch_reset (PyTorch's empty_cache): spill_empty_cache on every running device.
 * - spill_torch_set_memory_fraction: the device's budget becomes `fraction` of its memory
 *   (as spill_set_budget; every failure printed to stderr and kept in spill_last_error, as
 *   are spill_torch_reset's and spill_torch_init's).
 * - spill_torch_init: PyTorch's announcement of the device count; runtimes are still created
 *   per device on first use. */
SPILL_API void* spill_torch_malloc(ssize_t size, int device, void* stream);
SPILL_API void spill_torch_free(void* ptr, ssize_t size, int device, void* stream);
SPILL_API void spill_torch_record_stream(void* ptr, void* stream);
SPILL_API void spill_torch_reset(void);
SPILL_API void spill_torch_set_memory_fraction(double fraction, int device);
SPILL_API void spill_torch_init(int device_count);

/* Called by spill_torch_malloc when it cannot return memory: the status, the size asked for,
 * the device and the message (also in spill_last_error). spill_torch_malloc holds no lock or
 * resource of spill's while it runs, so the handler may call spill (e.g. spill_empty_cache)
 * or throw a C++ exception through it. If it returns, spill_torch_malloc returns NULL.
 * It is not re-entered: a spill_torch_malloc that fails while the handler runs on the same
 * thread (a handler that retries) returns NULL at once, without calling it again (the reason
 * is in spill_last_error); other threads' failures still call it. */
typedef void (*spill_oom_handler)(spill_status status, size_t size, int device,
                                  const char* message, void* user_data);
/* Installs `handler` for the whole process; NULL restores the default, which prints the
 * message to stderr and aborts (a NULL PyTorch never checks would fault later, far from the
 * cause). */
SPILL_API spill_status spill_set_oom_handler(spill_oom_handler handler, void* user_data);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SPILL_SPILL_H */

// BlockPool: the free blocks of a set of segments, best fit by (size, address) in a
// Boost.Intrusive multiset, split on allocation (when the remainder is at least
// `min_split`) and coalesced with free address neighbours on free.
//
// Stream semantics: a block freed on stream S is reusable on S at once; on another stream T
// only once every stream that used it (S and any record_stream streams) has passed the free:
// an event is recorded on each such stream the first time another stream asks, and the block
// is taken only when those events have completed. No host synchronisation on this path.
//
// A pool may record those events at the free instead (events_at_free: the large pool), so that
// waiting for a freed block waits only for the work queued before its free: the host may be
// many ops ahead of the device when it releases cached memory.
//
// Stream marks: mark() (called off the hot path, on misses and releases) records an event on
// every stream that freed blocks since its last mark. Once a mark completes, every block freed
// on that stream before it has been passed there, so blocks freed long ago count as idle (or
// usable elsewhere) at once, without an event of their own that was only just recorded.
//
// Not thread-safe: the CachingAllocator's mutex guards it. Block objects are recycled, so the
// steady state allocates nothing on the heap.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "allocator/block.hpp"

namespace spill {

class BlockPool {
 public:
  // `split`: blocks may be split and coalesced (small pool, host pool); large blocks are not.
  // `events_at_free`: a free records its streams' events at once (large blocks: few frees, and
  // a wait for one then waits for the work before the free, not for all the work queued since);
  // otherwise they are recorded when first needed (later is always safe).
  BlockPool(Device* device, std::size_t min_split, bool split, bool events_at_free = false);
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // Adds a segment whose whole range becomes one free block (no stream constraint).
  Block* add_segment(Segment* segment);
  // Best-fit free block of at least `size` usable on `stream` (split if worthwhile), or null.
  // `max_waste`: do not take a block more than this many bytes larger (for unsplit pools).
  Block* take(std::size_t size, Stream stream, std::size_t max_waste = SIZE_MAX);
  // Takes `size` bytes from the start of a specific free block (a fresh segment's).
  Block* carve(Block* block, std::size_t size, Stream stream);
  // Returns an allocated block freed on `stream`; coalesces; returns the resulting free block.
  Block* give_back(Block* block, Stream stream);
  // The caller has synchronised `stream` and is about to destroy it: drop every constraint
  // that names it (they are satisfied).
  void forget_stream(Stream stream);
  // Whether no stream can still be using the free block (events recorded lazily, queried);
  // appends the events still pending to `pending`. Unmapping a block that is not idle would
  // pull memory from under queued work.
  bool idle(Block& b, std::vector<Event>* pending = nullptr);
  // Free blocks that only work queued on `stream` may still touch (freed there; every other
  // stream that used them has passed the free), oldest free first, until their sizes add up to
  // `bytes`: appends them to `blocks` and the events that complete once `stream` has passed
  // their frees to `events`. Waiting for those events makes the blocks idle.
  void busy_only_on(Stream stream, std::size_t bytes, std::vector<Block*>* blocks,
                    std::vector<Event>* events);
  // Whether a free block may be handed out on `stream` now (the rule above).
  bool usable_on(Block& b, Stream stream) { return ready_for(b, stream); }
  // Takes a free block out of the free set, constraints kept (restore puts it back).
  void withdraw(Block* b);
  void restore(Block* b);
  // A free block `b` takes the stream constraints of the withdrawn block `from` (its memory was
  // `from`'s): the same free stream, free time and other streams, their events not yet
  // recorded (`from` keeps its own).
  void inherit_constraints(Block* b, const Block& from);
  // Ends a withdrawn block whose memory moves elsewhere: returns events that complete once no
  // stream can still touch its old addresses (recorded now where missing; the caller owns them
  // until return_events) and recycles the Block.
  std::vector<Event> retire(Block* b);
  void return_events(const std::vector<Event>& events);
  // Records a mark on each stream with frees since its last one; collects completed marks.
  void mark();
  // Removes a wholly free segment's single block from the pool (before releasing the segment).
  void remove_free_segment(Segment* segment);
  // Segments whose memory is all free, ready to be released (in address order).
  std::vector<Segment*> free_segments() const;

  std::size_t free_bytes() const { return free_bytes_; }
  std::size_t largest_free() const;
  const FreeSet& free_set() const { return free_; }
  // Free blocks, largest first (for releasing cached memory).
  std::vector<Block*> free_blocks_largest_first();

  // Recycled Block objects (never freed before the pool).
  Block* new_block();
  void recycle(Block* b);

 private:
  struct StreamMark {
    Stream stream;
    std::uint64_t at;  // the pool's clock when it was recorded
    Event event;
  };
  bool ready_for(Block& b, Stream stream);
  // Whether a completed mark shows `stream` has passed everything freed up to `freed_at`.
  bool passed(Stream stream, std::uint64_t freed_at) const;
  void poll_marks();  // collects completed marks
  void forget_stream_in(Block& b, Stream stream);
  void note_free_on(Stream stream);
  Event get_event();
  // Records the use's event now if it has none yet (lazily: later is always safe). If the
  // device refuses, the use keeps no event and the error propagates.
  void record_if_needed(StreamUse& u);
  // The entry of `b`'s free stream among its uses (which holds that stream's event), added if
  // missing; null when every slot is taken.
  StreamUse* own_use(Block& b);
  void merge_uses(Block& into, Block& from);
  void drop_uses(Block& b);

  Device* device_;
  std::size_t min_split_;
  bool split_;
  bool events_at_free_;
  FreeSet free_;
  std::size_t free_bytes_ = 0;
  std::vector<Block*> spare_blocks_;
  std::vector<Block*> all_blocks_;
  std::vector<Event> spare_events_;
  std::uint64_t clock_ = 0;                               // ticks at every free
  std::vector<StreamMark> marks_;                         // recorded, not yet seen complete
  std::vector<std::pair<Stream, std::uint64_t>> passed_;  // per stream: latest completed mark
  std::vector<Stream> unmarked_;                          // streams with frees since a mark
  std::vector<Block*> withdrawn_;                         // free, out of the set (gathering)
};

}  // namespace spill

// A block of device (or pinned host) memory inside a segment, with the intrusive hooks that let
// it sit in a pool's free set (ordered by size, then address) or its allocated set (ordered by
// address) without any heap allocation. Neighbours in address order within a segment are
// linked, so freeing can coalesce. Stream-ordered reuse: a free block remembers the streams that
// used it; it is reusable on its free stream at once, elsewhere once events recorded on those
// streams have completed.
#pragma once

#include <boost/intrusive/list.hpp>
#include <boost/intrusive/set.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "device/device.hpp"

namespace spill {

namespace bi = boost::intrusive;

struct Segment;

struct StreamUse {
  Stream stream = nullptr;
  Event event = nullptr;  // recorded lazily, when another stream wants the block
};

struct Block {
  std::uintptr_t addr = 0;
  std::size_t size = 0;
  std::size_t requested = 0;   // bytes the caller asked for (allocated blocks)
  Segment* segment = nullptr;
  Block* prev = nullptr;       // address-order neighbours within the segment
  Block* next = nullptr;
  bool allocated = false;
  bool fresh = true;           // never handed out: no stream has touched it
  bool backed = true;          // large blocks: physical memory mapped (false: swapped out)
  bool moving = false;         // large blocks: unback/reback under way (device calls unlocked)
  bool named = false;          // allocated: has an entry in the allocator's names (a free drops it)
  Stream stream = nullptr;     // allocation stream, or the stream it was freed on
  std::uint64_t freed_at = 0;  // free blocks: the pool's clock at the (latest) free
  // Other streams (record_stream, at most kOtherStreams), then free-time events. One slot more
  // than other streams may fill, so that a free block always has room for its free stream's
  // own event: without it, that stream's queued work went unchecked and the block could be
  // unmapped under it.
  static constexpr std::size_t kOtherStreams = 4;
  std::array<StreamUse, kOtherStreams + 1> uses{};
  std::uint8_t n_uses = 0;

  bi::set_member_hook<bi::link_mode<bi::safe_link>> free_hook;   // in a pool's free set
  bi::set_member_hook<bi::link_mode<bi::safe_link>> addr_hook;   // in the allocated set
};

struct BySizeThenAddress {
  bool operator()(const Block& a, const Block& b) const {
    return a.size != b.size ? a.size < b.size : a.addr < b.addr;
  }
};
struct ByAddress {
  bool operator()(const Block& a, const Block& b) const { return a.addr < b.addr; }
};

using FreeSet =
    bi::multiset<Block, bi::member_hook<Block, decltype(Block::free_hook), &Block::free_hook>,
                 bi::compare<BySizeThenAddress>>;
using AddressSet =
    bi::set<Block, bi::member_hook<Block, decltype(Block::addr_hook), &Block::addr_hook>,
            bi::compare<ByAddress>>;

// A physical chunk mapped into a large block's range at `offset`. A large block is backed by
// one chunk when it is first mapped or mapped back after a swap, and by several when it was
// gathered from cached blocks' chunks (at most kMaxChunks).
struct Chunk {
  std::size_t offset = 0;
  std::size_t size = 0;
  PhysicalHandle handle = 0;
};
inline constexpr std::size_t kMaxChunks = 16;

// A contiguous range carved into blocks: a small-pool segment (plain device memory), a large
// block's own reservation, or a host-pool chunk.
struct Segment {
  std::uintptr_t addr = 0;
  std::size_t size = 0;
  Block* first = nullptr;
  bool large = false;
  std::vector<Chunk> chunks;  // large: the chunks tiling the range while it is backed
  std::uint32_t aliases = 0;  // large: retired ranges that still map some of its chunks
  bi::list_member_hook<bi::link_mode<bi::safe_link>> hook;  // in the owner's segment list
};

using SegmentList =
    bi::list<Segment, bi::member_hook<Segment, decltype(Segment::hook), &Segment::hook>>;

}  // namespace spill

// CachingAllocator's residency primitives for the swapper (allocator/residency.hpp): look-ups,
// and taking a large block's physical memory away and giving it back at the same addresses,
// with the budget's books kept (unback: mapped down, swapped out up; reback: the reverse,
// claimed through the ladder first).
#include "allocator/allocator_impl.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"

namespace spill {

using profiling::EventKind;

std::optional<BlockInfo> CachingAllocator::block_info(const void* ptr) const {
  std::lock_guard lock(impl_->mu);
  const Block* b = impl_->find_containing(key(ptr));
  if (b == nullptr) return std::nullopt;
  return BlockInfo{ptr_of(b->addr), b->size,          b->requested,
                   b->stream,       b->segment->large, b->backed};
}

std::optional<SwappableBlock> CachingAllocator::find_block(const void* ptr) {
  std::lock_guard lock(impl_->mu);
  const Block* b = impl_->find_containing(key(ptr));
  if (b == nullptr || !b->segment->large) return std::nullopt;
  return SwappableBlock{ptr_of(b->addr), b->size};
}

void CachingAllocator::unback(void* base, std::size_t size) {
  Impl& m = *impl_;
  std::vector<Chunk> chunks;
  {
    Lock lock(m.mu);
    Block* b = m.find_allocated(key(base));
    SPILL_EXPECTS(b && b->segment->large && b->backed && !b->moving && b->size == size,
                  "unback: " + format_address(base) + " (" + format_bytes(size) +
                      ") is not a mapped large block (or is being unbacked or rebacked)");
    // `moving` keeps a second unback, a reback and a free off the block while the device calls
    // run; its bytes stay claimed in the budget until they are really unmapped.
    b->moving = true;
    try {
      settle_aliases(lock, b->segment);  // no retired range may map its chunks any more
    } catch (...) {
      b->moving = false;
      throw;
    }
    chunks = b->segment->chunks;
  }
  std::size_t n_unmapped = 0;
  try {
    for (const Chunk& c : chunks) {
      dev_.unmap(ptr_of(key(base) + c.offset), c.size);
      ++n_unmapped;
    }
  } catch (...) {
    // Still backed: map back what was unmapped (the chunks kept their contents).
    try {
      for (std::size_t i = 0; i < n_unmapped; ++i)
        dev_.map(ptr_of(key(base) + chunks[i].offset), chunks[i].size, chunks[i].handle);
    } catch (...) {
      // The first error is the one to report.
    }
    std::lock_guard lock(m.mu);
    if (Block* b = m.find_allocated(key(base))) b->moving = false;
    throw;
  }
  // Unmapped: the block is swapped out now, whatever releasing the chunks says.
  std::exception_ptr error;
  for (const Chunk& c : chunks) {
    try {
      dev_.release_physical(c.handle, c.size);
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
  std::lock_guard lock(m.mu);
  Block* b = m.find_allocated(key(base));
  SPILL_ASSERT(b != nullptr, "a block was freed while it was being unbacked");
  b->moving = false;
  b->backed = false;
  b->segment->chunks.clear();
  m.budget.release(size);
  m.swapped_out += size;
  m.stats.reserved.sub(size);
  m.stats.segment_unmaps++;
  m.trace(EventKind::Unmap, key(base), size);
  if (error) std::rethrow_exception(error);
}

namespace {
// Validates a reback and marks the block as moving (cleared by map_back, or on failure).
void start_reback(Block* b, void* base, std::size_t size) {
  SPILL_EXPECTS(b && b->segment->large && !b->backed && !b->moving && b->size == size,
                "reback: " + format_address(base) + " (" + format_bytes(size) +
                    ") is not a swapped-out large block (or is being rebacked)");
  b->moving = true;
}
}  // namespace

void CachingAllocator::reback(void* base, std::size_t size) {
  Impl& m = *impl_;
  try {
    Lock lock(m.mu);
    start_reback(m.find_allocated(key(base)), base, size);
    try {
      make_room(lock, size, size);
    } catch (...) {
      m.find_allocated(key(base))->moving = false;  // make_room returns or throws locked
      throw;
    }
    map_back(lock, base, size);
  } catch (const OutOfMemory& e) {
    finish_oom_dump(e);  // the lock is released by now
    throw;
  }
}

bool CachingAllocator::try_reback(void* base, std::size_t size) {
  try {
    return try_reback_unchecked(base, size);
  } catch (const OutOfMemory& e) {
    finish_oom_dump(e);  // the lock is released by now
    throw;
  }
}

bool CachingAllocator::try_reback_unchecked(void* base, std::size_t size) {
  Impl& m = *impl_;
  Lock lock(m.mu);
  start_reback(m.find_allocated(key(base)), base, size);
  // Dead cached bytes may go (releasing them evicts nothing live); never wait, never evict.
  try {
    if (!m.budget.fits(size) && release_idle(lock, m.budget.shortfall(size), nullptr) > 0)
      m.stats.cache_releases++;
  } catch (...) {
    m.find_allocated(key(base))->moving = false;
    throw;
  }
  if (!m.budget.fits(size)) {
    m.find_allocated(key(base))->moving = false;
    return false;
  }
  m.budget.claim(size);
  map_back(lock, base, size);
  return true;
}

namespace {
// What reback_from_cache would take for a block of `size` bytes: free cached large blocks, the
// largest first, none larger than what is still missing (chunks are mapped whole), none whose
// chunks a retired range still maps, within kMaxChunks with a fresh chunk for the rest; and
// how many bytes they hold. They may still have queued work (the stream waits for it).
std::size_t takeover_blocks(BlockPool& pool, std::size_t size, std::vector<Block*>* out) {
  std::size_t have = 0, n_chunks = 0;
  for (Block* c : pool.free_blocks_largest_first()) {
    const std::size_t left = size - have;
    if (left == 0) break;
    if (c->size > left || c->segment->aliases > 0 || c->segment->size != c->size) continue;
    const std::size_t need = c->segment->chunks.size() + (c->size < left ? 1 : 0);
    if (n_chunks + need > kMaxChunks) continue;
    out->push_back(c);
    have += c->size;
    n_chunks += c->segment->chunks.size();
  }
  return have;
}
}  // namespace

bool CachingAllocator::cache_can_back(std::size_t size) {
  Lock lock(impl_->mu);
  if (!impl_->cache_takeover) return false;
  std::vector<Block*> taken;
  const std::size_t have = takeover_blocks(impl_->large, size, &taken);
  return have > 0 && impl_->budget.fits(size - have);
}

// The cached blocks' chunks are mapped at the swapped-out block's addresses while their own
// ranges still map them (a chunk may be mapped twice, as a gather does), with fresh memory for
// what they do not cover; their ranges are retired and unmapped once the work queued on them
// is done, and `stream` waits for that work before it touches the block. So the host never
// waits for the compute stream here: the release path (release_cache, then fresh memory) made
// it wait for the frees of every op it had issued, which drained the GPU's queue before each
// planned prefetch.
bool CachingAllocator::reback_from_cache(void* base, std::size_t size, Stream stream) {
  Impl& m = *impl_;
  Lock lock(m.mu);
  if (!m.cache_takeover) return false;
  std::vector<Block*> taken;
  const std::size_t have = takeover_blocks(m.large, size, &taken);
  const std::size_t fresh = size - have;
  if (have == 0 || !m.budget.fits(fresh)) return false;
  start_reback(m.find_allocated(key(base)), base, size);
  std::vector<Chunk> chunks;
  std::size_t offset = 0;
  for (Block* c : taken) {
    m.large.withdraw(c);
    for (const Chunk& ch : c->segment->chunks)
      chunks.push_back({offset + ch.offset, ch.size, ch.handle});
    offset += c->size;
  }
  if (fresh > 0) m.budget.claim(fresh);
  lock.unlock();
  try {
    map_chunks(dev_, key(base), chunks, have, fresh);
  } catch (...) {
    lock.lock();
    for (Block* c : taken) m.large.restore(c);
    if (fresh > 0) m.budget.release(fresh);
    m.find_allocated(key(base))->moving = false;
    throw;
  }
  lock.lock();
  Block* b = m.find_allocated(key(base));
  SPILL_ASSERT(b != nullptr, "a block was freed while it was being rebacked");
  b->segment->chunks = std::move(chunks);
  for (Block* c : taken) {
    retire_locked(c, {b->segment});
    // Enqueued under the lock: a range's events are recycled once it is reaped.
    for (Event e : m.retired.back().events) dev_.wait(stream, e);
  }
  b->moving = false;
  b->backed = true;
  m.swapped_out -= size;
  m.stats.reserved.add(size);
  m.stats.segment_maps++;
  m.stats.cache_takeovers++;
  m.trace(EventKind::Map, key(base), size);
  return true;
}

std::size_t CachingAllocator::room() {
  Lock lock(impl_->mu);
  return impl_->budget.room();
}

std::size_t CachingAllocator::mapped_bytes() {
  Lock lock(impl_->mu);
  return impl_->budget.claimed();
}

std::size_t CachingAllocator::cached_bytes() {
  Lock lock(impl_->mu);
  // What release_cache can return: free large blocks and wholly free small segments.
  std::size_t bytes = impl_->large.free_bytes();
  for (const Segment* s : impl_->small.free_segments()) bytes += s->size;
  return bytes;
}

std::size_t CachingAllocator::release_cache(std::size_t bytes) {
  Lock lock(impl_->mu);
  return release_cached(lock, bytes);
}

// Maps fresh physical memory for bytes already claimed in the budget.
void CachingAllocator::map_back(Lock& lock, void* base, std::size_t size) {
  Impl& m = *impl_;
  lock.unlock();
  PhysicalHandle h = 0;
  try {
    h = dev_.create_physical(size);
    dev_.map(base, size, h);
  } catch (...) {
    std::exception_ptr error = std::current_exception();
    try {
      if (h) dev_.release_physical(h, size);
    } catch (...) {
      // The first error is the one to report.
    }
    lock.lock();
    m.budget.release(size);
    m.find_allocated(key(base))->moving = false;
    try {
      std::rethrow_exception(error);
    } catch (const OutOfMemory& e) {
      throw_oom_locked(size, size, true, std::nullopt, e.what());
    }
  }
  lock.lock();
  Block* b = m.find_allocated(key(base));
  SPILL_ASSERT(b != nullptr, "a block was freed while it was being rebacked");
  b->moving = false;
  b->backed = true;
  b->segment->chunks = {Chunk{0, size, h}};
  m.swapped_out -= size;
  m.stats.reserved.add(size);
  m.stats.segment_maps++;
  m.trace(EventKind::Map, key(base), size);
}

}  // namespace spill

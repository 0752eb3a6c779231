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
  Lock lock(m.mu);
  start_reback(m.find_allocated(key(base)), base, size);
  try {
    make_room(lock, size, size);
  } catch (...) {
    m.find_allocated(key(base))->moving = false;  // make_room returns or throws locked
    throw;
  }
  map_back(lock, base, size);
}

bool CachingAllocator::try_reback(void* base, std::size_t size) {
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
    } catch (const OutOfMemory&) {
      throw_oom_locked(size, size, true);
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

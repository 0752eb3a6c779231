// CachingAllocator's block names: a side table by block address, filled only for blocks a
// caller named (Block::named says which), so the allocation and free paths of unnamed blocks
// neither look at it nor allocate. Snapshots and out-of-memory reports read it under the
// allocator's lock (allocator_report.cpp).
#include "allocator/allocator_impl.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"

namespace spill {

std::size_t CachingAllocator::set_block_name(const void* ptr, std::string_view name) {
  Impl& m = *impl_;
  // Interned before the lock (the recorder has its own): each distinct name once, for the
  // trace's tag table.
  profiling::TraceRecorder& rec = profiling::TraceRecorder::global();
  const std::uint32_t tag = !name.empty() && rec.enabled() ? rec.intern(name) : 0;
  std::lock_guard lock(m.mu);
  Block* b = m.find_allocated(key(ptr));
  if (b == nullptr) {
    if (const Block* in = m.find_containing(key(ptr))) {
      SPILL_EXPECTS(false, format_address(ptr) + " points inside the block at " +
                               format_address(ptr_of(in->addr)) + " (" + format_bytes(in->size) +
                               "); name the address the allocation returned");
    }
    SPILL_EXPECTS(false, format_address(ptr) +
                             " is not the start of a block allocated by spill (never allocated, "
                             "or freed)");
  }
  if (name.empty()) {
    if (b->named) m.names.erase(b->addr);
    b->named = false;
  } else {
    m.names[b->addr].assign(name);
    b->named = true;
  }
  rec.record(profiling::EventKind::Name, b->addr, b->size, sid(b->stream), m.ordinal, tag);
  return b->size;
}

std::string CachingAllocator::block_name(const void* ptr) {
  std::lock_guard lock(impl_->mu);
  const Block* b = impl_->find_allocated(key(ptr));
  if (b == nullptr || !b->named) return {};
  return impl_->names.at(b->addr);
}

}  // namespace spill

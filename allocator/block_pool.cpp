#include "allocator/block_pool.hpp"

#include <algorithm>

#include "core/errors.hpp"

namespace spill {

BlockPool::BlockPool(Device* device, std::size_t min_split, bool split, bool events_at_free)
    : device_(device), min_split_(min_split), split_(split), events_at_free_(events_at_free) {}

BlockPool::~BlockPool() {
  free_.clear();
  for (const StreamMark& m : marks_) spare_events_.push_back(m.event);
  for (Block* b : all_blocks_) {
    for (std::uint8_t i = 0; i < b->n_uses; ++i)
      if (b->uses[i].event && device_) device_->destroy_event(b->uses[i].event);
    delete b;
  }
  if (device_)
    for (Event e : spare_events_) device_->destroy_event(e);
}

Block* BlockPool::new_block() {
  Block* b;
  if (!spare_blocks_.empty()) {
    b = spare_blocks_.back();
    spare_blocks_.pop_back();
  } else {
    b = new Block();
    all_blocks_.push_back(b);
  }
  return b;
}

void BlockPool::recycle(Block* b) {
  SPILL_ASSERT(!b->free_hook.is_linked() && !b->addr_hook.is_linked(), "recycling a linked block");
  drop_uses(*b);
  b->addr = 0, b->size = 0, b->requested = 0, b->segment = nullptr, b->prev = nullptr;
  b->next = nullptr, b->allocated = false, b->backed = true, b->moving = false;
  b->named = false, b->fresh = true;
  b->stream = nullptr, b->n_uses = 0, b->freed_at = 0;
  spare_blocks_.push_back(b);
}

Block* BlockPool::add_segment(Segment* segment) {
  Block* b = new_block();
  b->addr = segment->addr;
  b->size = segment->size;
  b->segment = segment;
  segment->first = b;
  free_.insert(*b);
  free_bytes_ += b->size;
  return b;
}

void BlockPool::drop_uses(Block& b) {
  for (std::uint8_t i = 0; i < b.n_uses; ++i) {
    if (b.uses[i].event) spare_events_.push_back(b.uses[i].event);
    b.uses[i] = {};
  }
  b.n_uses = 0;
}

Event BlockPool::get_event() {
  if (spare_events_.empty()) return device_->create_event();
  Event e = spare_events_.back();
  spare_events_.pop_back();
  return e;
}

void BlockPool::record_if_needed(StreamUse& u) {
  if (u.event != nullptr) return;
  Event e = get_event();
  try {
    device_->record(e, u.stream);
  } catch (...) {
    spare_events_.push_back(e);  // (an event never recorded would query as complete)
    throw;
  }
  u.event = e;
}

StreamUse* BlockPool::own_use(Block& b) {
  for (std::uint8_t i = 0; i < b.n_uses; ++i)
    if (b.uses[i].stream == b.stream) return &b.uses[i];
  if (b.n_uses == b.uses.size()) return nullptr;
  b.uses[b.n_uses] = {b.stream, nullptr};
  return &b.uses[b.n_uses++];
}

// ---- stream marks

bool BlockPool::passed(Stream stream, std::uint64_t freed_at) const {
  for (const auto& [s, at] : passed_)
    if (s == stream) return at >= freed_at;
  return false;
}

void BlockPool::note_free_on(Stream stream) {
  for (Stream s : unmarked_)
    if (s == stream) return;
  unmarked_.push_back(stream);
}

void BlockPool::poll_marks() {
  std::erase_if(marks_, [&](const StreamMark& m) {
    if (!device_->query(m.event)) return false;
    auto it = std::find_if(passed_.begin(), passed_.end(),
                           [&](const auto& p) { return p.first == m.stream; });
    if (it == passed_.end()) {
      passed_.emplace_back(m.stream, m.at);
    } else {
      it->second = std::max(it->second, m.at);
    }
    spare_events_.push_back(m.event);
    return true;
  });
}

void BlockPool::mark() {
  poll_marks();
  bool recorded = false;
  for (Stream s : unmarked_) {
    // One mark in flight per stream is enough: the next mark() records a newer one.
    bool pending = false;
    for (const StreamMark& m : marks_) pending |= m.stream == s;
    if (pending) continue;
    Event e = get_event();
    device_->record(e, s);
    marks_.push_back({s, clock_, e});
    recorded = true;
  }
  std::erase_if(unmarked_, [&](Stream s) {
    for (const StreamMark& m : marks_)
      if (m.stream == s && m.at == clock_) return true;
    return false;
  });
  if (recorded) poll_marks();  // a mark on an idle stream may be complete already
}

bool BlockPool::ready_for(Block& b, Stream stream) {
  if (b.fresh) return true;
  // The free stream is the first "use"; only streams other than `stream` need an event.
  bool ready = true;
  bool polled = false;
  auto check = [&](StreamUse& u) {
    if (u.stream == stream || passed(u.stream, b.freed_at)) return true;
    if (!polled && !marks_.empty()) {
      polled = true;  // a mark may have completed since the last look: cheaper than an event
      poll_marks();
      if (passed(u.stream, b.freed_at)) return true;
    }
    record_if_needed(u);
    return device_->query(u.event);
  };
  // Keep the free stream's event in the use list so it is recorded once.
  if (b.stream != stream && own_use(b) == nullptr) {
    StreamUse self{b.stream, nullptr};
    ready = check(self);  // no room: record a throwaway event
    if (self.event) spare_events_.push_back(self.event);
  }
  for (std::uint8_t i = 0; i < b.n_uses; ++i) ready &= check(b.uses[i]);
  return ready;
}

Block* BlockPool::take(std::size_t size, Stream stream, std::size_t max_waste) {
  Block probe;
  probe.size = size;
  probe.addr = 0;
  for (auto it = free_.lower_bound(probe); it != free_.end(); ++it) {
    Block& b = *it;
    if (b.size - size > max_waste) return nullptr;
    if (ready_for(b, stream)) return carve(&b, size, stream);
  }
  return nullptr;
}

Block* BlockPool::carve(Block* bp, std::size_t size, Stream stream) {
  Block& b = *bp;
  SPILL_ASSERT(!b.allocated && b.size >= size, "carving a block that cannot hold the request");
  free_.erase(free_.iterator_to(b));
  free_bytes_ -= b.size;
  if (split_ && b.size - size >= min_split_) {
    Block* rest = new_block();
    rest->addr = b.addr + size;
    rest->size = b.size - size;
    rest->segment = b.segment;
    rest->prev = &b;
    rest->next = b.next;
    if (b.next) b.next->prev = rest;
    b.next = rest;
    b.size = size;
    // The remainder keeps the constraints (events stay valid for it).
    rest->stream = b.stream;
    rest->fresh = b.fresh;
    rest->freed_at = b.freed_at;
    rest->uses = b.uses;
    rest->n_uses = b.n_uses;
    b.n_uses = 0;
    b.uses = {};
    free_.insert(*rest);
    free_bytes_ += rest->size;
  } else {
    drop_uses(b);
  }
  b.allocated = true;
  b.fresh = false;
  b.stream = stream;
  return &b;
}

void BlockPool::merge_uses(Block& into, Block& from) {
  auto add = [&](StreamUse u) {
    for (std::uint8_t i = 0; i < into.n_uses; ++i) {
      if (into.uses[i].stream == u.stream) {
        // Which of two events was recorded later is unknown: drop both and record afresh
        // when asked (later is always safe).
        if (u.event) spare_events_.push_back(u.event);
        if (into.uses[i].event) spare_events_.push_back(into.uses[i].event);
        into.uses[i].event = nullptr;
        return;
      }
    }
    if (into.n_uses < Block::kOtherStreams) {  // the last slot stays for the free stream
      into.uses[into.n_uses++] = u;
      return;
    }
    // No room (five or more streams on adjacent blocks, rare): wait for this one now.
    if (u.event == nullptr) {
      u.event = device_->create_event();
      device_->record(u.event, u.stream);
    }
    device_->synchronize(u.event);
    spare_events_.push_back(u.event);
  };
  if (from.stream != into.stream) add({from.stream, nullptr});
  for (std::uint8_t i = 0; i < from.n_uses; ++i) add(from.uses[i]);
  from.n_uses = 0;
  from.uses = {};
}

Block* BlockPool::give_back(Block* b, Stream stream) {
  SPILL_ASSERT(b->allocated, "give_back of a free block");
  b->allocated = false;
  b->stream = stream;
  b->requested = 0;
  if (split_) {
    // Coalesce with free neighbours; the merged block carries every stream constraint.
    if (Block* p = b->prev; p && !p->allocated) {
      free_.erase(free_.iterator_to(*p));
      free_bytes_ -= p->size;
      if (!p->fresh) merge_uses(*b, *p);  // p's free stream becomes one of b's uses
      b->addr = p->addr;
      b->size += p->size;
      b->prev = p->prev;
      if (p->prev) p->prev->next = b;
      if (b->segment->first == p) b->segment->first = b;
      p->n_uses = 0;
      recycle(p);
    }
    if (Block* n = b->next; n && !n->allocated) {
      free_.erase(free_.iterator_to(*n));
      free_bytes_ -= n->size;
      if (!n->fresh) merge_uses(*b, *n);
      b->size += n->size;
      b->next = n->next;
      if (n->next) n->next->prev = b;
      n->n_uses = 0;
      recycle(n);
    }
  }
  b->freed_at = ++clock_;
  note_free_on(b->stream);
  for (std::uint8_t i = 0; i < b->n_uses; ++i) note_free_on(b->uses[i].stream);
  if (events_at_free_ && !split_) {  // (coalescing would drop them: merge_uses)
    own_use(*b);
    try {
      for (std::uint8_t i = 0; i < b->n_uses; ++i) record_if_needed(b->uses[i]);
    } catch (...) {
      // A failing device: the rest are recorded when first needed, where the error is
      // reported; a free never fails.
    }
  }
  free_.insert(*b);
  free_bytes_ += b->size;
  return b;
}

bool BlockPool::idle(Block& b, std::vector<Event>* pending) {
  if (b.fresh) return true;
  bool marked = passed(b.stream, b.freed_at);
  for (std::uint8_t i = 0; marked && i < b.n_uses; ++i) marked = passed(b.uses[i].stream, b.freed_at);
  if (marked) return true;
  bool all = true;
  auto check = [&](StreamUse& u) {
    record_if_needed(u);
    if (device_->query(u.event)) return;
    all = false;
    if (pending) pending->push_back(u.event);
  };
  // The free stream needs an entry of its own to hold its event.
  // (Block keeps a slot for it; were it ever full, a throwaway event checks it, as in ready_for:
  // a free stream left unchecked let the block be unmapped under that stream's queued work.)
  if (own_use(b) == nullptr) {
    StreamUse self{b.stream, nullptr};
    check(self);
    spare_events_.push_back(self.event);
  }
  for (std::uint8_t i = 0; i < b.n_uses; ++i) check(b.uses[i]);
  return all;
}

void BlockPool::busy_only_on(Stream stream, std::size_t bytes, std::vector<Block*>* blocks,
                             std::vector<Event>* events) {
  std::vector<Block*> found;
  for (Block& b : free_) {
    if (b.fresh || b.stream != stream || passed(stream, b.freed_at)) continue;
    bool others_done = true;
    for (std::uint8_t i = 0; others_done && i < b.n_uses; ++i) {
      StreamUse& u = b.uses[i];
      others_done = u.stream == stream || passed(u.stream, b.freed_at) ||
                    (u.event != nullptr && device_->query(u.event));
    }
    if (others_done) found.push_back(&b);
  }
  std::sort(found.begin(), found.end(),
            [](const Block* x, const Block* y) { return x->freed_at < y->freed_at; });
  std::size_t have = 0;
  for (Block* b : found) {
    if (have >= bytes) break;
    // The free stream's own entry holds the event (as idle() keeps it).
    StreamUse* self = own_use(*b);
    if (self == nullptr) continue;
    record_if_needed(*self);
    events->push_back(self->event);
    blocks->push_back(b);
    have += b->size;
  }
}

void BlockPool::withdraw(Block* b) {
  SPILL_ASSERT(!b->allocated && b->free_hook.is_linked(), "withdrawing a block that is not free");
  free_.erase(free_.iterator_to(*b));
  free_bytes_ -= b->size;
  withdrawn_.push_back(b);
}

void BlockPool::restore(Block* b) {
  SPILL_ASSERT(!b->allocated && !b->free_hook.is_linked(), "restoring a block that is not withdrawn");
  std::erase(withdrawn_, b);
  free_.insert(*b);
  free_bytes_ += b->size;
}

void BlockPool::inherit_constraints(Block* b, const Block& from) {
  SPILL_ASSERT(!b->allocated && b->n_uses == 0, "inheriting constraints into a used block");
  b->fresh = from.fresh;
  b->stream = from.stream;
  b->freed_at = from.freed_at;
  for (std::uint8_t i = 0; i < from.n_uses; ++i) b->uses[i] = {from.uses[i].stream, nullptr};
  b->n_uses = from.n_uses;
}

std::vector<Event> BlockPool::retire(Block* b) {
  SPILL_ASSERT(!b->allocated && !b->free_hook.is_linked(), "retiring a block that is not withdrawn");
  std::erase(withdrawn_, b);
  std::vector<Event> out;
  if (!b->fresh) {
    bool found = false;
    for (std::uint8_t i = 0; i < b->n_uses; ++i) {
      StreamUse& u = b->uses[i];
      found |= u.stream == b->stream;
      // A stream that passed the free can no longer touch the old range: no event needed.
      if (u.event != nullptr || !passed(u.stream, b->freed_at)) {
        record_if_needed(u);
        out.push_back(u.event);
      }
      u = {};
    }
    if (!found && !passed(b->stream, b->freed_at)) {
      StreamUse self{b->stream, nullptr};
      record_if_needed(self);
      out.push_back(self.event);
    }
  }
  b->n_uses = 0;
  recycle(b);
  return out;
}

void BlockPool::return_events(const std::vector<Event>& events) {
  spare_events_.insert(spare_events_.end(), events.begin(), events.end());
}

void BlockPool::forget_stream(Stream stream) {
  std::erase_if(marks_, [&](const StreamMark& m) {
    if (m.stream != stream) return false;
    spare_events_.push_back(m.event);
    return true;
  });
  std::erase_if(passed_, [&](const auto& p) { return p.first == stream; });
  std::erase(unmarked_, stream);
  for (Block& b : free_) forget_stream_in(b, stream);
  for (Block* b : withdrawn_) forget_stream_in(*b, stream);  // being gathered (lock dropped)
}

void BlockPool::forget_stream_in(Block& b, Stream stream) {
  std::uint8_t kept = 0;
  for (std::uint8_t i = 0; i < b.n_uses; ++i) {
    if (b.uses[i].stream == stream) {
      if (b.uses[i].event) spare_events_.push_back(b.uses[i].event);
    } else {
      b.uses[kept++] = b.uses[i];
    }
  }
  for (std::uint8_t i = kept; i < b.n_uses; ++i) b.uses[i] = {};
  b.n_uses = kept;
  if (b.stream == stream) {
    if (b.n_uses == 0) {
      b.fresh = true;  // nothing left to wait for
    } else {
      b.stream = b.uses[0].stream;  // another use stands in as the free stream
    }
  }
}

void BlockPool::remove_free_segment(Segment* segment) {
  Block* b = segment->first;
  SPILL_ASSERT(b && !b->allocated && b->next == nullptr && b->size == segment->size,
               "releasing a segment that is not wholly free");
  free_.erase(free_.iterator_to(*b));
  free_bytes_ -= b->size;
  recycle(b);
  segment->first = nullptr;
}

std::vector<Segment*> BlockPool::free_segments() const {
  std::vector<Segment*> out;
  for (const Block& b : free_) {
    if (b.prev == nullptr && b.next == nullptr && b.size == b.segment->size)
      out.push_back(b.segment);
  }
  std::sort(out.begin(), out.end(), [](Segment* a, Segment* b) { return a->addr < b->addr; });
  return out;
}

std::vector<Block*> BlockPool::free_blocks_largest_first() {
  std::vector<Block*> out;
  for (auto it = free_.rbegin(); it != free_.rend(); ++it) out.push_back(&*it);
  return out;
}

std::size_t BlockPool::largest_free() const {
  return free_.empty() ? 0 : free_.rbegin()->size;
}

}  // namespace spill

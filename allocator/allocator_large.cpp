// CachingAllocator: mapping new large blocks, gathering cached blocks' chunks into them, and
// the retired ranges gathering leaves behind.
//
// Why gather: a cached large block is never split (its chunks must stay whole so the swapper
// can unmap one block alone), so a request that no cached block fits would map fresh memory
// while cached memory sits idle. The old ranges cannot be unmapped while queued work may touch
// them, but a chunk may be mapped at two addresses: the new block maps the cached chunks at its
// own addresses at once, and the old ranges are unmapped once their work is done. Stream order
// keeps the two uses apart: the chunks are taken only from blocks the requesting stream may use
// now (the pool's reuse rule), so everything that touched the old range comes before anything
// that touches the new one.
#include <algorithm>
#include <chrono>
#include <exception>

#include "allocator/allocator_impl.hpp"
#include "core/errors.hpp"

namespace spill {

using profiling::EventKind;

Block* CachingAllocator::map_large(Lock& lock, std::size_t size, std::size_t requested,
                                   Stream stream) {
  Impl& m = *impl_;
  if (!m.retired.empty()) reap_retired(lock, false, kKeptViews);
  m.large.mark();
  const bool guard = m.peak_guard != PeakGuard::Off;
  auto over_peak = [&](std::size_t n) -> std::size_t {
    const std::size_t peak = static_cast<std::size_t>(m.stats.reserved.peak);
    return m.budget.claimed() + n > peak ? m.budget.claimed() + n - peak : 0;
  };
  std::vector<Block*> gathered;
  std::size_t have = 0;
  if (m.large.free_bytes() > 0 && ((guard && over_peak(size) > 0) || !m.budget.fits(size))) {
    // A cached block of several chunks holds the request's bytes in whole chunks: split it
    // rather than release it and map the same bytes again.
    if (Block* part = split_cached(lock, size, stream)) return part;
    have = gather_locked(size, stream, &gathered);
  }
  const std::size_t fresh = size - have;
  try {
    // The gathered blocks count as cached while the room for the rest is made (make_room
    // returns or throws locked, so the count changes under the lock).
    m.gathering.push_back(&gathered);
    struct Gathering {
      std::vector<const std::vector<Block*>*>& all;
      const std::vector<Block*>* mine;
      ~Gathering() { all.erase(std::find(all.begin(), all.end(), mine)); }
    } counted{m.gathering, &gathered};
    if (fresh > 0) {
      // Mapping more would raise the reserved peak while cached blocks that nothing fitted sit
      // there: release those first. Below the peak, the cache is kept (no churn in steady state).
      if (guard && m.large.free_bytes() > 0 && over_peak(fresh) > 0)
        hold_peak(lock, over_peak(fresh), stream);
      make_room(lock, fresh, requested);
    }
  } catch (...) {
    for (Block* g : gathered) m.large.restore(g);  // make_room returns or throws locked
    throw;
  }

  // The new block's chunks: the gathered blocks' in order, then the fresh one.
  std::vector<Chunk> chunks;
  std::size_t offset = 0;
  for (const Block* g : gathered) {
    for (const Chunk& c : g->segment->chunks) chunks.push_back({offset + c.offset, c.size, c.handle});
    offset += g->size;
  }
  // Gathered whole: a retired range may still map exactly these chunks (the same blocks were
  // gathered before and split back since, a pattern that repeats every step).
  std::uintptr_t view = 0;
  if (fresh == 0) take_view_locked(&chunks, &view);
  const std::uintptr_t spare = view == 0 ? m.take_spare_range(size) : 0;
  lock.unlock();
  void* va = nullptr;
  try {
    if (view != 0) {
      va = ptr_of(view);
    } else {
      va = spare != 0 ? ptr_of(spare) : dev_.reserve(size);
      map_chunks(dev_, key(va), chunks, have, fresh);
    }
  } catch (...) {
    std::exception_ptr error = std::current_exception();
    try {
      if (va && view == 0) dev_.unreserve(va, size);  // (a view is a retired range: kept)
    } catch (...) {
      // The first error is the one to report.
    }
    lock.lock();
    for (Block* g : gathered) m.large.restore(g);
    if (fresh > 0) m.budget.release(fresh);
    try {
      std::rethrow_exception(error);
    } catch (const OutOfMemory& e) {
      throw_oom_locked(requested, size, true, std::nullopt, e.what());
    }
  }
  lock.lock();
  Segment* seg = m.new_segment(key(va), size, true);
  seg->chunks = std::move(chunks);
  for (Block* g : gathered) retire_locked(g, {seg});
  if (!gathered.empty()) m.stats.gathers++;
  note_mapped_locked(seg);
  return m.large.carve(m.large.add_segment(seg), size, stream);
}

void map_chunks(Device& dev, std::uintptr_t va, std::vector<Chunk>& chunks, std::size_t have,
                std::size_t fresh) {
  PhysicalHandle fresh_handle = 0;
  std::size_t n_mapped = 0;
  try {
    if (fresh > 0) {
      fresh_handle = dev.create_physical(fresh);
      chunks.push_back({have, fresh, fresh_handle});
    }
    for (const Chunk& c : chunks) {
      dev.map(ptr_of(va + c.offset), c.size, c.handle);
      ++n_mapped;
    }
  } catch (...) {
    try {
      for (std::size_t i = 0; i < n_mapped; ++i)
        dev.unmap(ptr_of(va + chunks[i].offset), chunks[i].size);
      if (fresh_handle) dev.release_physical(fresh_handle, fresh);
    } catch (...) {
      // The first error is the one to report.
    }
    if (fresh_handle) chunks.pop_back();
    throw;
  }
}

void CachingAllocator::hold_peak(Lock& lock, std::size_t over, Stream stream) {
  Impl& m = *impl_;
  std::size_t released = release_idle(lock, over, nullptr);
  if (released < over && m.peak_guard == PeakGuard::Wait) {
    // Cached blocks the requesting stream itself still has queued work on: wait for that work
    // (oldest frees first, so the shortest wait), never for another stream's.
    std::vector<Block*> blocks;
    std::vector<Event> events;
    m.large.busy_only_on(stream, over - released, &blocks, &events);
    for (const Block* b : blocks)
      if (b->segment->aliases > 0) m.retired_events(b->segment, &events);
    if (!events.empty()) {
      wait_unlocked(lock, events);
      released += release_idle(lock, over - released, nullptr);
    }
  }
  if (released > 0) m.stats.cache_releases++;
}

Block* CachingAllocator::split_cached(Lock& lock, std::size_t size, Stream stream) {
  Impl& m = *impl_;
  // The smallest cached block that splits: usable on `stream`, larger than a cache hit may be,
  // with chunks that add up to the request or up to a quarter more (largest chunks first).
  Block* g = nullptr;
  std::vector<Chunk> part, rest;
  Block probe;
  probe.size = largest_reused_block(size) + 1;
  for (auto it = m.large.free_set().lower_bound(probe); it != m.large.free_set().end(); ++it) {
    Block& b = const_cast<Block&>(*it);
    if (b.segment->chunks.size() < 2) continue;
    std::vector<Chunk> chunks = b.segment->chunks;
    std::sort(chunks.begin(), chunks.end(),
              [](const Chunk& x, const Chunk& y) { return x.size > y.size; });
    std::size_t have = 0;
    part.clear();
    rest.clear();
    for (const Chunk& c : chunks) {
      if (have < size && have + c.size <= largest_reused_block(size)) {
        part.push_back(c);
        have += c.size;
      } else {
        rest.push_back(c);
      }
    }
    if (have < size || rest.empty() || !m.large.usable_on(b, stream)) continue;
    g = &b;
    break;
  }
  if (g == nullptr) return nullptr;
  // Each part's chunks at offsets of its own range, in the old range's order.
  auto lay_out = [](std::vector<Chunk>* cs) {
    std::sort(cs->begin(), cs->end(), [](const Chunk& x, const Chunk& y) { return x.offset < y.offset; });
    std::size_t offset = 0;
    for (Chunk& c : *cs) {
      c.offset = offset;
      offset += c.size;
    }
    return offset;
  };
  const std::size_t part_size = lay_out(&part);
  const std::size_t rest_size = lay_out(&rest);
  m.large.withdraw(g);
  // Either part may have a retired range that still maps exactly its chunks (the blocks this
  // one was gathered from, when the same gather and split repeat): it is taken as it is.
  std::uintptr_t views[2] = {0, 0};
  take_view_locked(&part, &views[0]);
  take_view_locked(&rest, &views[1]);
  std::uintptr_t spares[2] = {0, 0};
  for (int i = 0; i < 2; ++i)
    if (views[i] == 0) spares[i] = m.take_spare_range(i == 0 ? part_size : rest_size);
  lock.unlock();
  void* va[2] = {nullptr, nullptr};
  const std::vector<Chunk>* layouts[2] = {&part, &rest};
  const std::size_t sizes[2] = {part_size, rest_size};
  std::size_t n_mapped[2] = {0, 0};
  try {
    for (int i = 0; i < 2; ++i) {
      if (views[i] != 0) {
        va[i] = ptr_of(views[i]);
        n_mapped[i] = layouts[i]->size();
        continue;
      }
      va[i] = spares[i] != 0 ? ptr_of(spares[i]) : dev_.reserve(sizes[i]);
      for (const Chunk& c : *layouts[i]) {
        dev_.map(ptr_of(key(va[i]) + c.offset), c.size, c.handle);
        ++n_mapped[i];
      }
    }
  } catch (...) {
    std::exception_ptr error = std::current_exception();
    try {
      for (int i = 0; i < 2; ++i) {
        for (std::size_t k = 0; k < n_mapped[i]; ++k)
          dev_.unmap(ptr_of(key(va[i]) + (*layouts[i])[k].offset), (*layouts[i])[k].size);
        if (va[i]) dev_.unreserve(va[i], sizes[i]);
      }
    } catch (...) {
      // The first error is the one to report.
    }
    lock.lock();
    m.large.restore(g);
    std::rethrow_exception(error);
  }
  lock.lock();
  Segment* part_seg = m.new_segment(key(va[0]), part_size, true);
  Segment* rest_seg = m.new_segment(key(va[1]), rest_size, true);
  part_seg->chunks = std::move(part);
  rest_seg->chunks = std::move(rest);
  // The rest stays cached under the old block's stream constraints (its memory may still be
  // touched by work queued on the old range); their events are recorded afresh when asked.
  Block* cached = m.large.add_segment(rest_seg);
  m.large.inherit_constraints(cached, *g);
  retire_locked(g, {part_seg, rest_seg});
  m.stats.splits++;
  note_mapped_locked(part_seg);
  note_mapped_locked(rest_seg);
  return m.large.carve(m.large.add_segment(part_seg), part_size, stream);
}

std::size_t CachingAllocator::gather_locked(std::size_t size, Stream stream,
                                            std::vector<Block*>* out) {
  Impl& m = *impl_;
  std::size_t have = 0, n_chunks = 0;
  for (Block* b : m.large.free_blocks_largest_first()) {
    const std::size_t left = size - have;
    if (left == 0) break;
    if (b->size > left) continue;
    // Room for the block's chunks, and for a fresh chunk unless it completes the request.
    const std::size_t need = b->segment->chunks.size() + (b->size < left ? 1 : 0);
    if (n_chunks + need > kMaxChunks) continue;
    if (!m.large.usable_on(*b, stream)) continue;
    m.large.withdraw(b);
    out->push_back(b);
    have += b->size;
    n_chunks += b->segment->chunks.size();
  }
  return have;
}

void CachingAllocator::retire_locked(Block* g, const std::vector<Segment*>& owners) {
  Impl& m = *impl_;
  Segment* old = g->segment;
  RetiredRange r;
  r.addr = old->addr;
  r.size = old->size;
  r.chunks = std::move(old->chunks);
  r.events = m.large.retire(g);
  // A range's owners are the segments that hold one of its chunks now, each listed once (a
  // retired range may be kept for a while, through many gathers and splits of its chunks).
  auto adopt = [&](RetiredRange& range) {
    for (Segment* o : owners) {
      if (std::find(range.owners.begin(), range.owners.end(), o) != range.owners.end()) continue;
      const bool holds = std::any_of(range.chunks.begin(), range.chunks.end(), [&](const Chunk& c) {
        return std::any_of(o->chunks.begin(), o->chunks.end(),
                           [&](const Chunk& d) { return d.handle == c.handle; });
      });
      if (!holds) continue;
      range.owners.push_back(o);
      o->aliases++;
    }
  };
  // Ranges retired earlier that map these chunks now alias the new owners.
  for (RetiredRange& earlier : m.retired) {
    auto at = std::find(earlier.owners.begin(), earlier.owners.end(), old);
    if (at == earlier.owners.end()) continue;
    earlier.owners.erase(at);
    adopt(earlier);
  }
  adopt(r);
  m.stats.reserved.sub(r.size);
  m.stats.cached.sub(r.size);
  m.stats.segment_unmaps++;
  m.trace(EventKind::Unmap, r.addr, r.size);
  old->first = nullptr;
  m.delete_segment(old);
  m.retired.push_back(std::move(r));
}

// Whether nothing queued can touch `r` any more; its events go back to the pool once so.
static bool settled(Device& dev, BlockPool& pool, RetiredRange& r) {
  if (!std::all_of(r.events.begin(), r.events.end(), [&](Event e) { return dev.query(e); }))
    return false;
  pool.return_events(r.events);
  r.events.clear();
  return true;
}

bool CachingAllocator::take_view_locked(std::vector<Chunk>* chunks, std::uintptr_t* addr) {
  Impl& m = *impl_;
  auto handles = [](const std::vector<Chunk>& cs) {
    std::vector<PhysicalHandle> h;
    h.reserve(cs.size());
    for (const Chunk& c : cs) h.push_back(c.handle);
    std::sort(h.begin(), h.end());
    return h;
  };
  const std::vector<PhysicalHandle> want = handles(*chunks);
  for (auto it = m.retired.rbegin(); it != m.retired.rend(); ++it) {
    if (it->reaping || it->chunks.size() != want.size() || handles(it->chunks) != want) continue;
    if (!settled(dev_, m.large, *it)) continue;
    for (Segment* o : it->owners) o->aliases--;
    *addr = it->addr;
    *chunks = std::move(it->chunks);
    m.retired.erase(std::next(it).base());
    m.stats.views_reused++;
    return true;
  }
  return false;
}

std::size_t CachingAllocator::reap_retired(Lock& lock, bool wait, std::size_t keep) {
  Impl& m = *impl_;
  if (wait) {
    std::vector<Event> pending;
    m.retired_events(nullptr, &pending);
    wait_unlocked(lock, pending);
  }
  std::vector<std::list<RetiredRange>::iterator> done;
  std::size_t kept = 0;
  for (auto it = m.retired.rbegin(); it != m.retired.rend(); ++it) {
    if (it->reaping || !settled(dev_, m.large, *it)) continue;
    if (kept < keep) {
      ++kept;
      continue;
    }
    it->reaping = true;  // its owner keeps the alias count until the range is unmapped
    done.push_back(std::next(it).base());
  }
  if (done.empty()) return 0;
  lock.unlock();
  std::exception_ptr error;
  std::vector<bool> unmapped(done.size(), false);
  for (std::size_t i = 0; i < done.size(); ++i) {
    try {
      for (const Chunk& c : done[i]->chunks) dev_.unmap(ptr_of(done[i]->addr + c.offset), c.size);
      unmapped[i] = true;
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
  lock.lock();
  SpareRanges drop;
  for (std::size_t i = 0; i < done.size(); ++i) {
    auto it = done[i];
    if (unmapped[i]) m.keep_spare_range(it->addr, it->size, &drop);
    for (Segment* o : it->owners) o->aliases--;
    m.retired.erase(it);
  }
  unreserve_unlocked(lock, drop, &error);
  m.released.notify_all();
  if (error) std::rethrow_exception(error);
  return done.size();
}

void CachingAllocator::settle_aliases(Lock& lock, Segment* seg) {
  Impl& m = *impl_;
  while (seg->aliases > 0) {
    std::vector<Event> pending;
    m.retired_events(seg, &pending);
    wait_unlocked(lock, pending);
    if (reap_retired(lock, false) == 0 && seg->aliases > 0) {
      bool theirs = true;  // every alias left is being unmapped by another thread
      for (const RetiredRange& r : m.retired) theirs &= !r.maps_chunks_of(seg) || r.reaping;
      if (theirs) m.released.wait(lock);
    }
  }
}

void CachingAllocator::wait_unlocked(Lock& lock, const std::vector<Event>& events) {
  if (events.empty()) return;
  lock.unlock();
  const auto start = std::chrono::steady_clock::now();
  for (Event e : events) dev_.synchronize(e);
  const std::chrono::duration<double> waited = std::chrono::steady_clock::now() - start;
  lock.lock();
  impl_->stats.host_waits++;
  impl_->stats.host_wait_s += waited.count();
}

}  // namespace spill

// CachingAllocator's introspection: stats, memory snapshots, the invariant check the tests run
// after every step, and the out-of-memory report (with an optional dump).
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>

#include "allocator/allocator_impl.hpp"
#include "allocator/host_pool.hpp"
#include "allocator/oom_report.hpp"
#include "core/checked.hpp"
#include "core/errors.hpp"
#include "core/output_file.hpp"
#include "core/units.hpp"
#include "profiling/chrome_trace.hpp"
#include "profiling/snapshot.hpp"
#include "profiling/nvtx.hpp"

namespace spill {

using profiling::EventKind;

namespace {

// An OOM dump gathered under the allocator's lock and written by the public call that raised
// the OOM once the lock is released (finish_oom_dump): with a full trace the files take about
// a second, which every allocating thread would otherwise wait out. Per thread: the OOM
// unwinds on the thread that gathered it.
struct PendingOomDump {
  std::string dir, prefix;  // prefix: <dir>/spill_oom_<pid>_, the dump's number follows
  profiling::MemoryState state;
  std::vector<profiling::TraceEvent> events;
};
thread_local std::optional<PendingOomDump> t_pending_dump;
std::atomic<unsigned> next_dump_number{0};  // process-wide: this process's names never repeat

}  // namespace

AllocatorStats CachingAllocator::stats() const {
  AllocatorStats s;
  HostPool* pool;
  {
    std::lock_guard lock(impl_->mu);
    s = impl_->stats;
    s.swapped_out_bytes = impl_->swapped_out;
    pool = impl_->host_pool;
  }
  if (pool) s.host_pinned = pool->stat();  // the pool's own lock, never inside ours
  return s;
}

void CachingAllocator::reset_peak() {
  HostPool* pool;
  {
    std::lock_guard lock(impl_->mu);
    AllocatorStats& s = impl_->stats;
    for (Stat* st : {&s.allocated, &s.requested, &s.reserved, &s.cached, &s.host_pinned})
      st->reset_peak();
    pool = impl_->host_pool;
  }
  if (pool) pool->reset_peak();
}

std::uint64_t CachingAllocator::take_allocated_window_peak() {
  std::lock_guard lock(impl_->mu);
  const std::int64_t p = impl_->stats.allocated.take_window_peak();
  return p < 0 ? 0 : static_cast<std::uint64_t>(p);
}

// ---- snapshots

profiling::MemoryState CachingAllocator::snapshot() const {
  std::lock_guard lock(impl_->mu);
  return snapshot_locked();
}

profiling::MemoryState CachingAllocator::snapshot_locked() const {
  using S = profiling::SnapshotBlock::State;
  profiling::MemoryState st;
  st.device = impl_->ordinal;
  for (const Segment& seg : impl_->segments) {
    profiling::SnapshotSegment out{seg.addr, seg.size, 0, seg.large, {}};
    for (const Block* b = seg.first; b; b = b->next) {
      out.stream = sid(b->stream);
      out.blocks.push_back({b->addr, b->size, b->requested, b->allocated ? S::Allocated : S::Free,
                            0, seg.large && !b->backed,
                            b->named ? impl_->names.at(b->addr) : std::string()});
    }
    st.segments.push_back(std::move(out));
  }
  std::sort(st.segments.begin(), st.segments.end(),
            [](auto& a, auto& b) { return a.address < b.address; });
  return st;
}

// ---- invariants

namespace {
[[noreturn]] void violated(const std::string& what, std::uintptr_t at = 0) {
  throw Error("allocator invariant: " + what +
              (at ? " (at " + format_address(reinterpret_cast<void*>(at)) + ")" : ""));
}
}  // namespace

void CachingAllocator::check_invariants() const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  std::size_t mapped = 0, allocated = 0, cached = 0, swapped = 0;
  std::size_t n_allocated = 0, n_named = 0, n_free[2] = {0, 0}, free_bytes[2] = {0, 0};
  std::vector<const Segment*> segs;
  for (const Segment& s : m.segments) segs.push_back(&s);
  std::sort(segs.begin(), segs.end(), [](auto* a, auto* b) { return a->addr < b->addr; });
  std::uintptr_t prev_end = 0;
  for (const Segment* s : segs) {
    if (s->addr < prev_end) violated("segments overlap", s->addr);
    prev_end = s->addr + s->size;
    if (s->large && (s->addr % m.granularity || s->size % m.granularity))
      violated("a large block is not granule aligned", s->addr);
    if (s->large && (s->first == nullptr || s->first->next != nullptr))
      violated("a large segment does not hold exactly one block", s->addr);
    if (!s->large && s->size != kSmallSegment) violated("a small segment of odd size", s->addr);
    if (!s->large && (m.small_mapped ? s->chunks.size() != 1 || s->chunks[0].offset != 0 ||
                                           s->chunks[0].size != kSmallSegment
                                     : !s->chunks.empty()))
      violated("a small segment is not mapped as the pool maps them (one whole chunk where "
               "the granularity divides it, else none)", s->addr);
    if (s->large) {
      const bool backed = s->first && s->first->backed;
      std::size_t off = 0;
      for (const Chunk& c : s->chunks) {
        if (c.offset != off || c.size == 0 || c.size % m.granularity)
          violated("a large block's chunks do not tile it", s->addr);
        off += c.size;
      }
      if (backed ? off != s->size : !s->chunks.empty())
        violated(backed ? "a backed large block is not covered by its chunks"
                        : "a swapped-out large block still holds chunks",
                 s->addr);
      if (s->chunks.size() > kMaxChunks) violated("a large block has too many chunks", s->addr);
      std::uint32_t aliases = 0;
      for (const RetiredRange& r : m.retired)
        aliases += static_cast<std::uint32_t>(std::count(r.owners.begin(), r.owners.end(), s));
      if (aliases != s->aliases) violated("a block's alias count differs from a recount", s->addr);
    }
    std::uintptr_t at = s->addr;
    for (const Block* b = s->first; b; b = b->next) {
      if (b->addr != at) violated("a gap or an overlap between blocks", at);
      if (b->segment != s) violated("a block points at another segment", b->addr);
      if (b->next && b->next->prev != b) violated("broken neighbour links", b->addr);
      if (!s->large && b->size % kSmallRound) violated("a small block of odd size", b->addr);
      if (!b->allocated && b->next && !b->next->allocated)
        violated("two free neighbours were not coalesced", b->addr);
      if (b->allocated != b->addr_hook.is_linked() || b->allocated == b->free_hook.is_linked())
        violated("a block is in the wrong set", b->addr);
      if (!b->backed && !b->allocated) violated("a free block without memory", b->addr);
      if (b->named && (!b->allocated || !m.names.count(b->addr)))
        violated("a named block without its name, or a free block named", b->addr);
      n_named += b->named;
      if (b->moving) violated("an unback or reback did not finish", b->addr);
      if (b->allocated) {
        allocated += b->size;
        ++n_allocated;
        if (b->requested == 0 || b->requested > b->size)
          violated("requested bytes do not fit the block", b->addr);
      } else {
        cached += b->size;
        ++n_free[s->large];
        free_bytes[s->large] += b->size;
      }
      (b->backed ? mapped : swapped) += b->size;
      at += b->size;
    }
    if (at != s->addr + s->size) violated("blocks do not cover their segment", s->addr);
  }
  if (n_allocated != m.allocated.size()) violated("the allocated set holds stray blocks");
  if (n_named != m.names.size()) violated("the names table holds names of blocks that are gone");
  for (const RetiredRange& r : m.retired) {
    for (const Segment* o : r.owners)
      if (std::find(segs.begin(), segs.end(), o) == segs.end())
        violated("a retired range aliases a segment that is gone", r.addr);
    if (r.owners.empty()) violated("a retired range without an owner", r.addr);
    if (r.reaping) violated("a retired range's unmapping did not finish", r.addr);
  }
  const BlockPool* pools[2] = {&m.small, &m.large};
  for (int large = 0; large < 2; ++large) {
    if (n_free[large] != pools[large]->free_set().size() ||
        free_bytes[large] != pools[large]->free_bytes())
      violated(large ? "the large pool's free set differs from its blocks"
                     : "the small pool's free set differs from its blocks");
  }
  if (m.releasing == 0 && mapped != m.budget.claimed())
    violated("mapped bytes differ from the budget's count");
  if (m.budget.claimed() > m.budget.limit()) violated("over the budget");
  if (swapped != m.swapped_out) violated("swapped-out bytes differ from a recount");
  if (static_cast<std::int64_t>(allocated) != m.stats.allocated.current ||
      static_cast<std::int64_t>(cached) != m.stats.cached.current ||
      static_cast<std::int64_t>(mapped) != m.stats.reserved.current)
    violated("stats differ from a recount");
}

// ---- out of memory

void CachingAllocator::throw_oom_locked(
    std::size_t requested, std::size_t needed, bool device_full,
    std::optional<LargeBlockObserver::Unevictable> unevictable, std::string device_error) {
  Impl& m = *impl_;
  profiling::NvtxRange range("spill out of memory", profiling::kNvtxOom);
  m.stats.ooms++;
  const std::size_t free_under_budget =
      m.budget.limit() > m.budget.claimed() ? m.budget.limit() - m.budget.claimed() : 0;
  // A request past 2^63 - 1 bytes (a wrapped negative size) is recorded at that bound, where
  // every size in spill stops: recorded whole, it made every later trace export fail.
  m.trace(EventKind::Oom, free_under_budget, std::min<std::size_t>(requested, kMaxBytes));
  OomFacts f;
  f.requested = requested;
  f.needed = needed;
  f.budget = m.budget.limit();
  f.device_total = dev_.info().total_bytes;
  f.simulated = dev_.info().simulated;
  f.allocated = static_cast<std::size_t>(m.stats.allocated.current) - m.swapped_out;
  f.cached = static_cast<std::size_t>(m.stats.cached.current);
  f.swapped_out = m.swapped_out;
  // Lock order allocator -> host pool: the pool never calls back.
  if (m.host_pool) {
    f.host_pinned = m.host_pool->reserved();
    f.host_in_use = m.host_pool->in_use();
    f.host_cap = m.host_pool->cap();
  } else if (m.host_in_use) {
    f.host_pinned = f.host_in_use = m.host_in_use();
  }
  // Only the pool that serves the request counts as its free memory: a small-pool segment's
  // free bytes never serve a large request, nor a large block's a small one.
  std::vector<const Block*> named;  // resident and named: the largest are listed
  for (const Block& b : m.allocated) {
    if (!b.segment->large) f.small_allocated += b.size;
    if (b.named && b.backed) named.push_back(&b), f.named_bytes += b.size;
    if (!b.named && b.backed) ++f.unnamed_count, f.unnamed_bytes += b.size;
  }
  f.named_count = named.size();
  const std::size_t listed = std::min(named.size(), OomFacts::kNamedListed);
  std::partial_sort(named.begin(), named.begin() + listed, named.end(),
                    [](const Block* a, const Block* b) {
                      return a->size != b->size ? a->size > b->size : a->addr < b->addr;
                    });
  for (std::size_t i = 0; i < listed; ++i)
    f.named.push_back({m.names.at(named[i]->addr), named[i]->size});
  f.small_request = requested <= m.small_limit;
  f.small_limit = m.small_limit;
  const BlockPool& own = f.small_request ? m.small : m.large;
  const BlockPool& other = f.small_request ? m.large : m.small;
  f.largest_free = own.largest_free();
  f.free_total = own.free_bytes();
  f.other_free = other.free_bytes();
  for (const std::vector<Block*>* taken : m.gathering) {  // being gathered: still cached
    for (const Block* b : *taken) {
      (f.small_request ? f.other_free : f.free_total) += b->size;
      if (!f.small_request) f.largest_free = std::max(f.largest_free, b->size);
    }
  }
  f.device_full = device_full;
  f.device_error = without_source_location(device_error);
  if (unevictable) {
    f.pinned = unevictable->pinned;
    f.unswappable = unevictable->unswappable;
    f.host_refusal = without_source_location(unevictable->host_refusal);
  }
  // The dump is written after the lock is released (finish_oom_dump); f.dump_note says only
  // when none is written this time.
  t_pending_dump.reset();
  if (!m.oom_dump.empty()) f.dump_note = gather_oom_dump_locked();
  throw OutOfMemory(oom_message(f));
}

std::string CachingAllocator::gather_oom_dump_locked() {
  const std::string& dir = impl_->oom_dump;
  if (impl_->oom_dumps >= AllocatorOptions::kMaxOomDumps)
    return " No OOM dump this time: the first " + std::to_string(AllocatorOptions::kMaxOomDumps) +
           " out-of-memory failures were dumped to " + dir + " (later ones are only counted).";
  ++impl_->oom_dumps;
  std::string prefix = dir + "/spill_oom_" + std::to_string(::getpid()) + "_";
  t_pending_dump = PendingOomDump{dir, std::move(prefix), snapshot_locked(),
                                  profiling::TraceRecorder::global().peek()};
  return {};
}

void CachingAllocator::finish_oom_dump(const OutOfMemory& oom) {
  if (!t_pending_dump) return;
  const PendingOomDump dump = std::move(*t_pending_dump);
  t_pending_dump.reset();
  // A failure to write must not hide the OOM itself: it is reported in the message instead.
  std::string note;
  try {
    std::filesystem::create_directories(dump.dir);
    // The texts first: a dump that cannot be built leaves no file.
    const std::string snapshot = profiling::to_memory_viz(dump.state, dump.events).dump() + "\n";
    const std::string trace = profiling::chrome_trace_text(dump.events);
    // Never over an earlier dump (PIDs repeat: a container's first process is always 1) nor
    // through a link planted at the name: the next number whose two names are both free.
    std::string stem;
    for (int tries = 0;; ++tries) {
      SPILL_EXPECTS(tries < 100000, "no free name for an OOM dump in " + dump.dir);
      stem = dump.prefix + std::to_string(next_dump_number.fetch_add(1));
      if (!write_new_file(stem + "_snapshot.json", snapshot, "OOM dump")) continue;
      bool written = false;
      try {
        written = write_new_file(stem + "_trace.json", trace, "OOM dump");
      } catch (...) {
        ::unlink((stem + "_snapshot.json").c_str());
        throw;
      }
      if (written) break;
      ::unlink((stem + "_snapshot.json").c_str());
    }
    note = " An OOM dump was written to " + stem + "_snapshot.json and " + stem +
           "_trace.json.";
  } catch (const std::exception& e) {
    note = " (writing the OOM dump to " + dump.dir + " failed: " + e.what() + ")";
  }
  throw OutOfMemory(oom.what() + note);
}

}  // namespace spill

#include "train/small_pool.hpp"

#include <algorithm>
#include <deque>
#include <map>
#include <vector>

#include "allocator/block_pool.hpp"
#include "allocator/caching_allocator.hpp"
#include "core/errors.hpp"
#include "graph/liveness.hpp"

namespace spill::train {
namespace {

constexpr std::uint64_t kMinSplit = kSmallRound;  // the small pool's rounding

// The size the allocator gives a small request: rounded up to kMinSplit (CachingAllocator's
// allocate), so a 4-byte scalar takes 512 B of its segment.
std::uint64_t small_block(std::uint64_t bytes) {
  return (bytes + kMinSplit - 1) / kMinSplit * kMinSplit;
}

// The small pool's placement: the allocator's own BlockPool (best fit, split, coalesced within a
// segment) on one stream, over segments the model makes. Segment k sits at 2 * segment * k
// (ascending) or at 2 * segment * (2^20 - k) (descending): never adjacent.
class PoolModel {
 public:
  PoolModel(std::uint64_t segment, bool descending)
      : seg_(segment), descending_(descending), pool_(nullptr, kMinSplit, true) {}

  Block* allocate(std::uint64_t size) {
    Block* b = pool_.take(size, nullptr);
    if (b == nullptr) {
      const std::uint64_t k = segments_.size();
      Segment& s = segments_.emplace_back();
      s.addr = 2 * seg_ * (descending_ ? (std::uint64_t{1} << 20) - k : k);
      s.size = seg_;
      b = pool_.carve(pool_.add_segment(&s), size, nullptr);
    }
    if (in_segment_[b->segment]++ == 0) ++in_use_;
    return b;
  }

  void free(Block* b) {
    if (--in_segment_[b->segment] == 0) --in_use_;
    pool_.give_back(b, nullptr);
  }

  // Segments with at least one block allocated (a wholly free one can be released).
  std::uint64_t in_use() const { return in_use_; }

 private:
  std::uint64_t seg_;
  bool descending_;
  std::deque<Segment> segments_;  // (before the pool: its blocks point at them)
  BlockPool pool_;
  std::uint64_t in_use_ = 0;
  std::map<const Segment*, std::uint64_t> in_segment_;  // allocated blocks per segment
};

SmallPoolUse replay(const graph::Graph& g, const graph::Liveness& live, std::uint64_t small_limit,
                    std::uint64_t segment, int steps, bool descending) {
  const std::size_t nt = g.tensors.size(), no = g.ops.size();
  auto small = [&](std::size_t t) { return g.tensors[t].bytes <= small_limit; };
  std::vector<std::vector<std::size_t>> allocs(no), frees(no);
  std::vector<std::size_t> inputs;
  for (std::size_t t = 0; t < nt; ++t) {
    const auto& u = live.uses[t];
    if (u.empty()) continue;
    const graph::TensorKind kind = g.tensors[t].kind;
    if (!graph::exists_at_start(kind)) allocs[std::size_t(u.front())].push_back(t);
    if (!graph::persistent(kind)) frees[std::size_t(u.back())].push_back(t);
    if (kind == graph::TensorKind::Input) inputs.push_back(t);
  }
  PoolModel pool(segment, descending);
  std::vector<Block*> block(nt, nullptr);
  std::uint64_t small_live = 0, large_live = 0;
  auto place = [&](std::size_t t) {
    if (small(t)) {
      block[t] = pool.allocate(small_block(g.tensors[t].bytes));
      small_live += g.tensors[t].bytes;
    } else {
      large_live += g.tensors[t].bytes;
    }
  };
  auto release = [&](std::size_t t) {
    if (small(t)) {
      pool.free(block[t]);
      small_live -= g.tensors[t].bytes;
    } else {
      large_live -= g.tensors[t].bytes;
    }
  };
  SmallPoolUse r;
  r.slack_at.assign(no, 0);
  r.mapped_at.assign(no, 0);
  auto note = [&](std::uint64_t& slack, std::uint64_t& mapped) {
    r.segments = std::max(r.segments, pool.in_use());
    slack = std::max(slack, pool.in_use() * segment - small_live);
    mapped = std::max(mapped, large_live + pool.in_use() * segment);
    r.slack = std::max(r.slack, slack);
    r.mapped = std::max(r.mapped, mapped);
  };
  // Setup allocates every persistent tensor, used or not (Executor::Impl::setup).
  for (std::size_t t = 0; t < nt; ++t)
    if (graph::persistent(g.tensors[t].kind)) place(t);
  note(r.setup_slack, r.setup_mapped);
  for (int k = 0; k < steps; ++k) {
    for (std::size_t t : inputs) place(t);
    for (std::size_t i = 0; i < no; ++i) {
      for (std::size_t t : allocs[i]) place(t);
      note(r.slack_at[i], r.mapped_at[i]);
      for (std::size_t t : frees[i]) release(t);
    }
  }
  return r;
}

}  // namespace

SmallPoolUse small_pool_use(const graph::Graph& g, std::uint64_t small_limit,
                            std::uint64_t segment, int steps) {
  SPILL_EXPECTS(segment > 0 && small_limit <= segment,
                "small pool model: the small limit must fit in a segment");
  const graph::Liveness live = graph::analyze_liveness(g);
  SmallPoolUse r;
  for (bool descending : {false, true}) {
    const SmallPoolUse u = replay(g, live, small_limit, segment, steps, descending);
    r.slack = std::max(r.slack, u.slack);
    r.segments = std::max(r.segments, u.segments);
    r.mapped = std::max(r.mapped, u.mapped);
    r.setup_slack = std::max(r.setup_slack, u.setup_slack);
    r.setup_mapped = std::max(r.setup_mapped, u.setup_mapped);
    r.slack_at.resize(u.slack_at.size(), 0);
    r.mapped_at.resize(u.mapped_at.size(), 0);
    for (std::size_t i = 0; i < u.slack_at.size(); ++i) {
      r.slack_at[i] = std::max(r.slack_at[i], u.slack_at[i]);
      r.mapped_at[i] = std::max(r.mapped_at[i], u.mapped_at[i]);
    }
  }
  return r;
}

std::uint64_t small_pool_reserve(const SmallPoolUse& u, std::uint64_t mappable,
                                 std::uint64_t quantum) {
  SPILL_EXPECTS(quantum > 0, "small pool reserve: the quantum must be above zero");
  auto need = [&](std::uint64_t slack) { return slack >= quantum ? slack - quantum + 1 : 0; };
  std::uint64_t reserve = u.setup_mapped > mappable ? need(u.setup_slack) : 0;
  for (std::size_t i = 0; i < u.slack_at.size(); ++i)
    if (u.mapped_at[i] > mappable) reserve = std::max(reserve, need(u.slack_at[i]));
  return reserve;
}

}  // namespace spill::train

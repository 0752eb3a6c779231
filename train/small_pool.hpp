// Where the caching allocator's small pool puts a training step's small tensors, and so how many
// of its segments they keep mapped. A segment returns only when every block in it is free, so
// tensors of up to the small limit can keep more segments than their live bytes fill (audit 40a
// #1: 1 MiB activations beside KiB-sized ones); the planner's budget and policy none's check
// keep room for the segments this model counts, not for perfectly packed ones.
#pragma once

#include <cstdint>
#include <vector>

#include "graph/ir.hpp"

namespace spill::train {

struct SmallPoolUse {
  // Over the ops of the modelled steps, after each op's new tensors are placed: the most of
  // (segments in use x segment - live small bytes), the bytes the planner must keep beside the
  // small tensors' own; and the most segments in use.
  std::uint64_t slack = 0;
  std::uint64_t segments = 0;
  // The most mapped with nothing swapped: the larger tensors' live bytes plus the segments in
  // use, at the same op (what policy none needs; below footprint + slack where the two peaks
  // fall at different ops).
  std::uint64_t mapped = 0;
  // The same per op (the most over the modelled steps and address orders), and at set-up (the
  // persistent tensors alone).
  std::vector<std::uint64_t> slack_at, mapped_at;
  std::uint64_t setup_slack = 0, setup_mapped = 0;
};

// The bytes a plan at `mappable` bytes must keep beside the tensors it counts for the small
// pool. Only ops (and set-up) whose mapped bytes with nothing swapped pass `mappable` count: at
// the others the step maps at most that much whatever the plan does (a plan only takes larger
// tensors off the device; small ones never move). At such an op the plan's larger tensors L,
// whole multiples of `quantum` (the gcd of the granule and the segment, of which `mappable` is
// a multiple too), satisfy L + small <= mappable - R, and the allocator needs
// L + segments x segment <= mappable: true for every such L once R > slack - quantum. So R is
// the most of slack - quantum + 1 over those ops (0 when the segments are as packed as the
// rounding allows).
std::uint64_t small_pool_reserve(const SmallPoolUse& u, std::uint64_t mappable,
                                 std::uint64_t quantum);

// Replays the executor's small requests (train/executor.cpp: the persistent tensors in tensor order
// at setup; then, each step, the inputs in tensor order, each op's new tensors in tensor order, and
// after the op the tensors it used last) through a model of the allocator's small pool
// (allocator/block_pool.cpp): each request rounded up to 512 B as the allocator rounds it, best fit
// by (size, address), a block split when at least 512 B remain, free neighbours in a segment
// coalesced, a new segment when no free block fits. The tie between equal free blocks of different
// segments follows their addresses, which the device picks: the model tries segments in ascending
// and in descending creation order and keeps the larger result. Tensors of more than `small_limit`
// bytes are not small. Small tensors are never swapped or dropped (the planner moves only larger
// ones), so the order is the plan's too. Models `steps` steps (fragmentation carries over from one
// to the next).
SmallPoolUse small_pool_use(const graph::Graph& g, std::uint64_t small_limit,
                            std::uint64_t segment, int steps = 3);

}  // namespace spill::train

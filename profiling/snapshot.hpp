// Memory snapshots in the layout PyTorch's memory_viz reads: segments with their blocks, and a
// per-device history of actions (alloc, free_requested, free_completed, segment_alloc,
// segment_free, oom) built from trace events. memory_viz opens pickles, so
// tools/snapshot_to_pickle.py turns the JSON written here into one. Blocks whose bytes sit on
// the host carry an "[on host]" frame, since memory_viz has no notion of residence; a named
// block (CachingAllocator::set_block_name) carries its name as a frame and a "name" field, and
// so do its alloc and free actions in the history when the trace saw it named (Name events).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "profiling/chrome_trace.hpp"
#include "profiling/events.hpp"

namespace spill::profiling {

struct SnapshotBlock {
  enum class State { Allocated, PendingFree, Free };
  std::uint64_t address = 0;
  std::uint64_t size = 0;
  std::uint64_t requested = 0;  // bytes the caller asked for
  State state = State::Free;
  std::uint32_t tag = 0;
  bool on_host = false;         // allocated, its bytes swapped out
  std::string name;             // allocated: the caller's name for it, "" for none
};

struct SnapshotSegment {
  std::uint64_t address = 0;
  std::uint64_t size = 0;
  std::uint64_t stream = 0;
  bool large = false;           // VMM-backed large pool (expandable in memory_viz's words)
  std::vector<SnapshotBlock> blocks;  // ordered by address, covering the segment
};

struct MemoryState {
  int device = 0;
  std::vector<SnapshotSegment> segments;
};

// The snapshot as JSON (memory_viz's dictionary, with spill's format marker added).
nlohmann::json to_memory_viz(const MemoryState& state, const std::vector<TraceEvent>& history,
                             const TagNamer& tags = {});

// Writes it through write_file (core/output_file.hpp: whole or not at all); throws
// InvalidArgument naming the path when it cannot.
void write_snapshot(const std::string& path, const MemoryState& state,
                    const std::vector<TraceEvent>& history, const TagNamer& tags = {});

// Reads a snapshot written by write_snapshot; InvalidArgument with the position for a file that
// is truncated, not JSON, not a spill snapshot or of another version.
nlohmann::json read_snapshot(const std::string& path);

}  // namespace spill::profiling

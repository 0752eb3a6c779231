// Recording steps as graph::Traces, planning from them, and executing the plan on later steps,
// for each step scope on its own. Block identity across steps is the order of first pins within
// a scope's step, which a deterministic training step repeats. Every step is recorded; a step
// that leaves its plan (an access the plan does not have at that point: another block or op)
// stops following it and its own recording becomes the next step's plan, so a first step that
// differs from the rest (gradients and optimizer state are created in it) costs one
// deviation, not a re-recording per step. A block's size is no part of its identity: the
// caching allocator serves a request from a cached block up to a quarter larger, so what the
// cache holds decides a block's size (an activation of torchvision's mobilenet_v3_small took
// 640 KiB in one step and 512 KiB in the next, alternately), and a step's tensors may change
// size from step to step (batches padded to their own longest sequence: the same ops at
// another length). The plan follows a block at its size of this step; a step in which a block
// outgrows the size the plan had for it makes the plan again at the largest sizes seen since
// (each block, and each op's memory the recording did not show, at least as large as the
// plan's), so that the plan leaves room for a step as large as any before it. A block made
// during the step is known from its birth (the step's n-th large allocation, by its request)
// when the plan's recording had one there, before its first pin: a gradient the backward
// makes and the optimizer pins first. A recorded access's time is the time since the step
// began less the host's waits inside the swapper meanwhile (demand fetches, late prefetches,
// room): the plan's op times are the compute it hides copies behind, even when the recorded
// step stalled (a first, reactive step mostly waits).
//
// Executing a plan: after each recorded op, the plan's evictions for the ops passed are issued
// (one whose block is still pinned, such as a module's input while its submodules run, when
// the block is unpinned, unless its prefetch has been issued by then); before it, the
// prefetches due within the look-ahead. A prefetch that finds no free room
// first lets completed swap-outs go, then starts evictions of blocks whose next use is later
// than its own (never one needed sooner) and waits for a later op; the plan leaves room for
// the memory its recording did not show (small blocks, blocks no pin touched, cache), measured
// per op while recording. A step pinned on a stream (the host runs ahead of the device) differs:
// its prefetches are issued at the plan's ops (no look-ahead) and wait for room there, for the
// swap-outs in flight and then the allocator's cache, as the graph planner's executor does;
// and its recording does not count the cache as memory held (see sample_other_locked).
#include <algorithm>

#include "core/errors.hpp"
#include "graph/planner.hpp"
#include "graph/trace.hpp"
#include "profiling/events.hpp"
#include "swapper/swapper_impl.hpp"

namespace spill {

namespace {
std::uintptr_t key(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }
}  // namespace

void Swapper::Impl::begin_step_locked(StepState& s) {
  s.in_step = true;
  s.op = -1;
  s.after_unpin = true;
  s.auto_ops = true;
  s.next_id = 0;
  s.id_of.clear();
  s.request_of_id.clear();
  s.base_of_id.clear();
  s.gen_of_id.clear();
  s.access_of_id_op.clear();
  s.first_access_of_id.clear();
  s.births = 0;
  s.birth_of.clear();
  s.id_of_birth.clear();
  s.request_of_birth.clear();
  s.expected_id_of.clear();
  s.expected_base_of_id.clear();
  s.prefetched_upto = 0;
  s.evicted_upto = 0;
  s.deferred.clear();
  s.other_bytes.clear();
  s.t0_ns = profiling::TraceRecorder::global().now_ns();
  release_marks_locked(s);
  s.timing = StepState::Timing::Undecided;
  s.marked_op = -1;
  s.waited0_ns = waited_ns;
  s.last_time_s = 0;
  s.begin_tick = ++tick;
  s.outgrew_plan = false;
  s.recording = opt.policy == SwapPolicy::Plan && opt.budget > 0;
  // A plan that cannot meet the budget everywhere still schedules the rest; the ops it cannot
  // fit fall back to reactive eviction.
  s.executing = s.recording && !s.replan && !s.plan.steps.empty();
  s.planned_step = s.executing;
  if (!s.executing) s.pending.clear();  // else: prefetches issued at the previous step's end
  if (s.recording) s.trace = graph::Trace{};
  if (s.executing) {
    // Blocks the plan starts on the host should already be there from the previous step's
    // end; the plan's evictions put them back each step.
    s.lookahead = std::max(0, s.lookahead - 1);
  }
}

void Swapper::Impl::end_step_locked(StepState& s) {
  if (!s.in_step) return;
  s.in_step = false;
  if (s.executing) {
    stats.steps_planned++;
    // The last ops' evictions (tensors idle across the step boundary, such as weights).
    for (; s.evicted_upto < s.plan.steps.size(); ++s.evicted_upto)
      issue_evictions_locked(s, static_cast<std::int64_t>(s.evicted_upto));
  }
  // Blocks still pinned now stay: the next step's first prefetches are about to be issued.
  s.deferred.clear();
  s.executing = false;
  s.pending.clear();
  s.base_of_id_prev = s.base_of_id;
  s.gen_of_id_prev = s.gen_of_id;
  if (!s.recording) return;
  s.recording = false;
  s.trace.step_end_s = step_time_locked(s);
  const bool keeps_plan = s.planned_step && !s.replan;
  // A step that followed its plan with a block made by a larger request than the plan had
  // (a longer sequence) is planned again, at the largest sizes seen since the plan's
  // recording, so that a later step as large as this one finds the room its evictions make.
  const bool outgrew = keeps_plan && s.outgrew_plan;
  if ((!keeps_plan || outgrew) && s.timing == StepState::Timing::Device) time_on_device_locked(s);
  s.last_trace = s.trace;
  last_trace_any = s.trace;
  last_trace_any_scope = s.scope;
  if (keeps_plan && !outgrew) return;  // the step followed its plan: keep it
  s.replan = false;
  stats.steps_recorded++;
  s.plan = graph::Plan{};
  s.size_of_id.assign(s.next_id, 0);  // this step's blocks, as the next step finds them
  for (const graph::TraceAccess& a : s.trace.accesses) s.size_of_id[a.block] = a.bytes;
  if (outgrew) {
    // The plan's sizes where they were larger: each block's and request, each op's memory the
    // recording did not show (the steps are the same access for access, ops included).
    for (graph::TraceAccess& a : s.trace.accesses)
      a.bytes = std::max<std::uint64_t>(a.bytes, s.plan_bytes_of_id[a.block]);
    const std::size_t ids = std::min(s.request_of_id.size(), s.request_of_id_planned.size());
    for (std::size_t id = 0; id < ids; ++id)
      s.request_of_id[id] = std::max(s.request_of_id[id], s.request_of_id_planned[id]);
    if (s.other_bytes.size() < s.plan_other_bytes.size())
      s.other_bytes.resize(s.plan_other_bytes.size(), 0);
    for (std::size_t op = 0; op < s.plan_other_bytes.size(); ++op)
      s.other_bytes[op] = std::max(s.other_bytes[op], s.plan_other_bytes[op]);
  }
  s.plan_trace = s.trace;
  s.plan_other_bytes = s.other_bytes;
  s.request_of_id_planned = s.request_of_id;
  s.plan_bytes_of_id.assign(s.next_id, 0);
  s.id_of_birth_planned = s.id_of_birth;
  s.request_of_birth_planned = s.request_of_birth;
  s.use_ops.assign(s.next_id, {});
  s.plan_op_ids.clear();
  for (const graph::TraceAccess& a : s.trace.accesses) {
    s.plan_bytes_of_id[a.block] = a.bytes;
    if (s.use_ops[a.block].empty() || s.use_ops[a.block].back() != a.op)
      s.use_ops[a.block].push_back(a.op);
    if (s.plan_op_ids.empty() || s.plan_op_ids.back() != a.op) s.plan_op_ids.push_back(a.op);
  }
  if (s.trace.accesses.empty()) return;
  // Blocks from before the step that no pin of it touched (undeclared buffers) held their
  // memory throughout.
  std::uint64_t untouched = 0;
  for (const auto& [base, b] : blocks)
    if (b.state != Residence::OnHost && b.born < s.begin_tick && s.id_of.count(base) == 0)
      untouched += b.size;
  graph::Graph g = graph::graph_from_trace(s.trace, "recorded step");
  // Each plan op also holds the memory the recording did not account for, at its worst over
  // the recorded ops since the previous plan op.
  std::uint32_t from = 0;
  for (std::size_t j = 0; j < g.ops.size(); ++j) {
    std::uint64_t other = 0;
    for (std::uint32_t op = from; op <= s.plan_op_ids[j] && op < s.other_bytes.size(); ++op)
      other = std::max(other, s.other_bytes[op]);
    g.ops[j].workspace_bytes = other + untouched;
    from = s.plan_op_ids[j] + 1;
  }
  std::vector<double> times;
  for (const graph::Op& op : g.ops) times.push_back(op.time_s.value_or(1e-6));
  graph::PlannerOptions po;
  po.budget = opt.budget;
  po.min_swap_bytes = opt.min_swap_bytes;
  po.recompute = false;  // the swapper moves blocks; it cannot run an op again
  s.plan = graph::plan_spill(g, times, opt.link, po);
  s.prefetch_of_eviction.clear();
  for (const graph::Swap& w : s.plan.swaps)
    s.prefetch_of_eviction[(static_cast<std::uint64_t>(w.evict_after) << 32) | w.tensor] =
        w.prefetch_at;
  s.fresh_plan = true;
  s.tensor_id.clear();
  for (const graph::Tensor& t : g.tensors) s.tensor_id.push_back(static_cast<std::int64_t>(t.id));
  // The next step follows this plan from its start: the blocks it starts on the host go there
  // now, as a planned step's last evictions would have sent them.
  for (graph::TensorIndex t : s.plan.start_on_host) {
    auto base = base_for_id_locked(s, s.tensor_id[t]);
    if (!base) continue;
    SwapBlock& b = blocks.at(*base);
    // A block fetched on demand in the step's last ops may still be marked as swapping in.
    settle_locked(b);
    if (!evictable_locked(b) || b.state == Residence::OnHost || b.state == Residence::SwappingOut)
      continue;
    try {
      start_swap_out_locked(b);
      stats.evictions_planned++;
    } catch (const OutOfMemory&) {
      // Host cap: it stays; the step's reactive path copes.
    }
  }
}

double Swapper::Impl::step_time_locked(StepState& s) {
  // Op times are the compute the plan hides copies behind: the waits of this step (demand
  // fetches, room) would otherwise count as compute, and a plan made from a reactive step
  // would issue its prefetches too late. Waits of several threads at once may add up to more
  // than the time elapsed: times never go back.
  const std::uint64_t elapsed = profiling::TraceRecorder::global().now_ns() - s.t0_ns;
  const std::uint64_t waited = waited_ns - s.waited0_ns;
  const double t = static_cast<double>(elapsed > waited ? elapsed - waited : 0) * 1e-9;
  s.last_time_s = std::max(s.last_time_s, t);
  return s.last_time_s;
}

std::optional<std::uintptr_t> Swapper::Impl::base_for_id_locked(StepState& s, std::int64_t id) {
  if (id < 0) return std::nullopt;
  auto idx = static_cast<std::size_t>(id);
  std::uintptr_t base = 0;
  std::uint64_t generation = 0;
  if (idx < s.base_of_id.size() && s.base_of_id[idx] != 0) {
    base = s.base_of_id[idx];
    generation = s.gen_of_id[idx];
  } else if (auto e = s.expected_base_of_id.find(idx); e != s.expected_base_of_id.end()) {
    // Born in this step where the plan's block was, not pinned yet. Its request matched at
    // birth; its size may differ (the cache), so it is not compared below.
    auto it = blocks.find(e->second);
    if (it == blocks.end() || it->second.generation != s.expected_id_of.at(e->second).generation)
      return std::nullopt;
    return e->second;
  } else if (idx < s.base_of_id_prev.size()) {
    base = s.base_of_id_prev[idx];
    generation = s.gen_of_id_prev[idx];
  }
  if (base == 0) return std::nullopt;
  auto it = blocks.find(base);
  if (it == blocks.end() || it->second.generation != generation ||
      (idx < s.size_of_id.size() && it->second.size != s.size_of_id[idx]))
    return std::nullopt;  // freed since (an activation of the previous step), or another block
  return base;
}

bool StepState::follows_plan() const {
  return executing || (!in_step && !replan && !plan.steps.empty());
}

std::int64_t Swapper::Impl::next_use_of_id_locked(const StepState& s, std::uint64_t id) const {
  if (id >= s.use_ops.size()) return INT64_MAX;  // unknown
  const std::int64_t now = s.in_step ? s.op : -1;  // between steps: before the next one's op 0
  for (std::uint32_t op : s.use_ops[id])
    if (static_cast<std::int64_t>(op) >= now) return op - now;
  // Not used again in this step: its next use is in the next step.
  return s.use_ops[id].empty() ? INT64_MAX : s.use_ops[id].front() + (1ll << 32) - now;
}

std::int64_t Swapper::Impl::next_use_locked(const SwapBlock& b) const {
  // A block the plans do not know (made in this step and not pinned yet, and not born where
  // the plan's recording had a block: see StepState::expected_id_of) is likely needed later in
  // the step: a worse victim than one known to wait for the next step. Without any plan, every
  // block is unknown alike (victims then go by last use).
  auto scope = scopes.find(b.scope);
  if (scope == scopes.end() || !scope->second.follows_plan()) {
    for (const auto& [id, st] : scopes)
      if (st.follows_plan()) return kUnknownUse;
    return INT64_MAX;
  }
  const StepState& s = scope->second;
  auto it = s.id_of.find(key(b.base));
  std::int64_t id = -1;
  if (it != s.id_of.end()) {
    id = static_cast<std::int64_t>(it->second);
  } else if (auto e = s.expected_id_of.find(key(b.base));
             e != s.expected_id_of.end() && e->second.generation == b.generation) {
    id = static_cast<std::int64_t>(e->second.id);
  } else {
    for (std::size_t i = 0; i < s.base_of_id_prev.size(); ++i)
      if (s.base_of_id_prev[i] == key(b.base) && s.gen_of_id_prev[i] == b.generation)
        id = static_cast<std::int64_t>(i);
  }
  if (id < 0) return kUnknownUse;
  const std::int64_t next = next_use_of_id_locked(s, static_cast<std::uint64_t>(id));
  return next == INT64_MAX ? kUnknownUse : next;
}

void Swapper::Impl::planned_evict_locked(SwapBlock& b) {
  try {
    start_swap_out_locked(b);
    stats.evictions_planned++;
  } catch (const OutOfMemory&) {
    // Host cap: leave it resident; the reactive path copes.
  }
}

void Swapper::Impl::issue_evictions_locked(StepState& s, std::int64_t op) {
  for (graph::TensorIndex t : s.plan.steps[op].evict_after) {
    auto base = base_for_id_locked(s, s.tensor_id[t]);
    if (!base) continue;
    SwapBlock& b = blocks.at(*base);
    if (b.state == Residence::OnHost || b.state == Residence::SwappingOut) continue;
    if (evictable_locked(b)) {
      planned_evict_locked(b);
      continue;
    }
    // Still in use (pinned across later ops): evicted when it becomes evictable.
    auto when = s.prefetch_of_eviction.find((static_cast<std::uint64_t>(op) << 32) | t);
    if (when != s.prefetch_of_eviction.end()) s.deferred[*base] = {b.generation, when->second};
  }
}

bool Swapper::Impl::issue_deferred_locked(StepState& s, std::uintptr_t base) {
  auto it = s.deferred.find(base);
  if (it == s.deferred.end()) return false;
  auto found = blocks.find(base);
  // Freed meanwhile, or its prefetch was issued (and found it resident): it stays.
  bool drop = found == blocks.end() || found->second.generation != it->second.generation ||
              static_cast<std::size_t>(it->second.prefetch_at) < s.prefetched_upto ||
              found->second.state == Residence::OnHost ||
              found->second.state == Residence::SwappingOut;
  if (!drop && !evictable_locked(found->second)) return false;  // not yet
  s.deferred.erase(it);
  if (!drop) planned_evict_locked(found->second);
  return true;
}

std::vector<PlannedPrefetch> Swapper::Impl::advance_op_locked(StepState& s, bool force) {
  std::vector<PlannedPrefetch> wanted;
  if (!force && !(s.auto_ops && (s.after_unpin || s.op < 0))) return wanted;
  s.op++;
  s.after_unpin = false;
  if (s.recording) sample_other_locked(s, false);
  if (!s.executing) return wanted;
  const graph::Plan& p = s.plan;
  const std::size_t n = p.steps.size();
  // Evictions after the plan ops now passed: their work is enqueued and their blocks unpinned.
  for (; s.evicted_upto < n && s.plan_op_ids[s.evicted_upto] < s.op; ++s.evicted_upto)
    issue_evictions_locked(s, static_cast<std::int64_t>(s.evicted_upto));
  for (auto it = s.deferred.begin(); it != s.deferred.end();) {
    const std::uintptr_t base = (it++)->first;  // issue_deferred_locked may erase its entry
    issue_deferred_locked(s, base);
  }
  // Prefetches due by this op (the first plan op not passed) and the adaptive look-ahead.
  const std::size_t upto = std::min(n, s.evicted_upto + 1 + static_cast<std::size_t>(s.lookahead));
  wanted = std::move(s.pending);
  s.pending.clear();
  for (std::size_t j = s.prefetched_upto; j < upto; ++j) {
    for (graph::TensorIndex t : p.steps[j].prefetch_at)
      if (s.tensor_id[t] >= 0) wanted.push_back({static_cast<std::uint64_t>(s.tensor_id[t])});
  }
  s.prefetched_upto = std::max(s.prefetched_upto, upto);
  reap_locked();
  return wanted;
}

std::vector<PlannedPrefetch> Swapper::Impl::next_step_prefetches_locked(StepState& s) {
  std::vector<PlannedPrefetch> wanted;
  if (s.replan || s.plan.steps.empty() || s.in_step) return wanted;
  const std::size_t upto = std::min(s.plan.steps.size(), 1 + static_cast<std::size_t>(s.lookahead));
  for (std::size_t j = 0; j < upto; ++j)
    for (graph::TensorIndex t : s.plan.steps[j].prefetch_at)
      if (s.tensor_id[t] >= 0) wanted.push_back({static_cast<std::uint64_t>(s.tensor_id[t])});
  if (s.fresh_plan) {
    // The step that made this plan ran without it: what the plan has resident at its start
    // may be on the host. Bring it back in the order of first use (into free room, or room
    // made from blocks needed later; the rest waits for the next step's ops).
    s.fresh_plan = false;
    std::vector<bool> starts_on_host(s.tensor_id.size(), false);
    for (graph::TensorIndex t : s.plan.start_on_host) starts_on_host[t] = true;
    std::vector<std::pair<std::uint32_t, std::uint64_t>> resident;  // (first use, id)
    for (std::size_t t = 0; t < s.tensor_id.size(); ++t) {
      const std::int64_t id = s.tensor_id[t];
      if (starts_on_host[t] || id < 0 || static_cast<std::size_t>(id) >= s.use_ops.size() ||
          s.use_ops[id].empty())
        continue;
      resident.push_back({s.use_ops[id].front(), static_cast<std::uint64_t>(id)});
    }
    std::sort(resident.begin(), resident.end());
    for (const auto& [first, id] : resident) wanted.push_back({id});
  }
  return wanted;
}

std::size_t Swapper::Impl::make_room_locked(std::size_t needed, std::int64_t horizon) {
  std::size_t coming = 0;
  for (auto& [base, b] : blocks)
    if (b.state == Residence::SwappingOut && !b.busy) coming += b.size;
  if (coming >= needed) return coming;
  std::vector<std::pair<std::int64_t, std::uintptr_t>> victims;
  for (auto& [base, b] : blocks) {
    settle_locked(b);
    if (!evictable_locked(b) || b.state != Residence::Resident || b.size < opt.min_swap_bytes)
      continue;
    const std::int64_t next = next_use_locked(b);
    if (next > horizon) victims.push_back({next, base});
  }
  std::sort(victims.begin(), victims.end(), std::greater<>());
  for (const auto& [next, base] : victims) {
    if (coming >= needed) break;
    SwapBlock& b = blocks.at(base);
    try {
      start_swap_out_locked(b);
    } catch (const OutOfMemory&) {
      continue;  // host cap
    }
    stats.evictions_planned++;
    coming += b.size;
    profiling::TraceRecorder::global().record(profiling::EventKind::Evict, base, b.size,
                                              profiling::kHostStream);
  }
  return coming;
}

void Swapper::Impl::prefetch_planned(std::unique_lock<std::mutex>& lock, StepState& s,
                                     std::vector<PlannedPrefetch> wanted) {
  // `s` is used across the unlocked swap-ins: end_scope waits until no thread is here.
  struct User {
    Impl& m;
    StepState& s;
    User(Impl& m_, StepState& s_) : m(m_), s(s_) { s.users++; }
    ~User() {
      if (--s.users == 0) m.cv.notify_all();
    }
  } user(*this, s);
  for (const PlannedPrefetch& w : wanted) {
    auto found = base_for_id_locked(s, static_cast<std::int64_t>(w.id));
    if (!found) continue;
    const std::uintptr_t base = *found;
    wait_not_busy(lock, base);
    auto it = blocks.find(base);
    if (it == blocks.end() || it->second.size != s.size_of_id[w.id]) continue;
    if (it->second.state == Residence::SwappingOut) {
      // Still on the device: cancel the eviction instead of copying back (a victim taken while
      // its swap-in was landing stays SwappingIn, so that its users wait for that copy).
      cancel_swap_out_locked(it->second);
      continue;
    }
    if (it->second.state != Residence::OnHost) continue;
    const std::size_t size = it->second.size;
    reap_locked();  // swap-outs that completed free their room first
    // Pinned on a stream, the host runs ahead of the device: a prefetch issued at its planned
    // op waits for the swap-outs in flight (in issue order) and then for the cache, as the
    // plan timed them, instead of being retried op after op until its pin fetches it.
    const bool on_stream = s.timing == StepState::Timing::Device;
    if (swap_in(lock, base, true, on_stream)) continue;
    if (on_stream && release_cache_for_locked(lock, base, size)) continue;
    if (!s.follows_plan()) continue;
    // No room: evict what is needed after this block, and try again at the next op.
    const std::size_t room = backend.room();
    make_room_locked(size > room ? size - room : 0, next_use_of_id_locked(s, w.id));
    s.pending.push_back(w);
  }
}

bool Swapper::Impl::release_cache_for_locked(std::unique_lock<std::mutex>& lock,
                                             std::uintptr_t base, std::size_t size) {
  const std::size_t room = backend.room();
  if (room >= size || backend.cached_bytes() == 0) return false;
  blocks.at(base).busy = true;  // it stays on the host while the lock is dropped
  lock.unlock();
  std::size_t released = 0;
  try {
    released = backend.release_cache(size - room);
  } catch (...) {
    lock.lock();
    blocks.at(base).busy = false;
    cv.notify_all();
    throw;
  }
  lock.lock();
  blocks.at(base).busy = false;
  cv.notify_all();
  if (released == 0) return false;
  reap_locked();
  return swap_in(lock, base, true);
}

void Swapper::Impl::mark_op_start_locked(StepState& s, Stream stream, bool host) {
  if (!s.in_step || !s.recording) return;
  if (s.timing == StepState::Timing::Undecided) {
    s.timing = host ? StepState::Timing::Host : StepState::Timing::Device;
    s.timing_stream = stream;
  }
  if (s.timing != StepState::Timing::Device || host || stream != s.timing_stream ||
      s.marked_op == s.op)
    return;
  s.marked_op = s.op;
  mark_locked(s, StepState::MarkKind::OpStart);
}

void Swapper::Impl::mark_locked(StepState& s, StepState::MarkKind kind) {
  if (s.timing != StepState::Timing::Device) return;
  Event e = nullptr;
  if (timing_pool.empty()) {
    e = dev.create_event(true);
  } else {
    e = timing_pool.back();
    timing_pool.pop_back();
  }
  try {
    dev.record(e, s.timing_stream);
  } catch (...) {
    timing_pool.push_back(e);
    throw;
  }
  s.marks.push_back({e, s.op, kind});
}

StepState* Swapper::Impl::device_timed_scope_locked() {
  StepState* s = find_scope_locked(current_scope());
  return s != nullptr && s->in_step && s->recording && s->timing == StepState::Timing::Device
             ? s
             : nullptr;
}

void Swapper::Impl::release_marks_locked(StepState& s) {
  for (const StepState::Mark& m : s.marks) timing_pool.push_back(m.event);
  s.marks.clear();
}

void Swapper::Impl::time_on_device_locked(StepState& s) {
  if (s.marks.empty()) return;
  mark_locked(s, StepState::MarkKind::StepEnd);
  // The events are on the timing stream in order: the last one done means all are.
  dev.synchronize(s.marks.back().event);
  const Event first = s.marks.front().event;
  // Each op's start on the device, less the stalls marked before it.
  std::unordered_map<std::int64_t, double> start_of_op;
  double stalled = 0, end = 0;
  std::optional<double> stall_begin;
  for (const StepState::Mark& m : s.marks) {
    const double t = dev.elapsed_ms(first, m.event) * 1e-3;
    switch (m.kind) {
      case StepState::MarkKind::OpStart: start_of_op.emplace(m.op, t - stalled); break;
      case StepState::MarkKind::StallBegin: stall_begin = t; break;
      case StepState::MarkKind::StallEnd:
        if (stall_begin) stalled += std::max(0.0, t - *stall_begin);
        stall_begin.reset();
        break;
      case StepState::MarkKind::StepEnd: end = t - stalled; break;
    }
  }
  // Accesses of an op with no mark (pins on another stream only) take the time before them.
  double at = 0;
  for (graph::TraceAccess& a : s.trace.accesses) {
    auto it = start_of_op.find(a.op);
    if (it != start_of_op.end()) at = std::max(at, it->second);
    a.time_s = at;
  }
  s.trace.step_end_s = std::max(at, end);
  release_marks_locked(s);
}

void Swapper::Impl::sample_other_locked(StepState& s, bool at_pin) {
  const std::size_t mapped = backend.mapped_bytes();
  if (mapped == 0) return;
  // Not the recording's: mapped memory that is no tracked block (small segments, cache), and
  // blocks born in this step that no pin has touched yet (temporaries, or blocks whose first
  // access is later: the graph counts them from it). Blocks from before the step that no pin
  // touches are added at its end. On a step pinned on a stream (the host runs ahead of the
  // device), two of these would make the plan swap more than the step needs:
  // - an op's outputs are allocated before its first pin, so at a pin the blocks not pinned
  //   yet are mostly the op's own, which the graph counts from this op: only the sample at the
  //   op's start counts unpinned blocks;
  // - the cache holds much of what the step freed (in a backward pass, more than half the
  //   budget), and a planned prefetch that lacks room releases it (prefetch_planned): it is
  //   not counted.
  const bool device_timed = s.timing == StepState::Timing::Device;
  std::size_t tracked = 0, fresh = 0;
  for (const auto& [base, b] : blocks) {
    if (b.state == Residence::OnHost) continue;
    tracked += b.size;
    if (b.born >= s.begin_tick && s.id_of.count(base) == 0 && !(at_pin && device_timed))
      fresh += b.size;
  }
  const auto op = static_cast<std::size_t>(std::max<std::int64_t>(s.op, 0));
  if (s.other_bytes.size() <= op) s.other_bytes.resize(op + 1, 0);
  const std::size_t cached = device_timed ? backend.cached_bytes() : 0;
  const std::size_t held = tracked + cached;
  const std::uint64_t other = (mapped > held ? mapped - held : 0) + fresh;
  s.other_bytes[op] = std::max(s.other_bytes[op], other);
}

void Swapper::Impl::on_pin_locked(StepState& s, SwapBlock& b, Stream stream) {
  if (!s.in_step) return;
  std::uintptr_t base = key(b.base);
  auto [it, fresh] = s.id_of.emplace(base, s.next_id);
  std::uint64_t id = it->second;
  if (fresh) {
    s.next_id++;
    if (s.base_of_id.size() <= id) {
      s.base_of_id.resize(id + 1, 0);
      s.gen_of_id.resize(id + 1, 0);
    }
    s.base_of_id[id] = base;
    s.gen_of_id[id] = b.generation;
    if (s.request_of_id.size() <= id) s.request_of_id.resize(id + 1, 0);
    s.request_of_id[id] = b.request;
    forget_expected_locked(s, base);
    if (auto birth = s.birth_of.find(base); birth != s.birth_of.end() && s.recording)
      s.id_of_birth[birth->second] = static_cast<std::int64_t>(id);
  }
  if (!s.recording) return;
  auto [sit, new_stream] = s.stream_ids.emplace(reinterpret_cast<std::uintptr_t>(stream),
                                                s.stream_count);
  if (new_stream) s.stream_count++;
  auto key_op = s.access_of_id_op.find(id);
  if (key_op != s.access_of_id_op.end() && s.trace.accesses[key_op->second].op == s.op) return;
  graph::TraceAccess a;
  a.op = static_cast<std::uint32_t>(std::max<std::int64_t>(s.op, 0));
  a.block = id;
  a.bytes = b.size;
  a.access = graph::Access::Read;
  a.stream = sit->second;
  a.time_s = step_time_locked(s);
  s.access_of_id_op[id] = s.trace.accesses.size();
  s.first_access_of_id.emplace(id, s.trace.accesses.size());
  s.trace.accesses.push_back(a);
  sample_other_locked(s, true);
  if (s.executing) {
    // The step must repeat the recording the plan came from, access by access; a block may
    // have another size (see the file's comment).
    const std::size_t k = s.trace.accesses.size() - 1;
    const auto& planned = s.plan_trace.accesses;
    if (k >= planned.size() || planned[k].block != a.block || planned[k].op != a.op ||
        a.block >= s.request_of_id_planned.size()) {
      s.executing = false;
      s.replan = true;  // this step's recording becomes the plan
      s.pending.clear();
      stats.deviations++;
    } else {
      s.size_of_id[a.block] = a.bytes;  // the plan's prefetches and evictions find it
      if (b.request > s.request_of_id_planned[a.block]) s.outgrew_plan = true;
    }
  }
}

void Swapper::Impl::on_unpin_locked(StepState& s, SwapBlock& b, bool wrote) {
  s.after_unpin = true;
  if (s.executing && b.pins == 0 && !s.deferred.empty()) issue_deferred_locked(s, key(b.base));
  if (!s.recording || !wrote) return;
  auto it = s.id_of.find(key(b.base));
  if (it == s.id_of.end()) return;
  auto acc = s.access_of_id_op.find(it->second);
  if (acc == s.access_of_id_op.end()) return;
  graph::TraceAccess& a = s.trace.accesses[acc->second];
  // A block born in this step is first written (an activation); one that existed before is
  // read and written (persistent state such as weights or optimizer moments).
  bool first_access = s.first_access_of_id.at(a.block) == acc->second;
  const bool pre_existing = b.born < s.begin_tick;
  a.access = first_access && !pre_existing ? graph::Access::Write : graph::Access::ReadWrite;
}

void Swapper::Impl::on_birth_locked(StepState& s, SwapBlock& b) {
  if (!s.in_step) return;
  b.scope = s.scope;  // its plan says when it is used, as after a pin in the scope
  const std::uint64_t k = s.births++;
  if (s.recording) {
    s.birth_of[key(b.base)] = k;
    s.id_of_birth.push_back(-1);
    s.request_of_birth.push_back(b.request);
  }
  if (!s.executing || k >= s.id_of_birth_planned.size() || s.id_of_birth_planned[k] < 0 ||
      s.request_of_birth_planned[k] != b.request)
    return;
  const auto id = static_cast<std::uint64_t>(s.id_of_birth_planned[k]);
  if (id < s.base_of_id.size() && s.base_of_id[id] != 0) return;  // taken: off the plan
  if (auto old = s.expected_base_of_id.find(id); old != s.expected_base_of_id.end())
    s.expected_id_of.erase(old->second);
  s.expected_id_of[key(b.base)] = {id, b.generation};
  s.expected_base_of_id[id] = key(b.base);
}

void Swapper::Impl::forget_expected_locked(StepState& s, std::uintptr_t base) {
  auto it = s.expected_id_of.find(base);
  if (it == s.expected_id_of.end()) return;
  auto back = s.expected_base_of_id.find(it->second.id);
  if (back != s.expected_base_of_id.end() && back->second == base)
    s.expected_base_of_id.erase(back);
  s.expected_id_of.erase(it);
}

}  // namespace spill

// Recording steps as graph::Traces, planning from them, and executing the plan on later steps,
// for each step scope on its own. A plan's blocks are numbered in the order of first pin in
// the step it was made from. A later step gives each block it pins the plan's id of the same
// block: a block from before the step (weights, optimizer state) by its base and generation,
// as the latest step left it (or by its place, when the plan's block there is gone: blocks
// that change roles, as SAM's weights; never the id of a block the plan's step made); a block
// made in the step by its place (the plan's block first pinned where the step is: at the plan
// access the step expects next, its cursor, or right after the plan's accesses of the block
// the step pinned last, there not an id whose block of the latest step lives on unseen; the
// id of a block freed in the step passes to the next one made there, as a second
// micro-batch's activation, a life of its own wherever the cache put it, and is found at each
// block it passed to in the plan's step),
// else by its birth (below); a block the plan does not know gets an id past the plan's. An
// access the plan has at the cursor follows the plan. Else the step has left its plan (a
// deviation, counted once a step) and resynchronises: to the block's next access in
// the plan within kShortSkip accesses (the plan's ops between were skipped: a dropped layer,
// an expert without tokens; their evictions are issued, and their prefetches for uses not
// skipped), or to where the plan has this block right after the step's previous one (ahead,
// else behind: a step with more micro-batches runs the plan's ops again); an access found
// nowhere (an op the plan did not record) is served reactively while the plan waits at its
// cursor. The plan's prefetches and evictions go by the cursor's plan op, so they keep
// hiding copies in the parts that match. After kGiveUp accesses in a row off the plan the
// step stops following it. At its end, a step that found blocks from before it that the
// plan's step made (optimizer state a first step creates; found by their own id of the latest
// step, not by a place that a new block such as the next batch may take) becomes the next
// plan, even one that followed its plan exactly (that plan has them made in its step and never
// prefetches them); a step that left its plan becomes the next plan if it had accesses the
// plan lacks, skipped at most kShortSkip of the plan's accesses (none: more micro-batches; a
// few: a second step's one-off op) or more than half of them, or had the very accesses of the
// step before it (the steps settled on a shape the plan does not have: a momentum encoder's
// second step does more than the rest); so a first step that differs from the rest costs one
// deviation, not a re-recording per step. One that only skipped some of the plan's ops keeps
// the plan (it covers the steps like it). A step that left its plan counts in steps_resynced,
// not steps_planned. A step that ran a layer its plan's step skipped (it pinned blocks from
// before the plan's step that the plan lacks: a dropped layer's weights) is spliced into the
// plan: the next plan is the step's recording with the plan's accesses it skipped put back
// where the plan had them (the longest common subsequence of the two, blocks from before the
// step weighing more than blocks made in it, whose ids are only their places), so that under
// stochastic depth the plan comes to hold every layer seen and a step runs a subset of it. A
// step following a spliced plan that ran no such layer and had fewer accesses than the plan
// keeps it, even when it skipped more than half of it or had accesses the plan lacks where it
// ran (blocks made in the step that took another place's id). Merging steps otherwise (the
// union of their ops) was tried and not kept: the cursor wandered over the repeated blocks of
// the union, and the plan grew each step. A block's size is no part of its identity: the
// caching allocator serves a request from a cached block up to a quarter larger, so what the
// cache holds decides a block's size (an activation of torchvision's mobilenet_v3_small took
// 640 KiB in one step and 512 KiB in the next, alternately), and a step's tensors may change
// size from step to step (batches padded to their own longest sequence: the same ops at
// another length). The plan follows a block at its size of this step; a step in which a block
// outgrows the size the plan had for it makes the plan again at the largest sizes seen since
// (each block, and each op's memory the recording did not show, at least as large as the
// plan's), so that the plan leaves room for a step as large as any before it. A block made
// during the step is known from its birth (the step's n-th large allocation, by its request)
// when the plan's recording had one there, before its first pin (until the step leaves its
// plan, which shifts the births): a gradient the backward makes and the optimizer pins
// first. A recorded access's time is the time since the step
// began less the host's waits inside the swapper meanwhile (demand fetches, late prefetches,
// room): the plan's op times are the compute it hides copies behind, even when the recorded
// step stalled (a first, reactive step mostly waits).
//
// Variants (spill_step_key): steps that differ in their blocks from one kind of step to
// another, not only in their sizes (batches of two lengths where a tensor is under
// swap_threshold at one, unseen by the swapper, and over it at the other), would leave the
// plan at each change of kind and be recorded again. A step the caller keys (offload: by its
// first forward's argument shapes) ends with its key on the plan it ended on: the plan it
// followed, or the one it made; a step of a key its plan has not had that makes a plan of
// its own keeps the plan it left, with that plan's keys, among the scope's variants (up to
// kPlanVariants plans in all, the least recently followed dropped; a new plan whose accesses
// are a variant's, numbered in order of first access, takes that variant's keys and replaces
// it). A step keyed before its first pin whose key is another variant's, or nearer to another
// variant's keys than to its plan's (keys near as numbers are steps alike), switches to that
// plan there: the plans swap (PlanFields), the births so far are matched to its recording's, what
// it has on the host at its start is evicted and what it has resident and its first ops'
// prefetches are brought in. A keyed step that left its plan with other accesses than its
// recording's, when its key is new to the plan or the plan has others too, makes its own plan
// and takes its key there, even if it only skipped part of that one (a narrow step following a
// wide plan: kept, that plan would be left each time the narrow key came; a wide step keyed
// narrow once would leave the narrow key on the wide plan), unless it used blocks from before
// it that the plan lacks or stayed within a spliced plan (layers skipped at random are spliced
// into one plan, keys or not); a step that left its plan only to skip part of it otherwise
// leaves its key with the variant that has it.
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
#include <optional>

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
  s.id_of.clear();
  s.request_of_id.clear();
  s.existed_of_id.clear();
  s.base_of_id.clear();
  s.gen_of_id.clear();
  s.access_of_id_op.clear();
  s.first_access_of_id.clear();
  s.births = 0;
  s.birth_of.clear();
  s.id_of_birth.clear();
  s.request_of_birth.clear();
  s.op_of_birth.clear();
  s.born_before_pin.clear();
  s.expected_id_of.clear();
  s.expected_base_of_id.clear();
  s.deferred.clear();
  s.other_bytes.clear();
  s.t0_ns = profiling::TraceRecorder::global().now_ns();
  release_marks_locked(s);
  s.timing = StepState::Timing::Undecided;
  s.marked_op = -1;
  s.waited0_ns = waited_ns;
  s.last_time_s = 0;
  s.begin_tick = ++tick;
  s.fresh_bytes = 0;  // every block is older now
  s.outgrew_plan = false;
  s.recording = opt.policy == SwapPolicy::Plan && opt.budget > 0;
  follow_plan_from_start_locked(s);
  s.deviated = false;
  s.misses = 0;
  s.extras = 0;
  s.matched = 0;
  s.plan_made_older = false;
  s.prev_block = -1;
  s.step_key.reset();
  s.unplanned_old = 0;
  if (!s.executing) s.pending.clear();  // else: prefetches issued at the previous step's end
  if (s.recording) {
    s.trace = graph::Trace{};
    s.trace_starts.clear();
  }
}

void Swapper::Impl::follow_plan_from_start_locked(StepState& s) {
  // A plan that cannot meet the budget everywhere still schedules the rest; the ops it cannot
  // fit fall back to reactive eviction.
  s.executing = s.recording && !s.replan && !s.plan.steps.empty();
  s.planned_step = s.executing;
  s.plan_ids = s.executing ? s.use_ops.size() : 0;
  s.next_id = s.plan_ids;
  s.cursor = 0;
  s.plan_op = -1;
  s.prefetched_upto = 0;
  s.evicted_upto = 0;
  // Blocks the plan starts on the host should already be there from the previous step's end;
  // the plan's evictions put them back each step.
  if (s.executing) s.lookahead = std::max(0, s.lookahead - 1);
}

namespace {

// A step that left its plan jumps ahead to the block's next access in the plan when it is at
// most this many accesses on (ops the step skipped: a dropped layer, an expert without
// tokens); farther, or back, only where the step's previous access precedes it in the plan.
// A step that skipped no more of its plan's accesses than this becomes the plan.
constexpr std::size_t kShortSkip = 4;
// Consecutive accesses off the plan after which the step stops following it.
constexpr std::size_t kGiveUp = 256;

// A recording's blocks numbered in the order of first access (the identity a recording
// becomes a plan with): new_of[id], -1 for an id no access has. Within a step an id stays
// with its base, and one the plan has may pass to a later block (id_for_block_locked): ids
// are not blocks' lives, as before.
std::vector<std::int64_t> renumbering(const graph::Trace& t, std::uint64_t ids) {
  std::vector<std::int64_t> new_of(ids, -1);
  std::int64_t next = 0;
  for (const graph::TraceAccess& a : t.accesses)
    if (new_of[a.block] < 0) new_of[a.block] = next++;
  return new_of;
}

graph::Trace renumbered(graph::Trace t, const std::vector<std::int64_t>& new_of) {
  for (graph::TraceAccess& a : t.accesses) a.block = static_cast<std::uint64_t>(new_of[a.block]);
  return t;
}

// A recording's accesses with its blocks numbered in their order of first access, hashed
// (`ids`: above every block id in it): steps with the same are the same variant.
std::uint64_t shape_of(const graph::Trace& t, std::uint64_t ids) {
  const std::vector<std::int64_t> new_of = renumbering(t, ids);
  std::uint64_t h = t.accesses.size();
  for (const graph::TraceAccess& a : t.accesses)
    h = (h ^ (static_cast<std::uint64_t>(new_of[a.block]) << 20 ^ a.op)) * 0x100000001b3ull;
  return h;
}

template <typename T>
void renumber_vector(std::vector<T>& v, const std::vector<std::int64_t>& new_of,
                     std::size_t count) {
  std::vector<T> out(count, T{});
  for (std::size_t id = 0; id < v.size() && id < new_of.size(); ++id)
    if (new_of[id] >= 0) out[new_of[id]] = v[id];
  v = std::move(out);
}

}  // namespace

void Swapper::Impl::set_prev_identity_locked(StepState& s) {
  s.prev_id_of_base.clear();
  for (std::size_t id = 0; id < s.base_of_id_prev.size(); ++id)
    if (s.base_of_id_prev[id] != 0) s.prev_id_of_base[s.base_of_id_prev[id]] = id;
}

void Swapper::Impl::end_step_locked(StepState& s) {
  if (!s.in_step) return;
  s.in_step = false;
  // Turns of blocks freed since are forgotten (another block may come at their address).
  for (auto it = s.turns.begin(); it != s.turns.end();) {
    auto b = blocks.find(it->first);
    if (b == blocks.end() || b->second.generation != it->second.generation) {
      it = s.turns.erase(it);
      continue;
    }
    if (it->second.next != 0) {
      auto next = blocks.find(it->second.next);
      if (next == blocks.end() || next->second.generation != it->second.next_generation)
        it->second.next = 0;
    }
    ++it;
  }
  if (s.executing) {
    (s.deviated ? stats.steps_resynced : stats.steps_planned)++;
    // The last ops' evictions (tensors idle across the step boundary, such as weights).
    for (; s.evicted_upto < s.plan.steps.size(); ++s.evicted_upto)
      issue_evictions_locked(s, static_cast<std::int64_t>(s.evicted_upto));
  }
  // Blocks still pinned now stay: the next step's first prefetches are about to be issued.
  s.deferred.clear();
  s.executing = false;
  s.pending.clear();
  if (!s.recording) {
    s.base_of_id_prev = s.base_of_id;
    s.gen_of_id_prev = s.gen_of_id;
    set_prev_identity_locked(s);
    return;
  }
  s.recording = false;
  s.trace.step_end_s = step_time_locked(s);
  // Whether a step that left its plan becomes the plan (see the file's comment). The step's
  // shape: its blocks in order, as the plan's ids name them.
  std::uint64_t shape = s.trace.accesses.size();
  for (const graph::TraceAccess& a : s.trace.accesses)
    shape = (shape ^ a.block) * 0x100000001b3ull;
  const bool same_shape = shape == s.last_shape;
  const std::uint64_t shape_before = s.last_shape;
  s.last_shape = shape;
  const std::size_t planned_accesses = s.plan_trace.accesses.size();
  // A step that found state its plan's step made becomes the plan even when it followed the
  // plan exactly (its accesses repeat the first step's): the plan has that state made in its
  // step, so it would never prefetch it.
  // A spliced plan holds more than any one step runs: a shorter step that ran no layer the
  // plan lacks keeps it (its accesses off the plan are blocks it made that took other places).
  const bool within_spliced = s.plan_spliced && s.unplanned_old == 0 &&
                              s.trace.accesses.size() < planned_accesses;
  // A keyed step that left its plan and had other accesses than the plan's recording (in their
  // order of first access) is another variant, when its key is new to the plan or the plan has
  // other keys too: it makes a plan of its own and the plan it leaves is kept for its other
  // keys, even when skipping part of it alone would keep it (a narrow step following a wide
  // plan would leave it again each time its key came; a wide step keyed narrow once gave its
  // plan the narrow key, and the narrow steps then followed the wide plan). Not a step that
  // ran layers its plan lacks, nor one within a spliced plan: stochastic depth's steps (over
  // batches of several lengths too) come to follow one plan of every layer, as before.
  const bool new_key = s.step_key && !s.keys.empty() && !s.has_key(*s.step_key);
  const bool other_variant =
      s.deviated && s.planned_step && s.step_key && !s.keys.empty() &&
      (new_key || s.keys.size() > 1) && s.unplanned_old == 0 && !within_spliced &&
      shape_of(s.trace, s.next_id) != s.shape;
  if (s.plan_made_older ||
      (s.deviated && ((s.extras > 0 && !within_spliced) || same_shape || other_variant ||
                      s.matched + kShortSkip >= planned_accesses ||
                      (s.matched * 2 < planned_accesses && !within_spliced))))
    s.replan = true;
  const bool keeps_plan = s.planned_step && !s.replan;
  if (other_variant) {
    s.variants.push_back(static_cast<const PlanFields&>(s));
    s.variants.back().last_shape = shape_before;
    s.keys.clear();
  }
  bool spliced = false;
  // A step that followed its plan with a block made by a larger request than the plan had
  // (a longer sequence) is planned again, at the largest sizes seen since the plan's
  // recording, so that a later step as large as this one finds the room its evictions make.
  const bool outgrew = keeps_plan && s.outgrew_plan && !s.deviated;
  if ((!keeps_plan || outgrew) && s.timing == StepState::Timing::Device) time_on_device_locked(s);
  if (keeps_plan) {
    // The plan's blocks as this step left them; a block of the plan the step did not touch (a
    // layer it skipped) keeps the base it had, which its generation still checks.
    s.base_of_id_prev.resize(s.plan_ids, 0);
    s.gen_of_id_prev.resize(s.plan_ids, 0);
    for (std::size_t id = 0; id < s.plan_ids && id < s.base_of_id.size(); ++id) {
      if (s.base_of_id[id] == 0) continue;
      s.base_of_id_prev[id] = s.base_of_id[id];
      s.gen_of_id_prev[id] = s.gen_of_id[id];
    }
  } else {
    // A step that ran layers its plan lacks: the plan's accesses it skipped are spliced in.
    if (s.planned_step && s.deviated && s.unplanned_old > 0 && !s.plan_made_older &&
        !other_variant)
      spliced = splice_into_plan_locked(s);
    // A new plan from this recording: its blocks are numbered in the order of first access,
    // as the next step will find them.
    const std::vector<std::int64_t> new_of = renumbering(s.trace, s.next_id);
    const std::size_t count = static_cast<std::size_t>(
        std::count_if(new_of.begin(), new_of.end(), [](std::int64_t v) { return v >= 0; }));
    s.trace = renumbered(std::move(s.trace), new_of);
    renumber_vector(s.base_of_id, new_of, count);
    renumber_vector(s.gen_of_id, new_of, count);
    renumber_vector(s.request_of_id, new_of, count);
    renumber_vector(s.existed_of_id, new_of, count);
    for (auto it = s.turns.begin(); it != s.turns.end();) {
      const std::uint64_t id = it->second.id;
      if (id >= new_of.size() || new_of[id] < 0) {
        it = s.turns.erase(it);  // no access of the new plan's step has it
      } else {
        it->second.id = static_cast<std::uint64_t>(new_of[id]);
        ++it;
      }
    }
    for (std::int64_t& id : s.id_of_birth)
      if (id >= 0) id = static_cast<std::size_t>(id) < new_of.size() ? new_of[id] : -1;
    for (auto it = s.id_of.begin(); it != s.id_of.end();) {
      const std::int64_t id = it->second < new_of.size() ? new_of[it->second] : -1;
      if (id < 0) {
        it = take_id_locked(s, it);
      } else {
        it->second = static_cast<std::uint64_t>(id);
        ++it;
      }
    }
    s.next_id = count;
    s.base_of_id_prev = s.base_of_id;
    s.gen_of_id_prev = s.gen_of_id;
  }
  set_prev_identity_locked(s);
  // A step that left its plan and kept it (it only skipped some of it: a narrow variant
  // following a wide one's plan, keyed too late to switch) leaves its key to its own variant.
  claim_step_key_locked(s, !(keeps_plan && s.deviated));
  s.followed_tick = s.begin_tick;
  if (keeps_plan && !outgrew) {  // the step followed its plan (or found it again): keep it
    s.last_trace = s.deviated ? renumbered(s.trace, renumbering(s.trace, s.next_id)) : s.trace;
    last_trace_any = s.last_trace;
    last_trace_any_scope = s.scope;
    return;
  }
  s.last_trace = s.trace;
  last_trace_any = s.trace;
  last_trace_any_scope = s.scope;
  s.replan = false;
  s.plan_begin_tick = s.begin_tick;
  s.plan_spliced = spliced;
  stats.steps_recorded++;
  s.plan = graph::Plan{};
  s.size_of_id.assign(s.next_id, 0);  // this step's blocks, as the next step finds them
  for (const graph::TraceAccess& a : s.trace.accesses)
    s.size_of_id[a.block] = std::max<std::size_t>(s.size_of_id[a.block], a.bytes);
  // One size a block (a recording's id passed from a freed block to a later one at another
  // size would make it two).
  for (graph::TraceAccess& a : s.trace.accesses) a.bytes = s.size_of_id[a.block];
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
  s.plan_starts = s.trace_starts;
  // The recording's accesses in their order of first access: a variant whose plan has the
  // same is this one (a key's step followed another variant's plan and found it was this
  // one's), and its keys join this plan. At most kPlanVariants plans are kept.
  s.shape = shape_of(s.trace, s.next_id);
  for (auto v = s.variants.begin(); v != s.variants.end();) {
    if (v->shape != s.shape) {
      ++v;
      continue;
    }
    for (std::uint64_t k : v->keys)
      if (!s.has_key(k)) s.keys.push_back(k);
    v = s.variants.erase(v);
  }
  while (s.variants.size() >= StepState::kPlanVariants) {
    auto oldest = std::min_element(
        s.variants.begin(), s.variants.end(),
        [](const PlanFields& a, const PlanFields& b) { return a.followed_tick < b.followed_tick; });
    s.variants.erase(oldest);
  }
  s.plan_other_bytes = s.other_bytes;
  s.request_of_id_planned = s.request_of_id;
  s.existed_of_id_planned = s.existed_of_id;
  s.plan_bytes_of_id.assign(s.next_id, 0);
  s.id_of_birth_planned = s.id_of_birth;
  s.request_of_birth_planned = s.request_of_birth;
  s.use_ops.assign(s.next_id, {});
  s.plan_positions.assign(s.next_id, {});
  s.plan_op_ids.clear();
  for (const graph::TraceAccess& a : s.trace.accesses) {
    s.plan_positions[a.block].push_back(
        static_cast<std::size_t>(&a - s.trace.accesses.data()));
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
  if (!spliced) live_from_birth_locked(s, g);
  // A block made in the step and alive at its end (a parameter's gradient, kept to the next
  // zero_grad) holds its memory past its last access: held to the step's end, where the plan
  // may evict it for the rest of the step. Before, the graph freed it there, so the plan counted
  // room it did not have: on the CPU bridge at a third of the footprint (2026-12-08, two runs
  // each, simulated link), the planned steps' reactive evictions went from 0-27 to 0-1 per
  // model and their stall fell (the GPT's from 0.9-2.5 ms to 0.2-0.5, the MLP's from 6.7-9.0
  // to 3.3-5.5).
  for (graph::Tensor& t : g.tensors) {
    if (t.kind != graph::TensorKind::Activation || t.id >= s.base_of_id.size() ||
        s.base_of_id[t.id] == 0)
      continue;
    auto b = blocks.find(s.base_of_id[t.id]);
    t.held_to_step_end = b != blocks.end() && b->second.generation == s.gen_of_id[t.id];
  }
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
  evict_plan_start_locked(s);
}

void Swapper::Impl::evict_plan_start_locked(StepState& s) {
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

std::optional<std::uintptr_t> Swapper::Impl::base_for_id_locked(StepState& s, std::int64_t id,
                                                                bool next_use) {
  if (id < 0) return std::nullopt;
  auto idx = static_cast<std::size_t>(id);
  std::uintptr_t base = 0;
  std::uint64_t generation = 0;
  bool latest_step = false;  // the block is the latest step's (between steps: the one ended)
  if (idx < s.base_of_id.size() && s.base_of_id[idx] != 0) {
    base = s.base_of_id[idx];
    generation = s.gen_of_id[idx];
    latest_step = !s.in_step;
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
    latest_step = true;
  }
  if (base == 0) return std::nullopt;
  if (next_use && latest_step) {
    // A block that took turns under the id: the next turn is the block that came after it the
    // latest time (the next batch of the list, the next head), when it is still that block.
    auto turn = s.turns.find(base);
    if (turn != s.turns.end() && turn->second.generation == generation &&
        turn->second.id == idx) {
      if (turn->second.next == 0) return std::nullopt;  // unknown: no prefetch of another one
      base = turn->second.next;
      generation = turn->second.next_generation;
    }
  }
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
  // The plan's op the step is at; between steps: before the next one's op 0.
  const std::int64_t now = s.in_step ? s.plan_op : -1;
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
    // Between steps, the ended step's turn under an id that the block after it takes next.
    if (!s.in_step && turn_over_locked(s, key(b.base), b, it->second)) return kLaterTurn;
    id = static_cast<std::int64_t>(it->second);
  } else if (auto e = s.expected_id_of.find(key(b.base));
             e != s.expected_id_of.end() && e->second.generation == b.generation) {
    id = static_cast<std::int64_t>(e->second.id);
  } else if (auto p = s.prev_id_of_base.find(key(b.base));
             p != s.prev_id_of_base.end() && s.gen_of_id_prev[p->second] == b.generation) {
    // The latest step's turn under an id that another block takes in this step (the previous
    // batch of a list) is next used in a later step, after the blocks this plan uses next.
    if (s.in_step && turn_over_locked(s, key(b.base), b, p->second)) return kLaterTurn;
    id = static_cast<std::int64_t>(p->second);
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
  // The op the plan expects next: where the step is, unless this op is one the plan does not
  // have (then the plan waits there).
  const auto& planned = s.plan_trace.accesses;
  follow_to_locked(s, s.cursor < planned.size() ? planned[s.cursor].op
                                                : static_cast<std::int64_t>(planned.back().op) + 1);
  wanted = std::move(s.pending);
  s.pending.clear();
  reap_locked();
  return wanted;
}

void Swapper::Impl::follow_to_locked(StepState& s, std::int64_t op) {
  s.plan_op = op;
  const graph::Plan& p = s.plan;
  const std::size_t n = p.steps.size();
  // Evictions after the plan ops now passed: their work is enqueued and their blocks unpinned.
  for (; s.evicted_upto < n && s.plan_op_ids[s.evicted_upto] < op; ++s.evicted_upto)
    issue_evictions_locked(s, static_cast<std::int64_t>(s.evicted_upto));
  for (auto it = s.deferred.begin(); it != s.deferred.end();) {
    const std::uintptr_t base = (it++)->first;  // issue_deferred_locked may erase its entry
    issue_deferred_locked(s, base);
  }
  // Prefetches due by this op (the first plan op not passed) and the adaptive look-ahead; of
  // those due at plan ops the step skipped, only the ones for a use not skipped too.
  const std::size_t upto = std::min(n, s.evicted_upto + 1 + static_cast<std::size_t>(s.lookahead));
  for (std::size_t j = s.prefetched_upto; j < upto; ++j) {
    for (graph::TensorIndex t : p.steps[j].prefetch_at) {
      if (s.tensor_id[t] < 0) continue;
      const auto id = static_cast<std::uint64_t>(s.tensor_id[t]);
      const auto& uses = s.use_ops[id];
      auto use = std::lower_bound(uses.begin(), uses.end(), s.plan_op_ids[j]);
      if (use != uses.end() && static_cast<std::int64_t>(*use) < op) continue;
      s.pending.push_back({id});
    }
  }
  s.prefetched_upto = std::max(s.prefetched_upto, upto);
}

std::vector<PlannedPrefetch> Swapper::Impl::next_step_prefetches_locked(StepState& s) {
  std::vector<PlannedPrefetch> wanted;
  if (s.replan || s.plan.steps.empty() || s.in_step) return wanted;
  first_ops_prefetches_locked(s, wanted);
  if (s.fresh_plan) {
    // The step that made this plan ran without it: what the plan has resident at its start
    // may be on the host. Bring it back in the order of first use (into free room, or room
    // made from blocks needed later; the rest waits for the next step's ops).
    s.fresh_plan = false;
    for (std::uint64_t id : resident_at_start_locked(s)) wanted.push_back({id});
  }
  return wanted;
}

void Swapper::Impl::first_ops_prefetches_locked(const StepState& s,
                                                std::vector<PlannedPrefetch>& wanted) const {
  const std::size_t upto = std::min(s.plan.steps.size(), 1 + static_cast<std::size_t>(s.lookahead));
  for (std::size_t j = 0; j < upto; ++j)
    for (graph::TensorIndex t : s.plan.steps[j].prefetch_at)
      if (s.tensor_id[t] >= 0) wanted.push_back({static_cast<std::uint64_t>(s.tensor_id[t])});
}

std::vector<std::uint64_t> Swapper::Impl::resident_at_start_locked(const StepState& s) const {
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
  std::vector<std::uint64_t> ids;
  ids.reserve(resident.size());
  for (const auto& [first, id] : resident) ids.push_back(id);
  return ids;
}

std::vector<PlannedPrefetch> Swapper::Impl::moved_since_plan_locked(StepState& s) {
  std::vector<PlannedPrefetch> wanted;
  if (!s.executing) return wanted;
  for (std::uint64_t id : resident_at_start_locked(s)) {
    auto base = base_for_id_locked(s, static_cast<std::int64_t>(id), /*next_use=*/true);
    if (!base) continue;
    const SwapBlock& b = blocks.at(*base);
    if (b.state == Residence::OnHost || b.state == Residence::SwappingOut) wanted.push_back({id});
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
    auto found = base_for_id_locked(s, static_cast<std::int64_t>(w.id), /*next_use=*/true);
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
    if (swap_in(lock, base, true, on_stream ? RoomWait::SwapOutsThenCache : RoomWait::None))
      continue;
    if (!s.follows_plan()) continue;
    // No room: evict what is needed after this block, and try again at the next op.
    const std::size_t room = backend.room();
    make_room_locked(size > room ? size - room : 0, next_use_of_id_locked(s, w.id));
    s.pending.push_back(w);
  }
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

void Swapper::Impl::live_from_birth_locked(StepState& s, graph::Graph& g) {
  // A block made in the step and first pinned ops after its birth held its memory from the
  // op it was born in: there it is written (the graph's tensor is live from that op, and the
  // plan may move it once it is idle). The memory sampled in the ops between counts it too
  // (unpinned: sample_other_locked), which errs toward room; taken out of those samples, the
  // plans of the CPU bridge's GPT and MoE at a third had more demand fetches (2026-12-05).
  std::unordered_map<std::uint64_t, graph::TensorIndex> tensor_of;
  for (std::size_t t = 0; t < g.tensors.size(); ++t)
    tensor_of.emplace(g.tensors[t].id, static_cast<graph::TensorIndex>(t));
  const auto op_index = [&](std::uint32_t op) {  // the last plan op at or before `op`
    auto it = std::upper_bound(s.plan_op_ids.begin(), s.plan_op_ids.end(), op);
    return it == s.plan_op_ids.begin() ? std::size_t{0}
                                       : static_cast<std::size_t>(it - s.plan_op_ids.begin()) - 1;
  };
  for (const auto& [index, born] : s.born_before_pin) {
    if (index >= s.trace.accesses.size()) continue;
    const graph::TraceAccess& a = s.trace.accesses[index];
    const std::size_t from = op_index(born), first = op_index(a.op);
    auto t = tensor_of.find(a.block);
    if (from >= first || t == tensor_of.end()) continue;
    std::vector<graph::TensorIndex>& writes = g.ops[from].writes;
    if (std::find(writes.begin(), writes.end(), t->second) == writes.end())
      writes.push_back(t->second);
  }
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
  // The tracked blocks not on the host (the swapper's resident bytes), and those of them born
  // in the step that no pin has touched yet (kept as they change: StepState::fresh_bytes).
  const std::size_t tracked = stats.resident_bytes;
  const std::size_t fresh = at_pin && device_timed ? 0 : s.fresh_bytes;
  const auto op = static_cast<std::size_t>(std::max<std::int64_t>(s.op, 0));
  if (s.other_bytes.size() <= op) s.other_bytes.resize(op + 1, 0);
  const std::size_t cached = device_timed ? backend.cached_bytes() : 0;
  const std::size_t held = tracked + cached;
  const std::uint64_t other = (mapped > held ? mapped - held : 0) + fresh;
  s.other_bytes[op] = std::max(s.other_bytes[op], other);
}

std::uint64_t Swapper::Impl::id_for_block_locked(StepState& s, const SwapBlock& b) {
  if (!s.executing) return s.next_id++;
  const std::uintptr_t base = key(b.base);
  // An id is taken while its block of this step lives (a block freed in the step leaves its
  // id to the next one the plan has there: the next micro-batch's activation).
  const auto taken = [&](std::uint64_t id) {
    if (id >= s.base_of_id.size() || s.base_of_id[id] == 0) return false;
    auto it = blocks.find(s.base_of_id[id]);
    return it != blocks.end() && it->second.generation == s.gen_of_id[id];
  };
  // The plan's block first accessed at position j (its id's first, or a later block its id
  // passed to in the plan's step: a second task's activation in MAML), if it can be this
  // one: not taken, of this request if its id had a block freed in this step (not of this
  // size: the cache may give a request a block up to a quarter larger, as it holds), not one
  // the plan's step made when this one is from before the step (each keeps its own id:
  // optimizer state made in a first step is found by its id of the latest step), and not the
  // id of a block from before the plan's step that lives on unseen by this step (a skipped
  // layer's weight).
  // The latest step's block of an id the plan's step made may live on a little, as a Python
  // variable holds a tensor until it is assigned the next step's: at the cursor its id is
  // this block's; found only by a neighbour (`at_cursor` false) it is not, since that block
  // may be state the plan's step made, which takes its id back when pinned. Before, an MLP's
  // activation took the id of Adam's state that way in the second step (the plan has the
  // state's first access right after a weight's), the state took it back later by its own
  // id, and the plan made from that step had one block live from the activation to the
  // optimizer: the third step left it.
  // A block from before the step that no step has pinned yet, of the size of that living
  // block, may take its id at the cursor all the same: the next of a list of batches made
  // before the loop, the previous one kept by the list. Before, every such batch was taken for
  // a block the plan did not have, and no step of the loop followed its plan (audit 39a F3: 0
  // of 16 steps planned, 193 demand fetches against 26 with batches made in each step). Not a
  // block a step used before at first: that one takes the id once the id's block has taken
  // turns (below).
  const bool new_from_before = b.born < s.begin_tick && !b.stepped;
  // A block from before the step: the plan's id it had in the latest step, if the plan has it
  // here or the plan's block here cannot be this one; else the plan's block here (blocks that
  // change roles: SAM's weights are the previous step's copies, `p.data = old_p`).
  std::optional<std::uint64_t> was;
  if (b.born < s.begin_tick) {
    auto p = s.prev_id_of_base.find(base);
    if (p != s.prev_id_of_base.end() && p->second < s.plan_ids &&
        s.gen_of_id_prev[p->second] == b.generation && !taken(p->second))
      was = p->second;
  }
  // Once blocks have taken turns under an id (PlanFields::turns: the list's batches, heads
  // chosen round-robin, two models alternating in one scope), a block from before the step
  // that a step used before takes it too at the cursor, in the place of the latest step's
  // block, which lives on: the list's second epoch, the heads' second round. Not a block the
  // latest step used (its id of that step comes first), so a layer's weight takes no
  // skipped layer's id under stochastic depth. Before, blocks a step used before never took
  // another's id (review 39c: taking it without the turns noted, the plan's prefetches of
  // the id brought in the latest step's block each step, 40 demand fetches against 20), and
  // every step of a list's later epochs left its plan (the CPU bridge's MLP over a list of 8
  // batches, 2026-12-07: 0 of 8 steps planned an epoch, 66-123 demand fetches; now 8 of 8
  // and 0-2).
  const auto next_turn = [&](std::uint64_t id) {
    return b.born < s.begin_tick && !was && takes_turns_locked(s, s.base_of_id_prev[id], id);
  };
  const auto& planned = s.plan_trace.accesses;
  const auto fits = [&](std::size_t j, bool at_cursor) {
    if (j >= planned.size()) return false;
    const std::uint64_t id = planned[j].block;
    if (id >= s.plan_ids || !s.plan_starts[j] || taken(id)) return false;
    if (id < s.base_of_id.size() && s.base_of_id[id] != 0 && s.access_of_id_op.count(id) != 0 &&
        id < s.request_of_id.size() && s.request_of_id[id] != b.request)
      return false;
    if (b.born < s.begin_tick && planned[j].access == graph::Access::Write &&
        !(at_cursor && next_turn(id)))
      return false;
    if (id < s.base_of_id_prev.size() && s.base_of_id_prev[id] != 0) {
      auto old = blocks.find(s.base_of_id_prev[id]);
      if (old != blocks.end() && old->second.generation == s.gen_of_id_prev[id] &&
          (s.existed_of_id_planned[id] || !at_cursor) &&
          !(at_cursor && (new_from_before || next_turn(id)) && old->second.size == b.size)) {
        auto now = s.id_of.find(s.base_of_id_prev[id]);
        if (now == s.id_of.end() || now->second == id) return false;
      }
    }
    return true;
  };
  if (was && s.cursor < planned.size() && planned[s.cursor].block == *was) return *was;
  if (fits(s.cursor, true)) return planned[s.cursor].block;
  if (was) return *was;
  // Made in this step, or new to the plan (a model built again with the same shape): born
  // where the plan's recording had a block (the births are counted, so one more allocation
  // before it, as a cached block's, shifts them: the cursor went first), else after the
  // plan's accesses of the block the step accessed last.
  if (auto e = s.expected_id_of.find(base);
      e != s.expected_id_of.end() && e->second.generation == b.generation && !taken(e->second.id))
    return e->second.id;
  if (s.prev_block >= 0 && static_cast<std::uint64_t>(s.prev_block) < s.plan_ids) {
    std::optional<std::size_t> before;
    for (std::size_t p : s.plan_positions[s.prev_block]) {
      if (!fits(p + 1, false)) continue;
      if (p + 1 >= s.cursor) return planned[p + 1].block;
      before = p + 1;
    }
    if (before) return planned[*before].block;
  }
  return s.next_id++;
}

bool Swapper::Impl::takes_turns_locked(const StepState& s, std::uintptr_t base,
                                       std::uint64_t id) const {
  auto turn = s.turns.find(base);
  if (turn == s.turns.end() || turn->second.id != id) return false;
  auto b = blocks.find(base);
  return b != blocks.end() && b->second.generation == turn->second.generation;
}

bool Swapper::Impl::turn_over_locked(const StepState& s, std::uintptr_t base,
                                     const SwapBlock& b, std::uint64_t id) const {
  auto turn = s.turns.find(base);
  if (turn == s.turns.end() || turn->second.id != id || turn->second.generation != b.generation)
    return false;
  if (s.in_step && id < s.base_of_id.size() && s.base_of_id[id] != 0)
    return s.base_of_id[id] != base;  // another block took the id in this step
  if (turn->second.next == 0 || turn->second.next == base) return false;
  auto next = blocks.find(turn->second.next);  // the block after it last time, to take it next
  return next != blocks.end() && next->second.generation == turn->second.next_generation;
}

void Swapper::Impl::note_turn_locked(StepState& s, std::uintptr_t base, const SwapBlock& b,
                                     std::uint64_t id) {
  if (id >= s.base_of_id_prev.size()) return;
  const std::uintptr_t before = s.base_of_id_prev[id];
  if (before == 0) return;
  if (before == base) {
    // Its own id again (a weight; or a block that took turns and now takes the id step after
    // step, as a loop that stops rotating: the turn after its own is its own).
    auto turn = s.turns.find(base);
    if (turn != s.turns.end() && turn->second.id == id && turn->second.generation == b.generation) {
      turn->second.next = base;
      turn->second.next_generation = b.generation;
    }
    return;
  }
  auto old = blocks.find(before);
  if (old == blocks.end() || old->second.generation != s.gen_of_id_prev[id] ||
      old->second.size != b.size)
    return;  // freed since (the latest step's activation), or another block there
  s.turns[before] = {id, old->second.generation, base, b.generation};
  PlanFields::Turn& now = s.turns[base];
  if (now.generation != b.generation || now.id != id) now = {id, b.generation, 0, 0};
}

void Swapper::Impl::follow_access_locked(StepState& s, std::uint64_t id) {
  const auto& planned = s.plan_trace.accesses;
  std::optional<std::size_t> at;
  if (id < s.plan_ids) {
    const std::vector<std::size_t>& pos = s.plan_positions[id];
    auto next = std::lower_bound(pos.begin(), pos.end(), s.cursor);
    if (next != pos.end() && *next <= s.cursor + kShortSkip) {
      at = *next;
    } else if (s.prev_block >= 0) {
      // Where the plan has this block right after the step's previous one: nearest ahead,
      // else nearest behind (a micro-batch more than the plan had repeats its ops).
      for (std::size_t p : pos) {
        if (p == 0 || planned[p - 1].block != static_cast<std::uint64_t>(s.prev_block)) continue;
        at = p;
        if (p >= s.cursor) break;
      }
    }
  }
  if (!at || *at != s.cursor) {
    if (!s.deviated) {
      s.deviated = true;
      stats.deviations++;
    }
  }
  if (!at) {
    // An access the plan does not have here (an op it did not record): served as it comes;
    // the plan waits at its cursor.
    s.extras++;
    if (++s.misses > kGiveUp) {
      s.executing = false;  // nothing matched for too long: the rest of the step is reactive
      s.replan = true;
      s.pending.clear();
    }
    return;
  }
  // The previous access, not found, is the plan's just before this one: it was the first
  // after a skip longer than kShortSkip, not one the plan lacks.
  if (s.misses > 0 && *at > 0 && planned[*at - 1].block == static_cast<std::uint64_t>(s.prev_block))
    s.extras--;
  s.misses = 0;
  s.matched++;
  if (*at < s.cursor) {
    // Back in the plan: its ops from there on run again, their evictions and prefetches too.
    const std::uint32_t op = planned[*at].op;
    const auto j = static_cast<std::size_t>(
        std::lower_bound(s.plan_op_ids.begin(), s.plan_op_ids.end(), op) - s.plan_op_ids.begin());
    s.evicted_upto = std::min(s.evicted_upto, j);
    s.prefetched_upto = std::min(s.prefetched_upto, j);
  }
  s.cursor = *at + 1;
  if (planned[*at].op != s.plan_op) follow_to_locked(s, planned[*at].op);
}

void Swapper::Impl::on_pin_locked(StepState& s, SwapBlock& b, Stream stream) {
  if (!s.in_step) return;
  std::uintptr_t base = key(b.base);
  auto it = s.id_of.find(base);
  const bool fresh = it == s.id_of.end();
  if (fresh) it = give_id_locked(s, base, b, id_for_block_locked(s, b));
  b.stepped = true;
  std::uint64_t id = it->second;
  std::optional<std::uint32_t> born_op;  // the op a block new to the step's trace was born in
  if (fresh) {
    const bool id_new = id >= s.base_of_id.size() || s.base_of_id[id] == 0;
    if (!id_new && (s.base_of_id[id] != base || s.gen_of_id[id] != b.generation)) {
      // The id's block of this step was freed: this one follows it (see id_for_block_locked),
      // a life of its own, wherever the cache put it. Before, one made at the freed block's
      // very address was recorded as that block read again, and one made elsewhere as a new
      // life: a step's recording depended on the cache's choice of address, which differs
      // from step to step under swapping (a GRU's backward left each step's plan at the
      // points where the two steps' choices differed, 2026-12-07).
      if (s.base_of_id[id] != base) {  // (at this base, id_of holds this block's entry now)
        auto old = s.id_of.find(s.base_of_id[id]);
        if (old != s.id_of.end() && old->second == id) take_id_locked(s, old);
      }
      s.first_access_of_id.erase(id);
      s.access_of_id_op.erase(id);
    }
    if (s.base_of_id.size() <= id) {
      s.base_of_id.resize(id + 1, 0);
      s.gen_of_id.resize(id + 1, 0);
    }
    s.base_of_id[id] = base;
    s.gen_of_id[id] = b.generation;
    // The largest request of the step's blocks under this id: an id passes from a block freed
    // in the step to the next one made there, which may be larger (an MLP's 1 MiB weight
    // gradient, then a 2 MiB activation of a batch of 1024). The last one's alone made the
    // plan's request smaller than the larger block's, which then outgrew every plan made
    // again from it: each step was recorded and planned again.
    if (s.request_of_id.size() <= id) s.request_of_id.resize(id + 1, 0);
    s.request_of_id[id] = std::max(s.request_of_id[id], b.request);
    if (s.existed_of_id.size() <= id) s.existed_of_id.resize(id + 1, 0);
    s.existed_of_id[id] = b.born < s.begin_tick;
    if (s.executing && id < s.plan_ids) note_turn_locked(s, base, b, id);
    forget_expected_locked(s, base);
    // Found by its id of the latest step (a new block from before the step, as the next
    // batch, may take the place of a block the plan's step made: not state it made).
    const auto prev = s.prev_id_of_base.find(base);
    const bool own_id = prev != s.prev_id_of_base.end() && prev->second == id &&
                        s.gen_of_id_prev[id] == b.generation;
    if (s.executing && id < s.plan_ids && b.born < s.begin_tick && !s.existed_of_id_planned[id] &&
        (own_id || takes_turns_locked(s, base, id)))
      s.plan_made_older = true;  // the plan's step made it (optimizer state in a first step)
    if (s.executing && id >= s.plan_ids && b.born < s.plan_begin_tick)
      s.unplanned_old++;  // older than the plan's step, which did not pin it: a skipped layer
    if (auto birth = s.birth_of.find(base); birth != s.birth_of.end() && s.recording) {
      s.id_of_birth[birth->second] = static_cast<std::int64_t>(id);
      if (id_new) born_op = s.op_of_birth[birth->second];
    }
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
  // A block made in this step held nothing before it: its first access writes it, whatever
  // the pin says (one that only reads, such as the next op's argument pin of an output its op
  // made unpinned, made the graph take it for a block from before the step, live from the
  // step's first op: an LSTM's recorded step summed to 580 MiB there against a 64 MiB
  // footprint, and its plan evicted blocks at the end of the step with the budget 4x that).
  const bool made_here = s.first_access_of_id.count(id) == 0 && b.born >= s.begin_tick;
  a.access = made_here ? graph::Access::Write : graph::Access::Read;
  a.stream = sit->second;
  a.time_s = step_time_locked(s);
  if (made_here && born_op && *born_op < a.op)
    s.born_before_pin.emplace_back(s.trace.accesses.size(), *born_op);
  s.access_of_id_op[id] = s.trace.accesses.size();
  s.trace_starts.push_back(s.first_access_of_id.emplace(id, s.trace.accesses.size()).second);
  s.trace.accesses.push_back(a);
  sample_other_locked(s, true);
  if (s.executing) {
    // A block the plan knows may have another size (see the file's comment).
    if (id < s.plan_ids) {
      s.size_of_id[id] = a.bytes;  // the plan's prefetches and evictions find it
      if (b.request > s.request_of_id_planned[id]) s.outgrew_plan = true;
    }
    follow_access_locked(s, id);
  }
  s.prev_block = static_cast<std::int64_t>(id);
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
    s.op_of_birth.push_back(static_cast<std::uint32_t>(std::max<std::int64_t>(s.op, 0)));
  }
  expect_birth_locked(s, k, b);
}

void Swapper::Impl::expect_birth_locked(StepState& s, std::uint64_t k, const SwapBlock& b) {
  // Births are counted from the step's start: once the step has left its plan, the plan's
  // birth k need not be this one (its blocks are found at their first pin).
  if (!s.executing || s.deviated || k >= s.id_of_birth_planned.size() ||
      s.id_of_birth_planned[k] < 0 ||
      s.request_of_birth_planned[k] != b.request)
    return;
  const auto id = static_cast<std::uint64_t>(s.id_of_birth_planned[k]);
  if (id < s.base_of_id.size() && s.base_of_id[id] != 0) return;  // taken: off the plan
  if (auto old = s.expected_base_of_id.find(id); old != s.expected_base_of_id.end())
    s.expected_id_of.erase(old->second);
  s.expected_id_of[key(b.base)] = {id, b.generation};
  s.expected_base_of_id[id] = key(b.base);
}

std::vector<PlanFields>::iterator Swapper::Impl::variant_for_key_locked(StepState& s,
                                                                       std::uint64_t key) const {
  // A plan is switched before the step's first pin only: after one, the step's blocks have
  // ids of the plan it follows (what it pinned, its births' expectations, its recording).
  if (!s.in_step || !s.recording || s.replan || s.op >= 0 || !s.trace.accesses.empty() ||
      !s.id_of.empty() || s.has_key(key))
    return s.variants.end();
  // The variant with this key; for a key no plan has had, the one with the nearest key, when it
  // is nearer than this plan's keys (keys near as numbers are steps alike: offload's grow with
  // the batch's element count, so that a length not met before follows the plan of the
  // nearest length met).
  const auto distance = [key](const PlanFields& p) {
    std::uint64_t best = UINT64_MAX;
    for (std::uint64_t k : p.keys) best = std::min(best, k > key ? k - key : key - k);
    return best;
  };
  auto v = std::min_element(s.variants.begin(), s.variants.end(),
                            [&](const PlanFields& a, const PlanFields& b) {
                              return distance(a) < distance(b);
                            });
  if (v == s.variants.end() || distance(*v) >= distance(s)) return s.variants.end();
  return v;
}

std::vector<PlannedPrefetch> Swapper::Impl::set_step_key_locked(StepState& s, std::uint64_t key) {
  s.step_key = key;
  std::vector<PlannedPrefetch> wanted;
  auto v = variant_for_key_locked(s, key);
  if (v == s.variants.end()) return wanted;
  PlanFields next = std::move(*v);
  s.variants.erase(v);
  if (!s.keys.empty()) s.variants.push_back(std::move(static_cast<PlanFields&>(s)));
  static_cast<PlanFields&>(s) = std::move(next);
  follow_plan_from_start_locked(s);
  s.pending.clear();  // the other plan's
  s.deferred.clear();
  // The blocks born so far (before any pin: the batch) as this plan's recording had them.
  s.expected_id_of.clear();
  s.expected_base_of_id.clear();
  for (const auto& [base, k] : s.birth_of) {
    auto b = blocks.find(base);
    if (b != blocks.end()) expect_birth_locked(s, k, b->second);
  }
  if (!s.executing) return wanted;
  // Memory as this plan's steps leave it: what it has on the host at its start goes there,
  // what it has resident comes back in the order of first use, and its first ops' prefetches.
  evict_plan_start_locked(s);
  wanted = moved_since_plan_locked(s);
  first_ops_prefetches_locked(s, wanted);
  s.fresh_plan = false;
  return wanted;
}

void Swapper::Impl::claim_step_key_locked(StepState& s, bool from_variants) {
  if (!s.step_key) return;
  const std::uint64_t key = *s.step_key;
  const auto has_key = [key](const PlanFields& p) { return p.has_key(key); };
  if (!from_variants && std::any_of(s.variants.begin(), s.variants.end(), has_key)) return;
  for (auto v = s.variants.begin(); v != s.variants.end();) {
    v->keys.erase(std::remove(v->keys.begin(), v->keys.end(), key), v->keys.end());
    v = v->keys.empty() ? s.variants.erase(v) : v + 1;
  }
  if (s.has_key(key)) return;
  // A plan keeps its latest keys (steps of ever new shapes would grow the list for good).
  constexpr std::size_t kKeysPerPlan = 256;
  if (s.keys.size() >= kKeysPerPlan) s.keys.erase(s.keys.begin());
  s.keys.push_back(key);
}

void Swapper::Impl::forget_expected_locked(StepState& s, std::uintptr_t base) {
  auto it = s.expected_id_of.find(base);
  if (it == s.expected_id_of.end()) return;
  auto back = s.expected_base_of_id.find(it->second.id);
  if (back != s.expected_base_of_id.end() && back->second == base)
    s.expected_base_of_id.erase(back);
  s.expected_id_of.erase(it);
}

bool Swapper::Impl::splice_into_plan_locked(StepState& s) {
  const std::vector<graph::TraceAccess>& plan = s.plan_trace.accesses;
  const std::vector<graph::TraceAccess>& step = s.trace.accesses;
  const std::size_t n = step.size(), m = plan.size();
  if (n * m > (std::size_t{1} << 24)) return false;  // the table below stays small
  // The longest common subsequence of the step's accesses and the plan's, by block: an access
  // of a block from before the step weighs more (its id is its address; a block made in the
  // step has the id of the place it was found at, which a skip may have shifted).
  const auto weight = [&](std::size_t i, std::size_t j) -> std::uint32_t {
    const std::uint64_t id = step[i].block;
    if (id != plan[j].block) return 0;
    return id < s.existed_of_id.size() && s.existed_of_id[id] ? 4 : 1;
  };
  std::vector<std::uint32_t> best((n + 1) * (m + 1), 0);  // of the suffixes from (i, j)
  const auto at = [&](std::size_t i, std::size_t j) -> std::uint32_t& {
    return best[i * (m + 1) + j];
  };
  for (std::size_t i = n; i-- > 0;)
    for (std::size_t j = m; j-- > 0;) {
      std::uint32_t v = std::max(at(i + 1, j), at(i, j + 1));
      if (const std::uint32_t w = weight(i, j); w > 0) v = std::max(v, w + at(i + 1, j + 1));
      at(i, j) = v;
    }
  // Each op's time in its own recording (to its next op's first access, the last op to the
  // step's end): the spliced ops run at their own pace.
  const auto durations = [](const graph::Trace& t) {
    std::vector<double> d;
    for (std::size_t i = 0; i < t.accesses.size();) {
      const std::uint32_t op = t.accesses[i].op;
      std::size_t j = i;
      while (j < t.accesses.size() && t.accesses[j].op == op) ++j;
      const double end = j < t.accesses.size() ? t.accesses[j].time_s
                                               : std::max(t.step_end_s, t.accesses[i].time_s);
      if (d.size() <= op) d.resize(op + 1, 0.0);
      d[op] = std::max(d[op], end - t.accesses[i].time_s);
      i = j;
    }
    return d;
  };
  // Source 0 is the step, 1 the plan.
  const std::vector<double> duration[2] = {durations(s.trace), durations(s.plan_trace)};
  const std::vector<std::uint64_t>* other_of[2] = {&s.other_bytes, &s.plan_other_bytes};
  graph::Trace out;
  std::vector<std::uint64_t> other;  // per op of the spliced trace
  int src_prev = -1;
  std::uint32_t op_prev = 0;
  std::uint32_t next_other[2] = {0, 0};
  double t = 0;
  const auto close_op = [&] {
    if (src_prev >= 0 && op_prev < duration[src_prev].size()) t += duration[src_prev][op_prev];
  };
  std::vector<bool> starts;  // per access of the spliced trace (StepState::trace_starts)
  const auto emit = [&](const graph::TraceAccess& a, int src, bool start) {
    if (src != src_prev || a.op != op_prev) {
      close_op();
      // The memory its recording did not show, at its worst over that recording's ops since
      // the last one spliced from it.
      std::uint64_t o = 0;
      const std::vector<std::uint64_t>& from = *other_of[src];
      for (std::uint32_t k = std::min(next_other[src], a.op); k <= a.op && k < from.size(); ++k)
        o = std::max(o, from[k]);
      next_other[src] = a.op + 1;
      other.push_back(o);
      src_prev = src;
      op_prev = a.op;
    }
    graph::TraceAccess c = a;
    c.op = static_cast<std::uint32_t>(other.size() - 1);
    c.time_s = t;
    out.accesses.push_back(c);
    starts.push_back(start);
  };
  // Where both leave accesses between two common ones, the plan's come first.
  std::size_t i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && weight(i, j) > 0 && at(i, j) == weight(i, j) + at(i + 1, j + 1)) {
      emit(plan[j], 1, s.plan_starts[j]);
      ++i, ++j;
    } else if (j < m && (i == n || at(i, j + 1) >= at(i + 1, j))) {
      emit(plan[j], 1, s.plan_starts[j]);
      ++j;
    } else {
      emit(step[i], 0, s.trace_starts[i]);
      ++i;
    }
  }
  close_op();
  out.step_end_s = t;
  // The plan's blocks the step did not touch, as the plan had them; those still alive (the
  // weights and state of layers the step skipped) known by their address, as the step's are.
  const std::size_t ids = std::max<std::size_t>(s.next_id, s.plan_ids);
  s.base_of_id.resize(std::max(s.base_of_id.size(), ids), 0);
  s.gen_of_id.resize(std::max(s.gen_of_id.size(), ids), 0);
  s.request_of_id.resize(std::max(s.request_of_id.size(), ids), 0);
  s.existed_of_id.resize(std::max(s.existed_of_id.size(), ids), 0);
  for (std::uint64_t id = 0; id < s.plan_ids; ++id) {
    if (s.base_of_id[id] != 0) continue;
    if (id < s.request_of_id_planned.size()) s.request_of_id[id] = s.request_of_id_planned[id];
    if (id < s.existed_of_id_planned.size()) s.existed_of_id[id] = s.existed_of_id_planned[id];
    if (id >= s.base_of_id_prev.size() || s.base_of_id_prev[id] == 0) continue;
    auto it = blocks.find(s.base_of_id_prev[id]);
    if (it == blocks.end() || it->second.generation != s.gen_of_id_prev[id] ||
        s.id_of.count(s.base_of_id_prev[id]) != 0)
      continue;
    s.base_of_id[id] = s.base_of_id_prev[id];
    s.gen_of_id[id] = s.gen_of_id_prev[id];
    give_id_locked(s, it->first, it->second, id);  // not untouched memory: the plan holds it
  }
  s.trace = std::move(out);
  s.trace_starts = std::move(starts);
  s.other_bytes = std::move(other);
  s.next_id = ids;
  return true;
}

}  // namespace spill

// Recording a step as a graph::Trace, planning from it, and executing the plan on later steps,
// for each step scope on its own. Block identity across steps is the order of first pins within
// a scope's step, which a deterministic training step repeats; a block's size must match its
// recorded size, or the step deviates.
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
  s.base_of_id.clear();
  s.access_of_id_op.clear();
  s.first_access_of_id.clear();
  s.prefetched_upto = 0;
  s.t0_ns = profiling::TraceRecorder::global().now_ns();
  s.begin_tick = ++tick;
  s.recording = opt.policy == SwapPolicy::Plan && opt.budget > 0 && s.record_next;
  s.executing = !s.recording && opt.policy == SwapPolicy::Plan && s.plan.feasible &&
                !s.plan.steps.empty();
  if (s.recording) {
    s.trace = graph::Trace{};
    s.executing = false;
  }
  if (s.executing) {
    // Blocks the plan starts on the host should already be there from the previous step's
    // end; the plan's evictions put them back each step.
    s.lookahead = std::max(0, s.lookahead - 1);
  }
}

void Swapper::Impl::end_step_locked(StepState& s) {
  if (!s.in_step) return;
  s.in_step = false;
  if (s.recording) {
    s.recording = false;
    s.record_next = false;
    s.trace.step_end_s =
        static_cast<double>(profiling::TraceRecorder::global().now_ns() - s.t0_ns) * 1e-9;
    s.last_trace = s.trace;
    last_trace_any = s.trace;
    stats.steps_recorded++;
    s.plan = graph::Plan{};
    s.size_of_id.assign(s.next_id, 0);
    s.use_ops.assign(s.next_id, {});
    for (const graph::TraceAccess& a : s.trace.accesses) {
      s.size_of_id[a.block] = a.bytes;
      if (s.use_ops[a.block].empty() || s.use_ops[a.block].back() != a.op)
        s.use_ops[a.block].push_back(a.op);
    }
    if (!s.trace.accesses.empty()) {
      graph::Graph g = graph::graph_from_trace(s.trace, "recorded step");
      std::vector<double> times;
      for (const graph::Op& op : g.ops) times.push_back(op.time_s.value_or(1e-6));
      graph::PlannerOptions po;
      po.budget = opt.budget;
      po.min_swap_bytes = opt.min_swap_bytes;
      s.plan = graph::plan_spill(g, times, opt.link, po);
      s.tensor_id.clear();
      for (const graph::Tensor& t : g.tensors) s.tensor_id.push_back(static_cast<std::int64_t>(t.id));
    }
  } else if (s.executing) {
    stats.steps_planned++;
    // The last op's evictions (tensors idle across the step boundary, such as weights).
    if (!s.plan.steps.empty())
      issue_evictions_locked(s, static_cast<std::int64_t>(s.plan.steps.size()) - 1);
  }
  s.executing = false;
  s.base_of_id_prev = s.base_of_id;
}

std::optional<std::uintptr_t> Swapper::Impl::base_for_id_locked(StepState& s, std::int64_t id) {
  if (id < 0) return std::nullopt;
  auto idx = static_cast<std::size_t>(id);
  std::uintptr_t base = 0;
  if (idx < s.base_of_id.size() && s.base_of_id[idx] != 0) base = s.base_of_id[idx];
  else if (idx < s.base_of_id_prev.size()) base = s.base_of_id_prev[idx];
  if (base == 0) return std::nullopt;
  auto it = blocks.find(base);
  if (it == blocks.end() || (idx < s.size_of_id.size() && it->second.size != s.size_of_id[idx]))
    return std::nullopt;
  return base;
}

std::int64_t Swapper::Impl::next_use_locked(const SwapBlock& b) const {
  auto scope = scopes.find(b.scope);
  if (scope == scopes.end() || !scope->second.executing) return INT64_MAX;  // unknown
  const StepState& s = scope->second;
  auto it = s.id_of.find(key(b.base));
  std::int64_t id = -1;
  if (it != s.id_of.end()) {
    id = static_cast<std::int64_t>(it->second);
  } else {
    for (std::size_t i = 0; i < s.base_of_id_prev.size(); ++i)
      if (s.base_of_id_prev[i] == key(b.base)) id = static_cast<std::int64_t>(i);
  }
  if (id < 0 || static_cast<std::size_t>(id) >= s.use_ops.size()) return INT64_MAX;  // unknown
  for (std::uint32_t op : s.use_ops[id])
    if (static_cast<std::int64_t>(op) > s.op) return op - s.op;
  // Not used again in this step: its next use is in the next step.
  return s.use_ops[id].empty() ? INT64_MAX : s.use_ops[id].front() + (1ll << 32) - s.op;
}

void Swapper::Impl::issue_evictions_locked(StepState& s, std::int64_t op) {
  for (graph::TensorIndex t : s.plan.steps[op].evict_after) {
    auto base = base_for_id_locked(s, s.tensor_id[t]);
    if (!base) continue;
    SwapBlock& b = blocks.at(*base);
    if (!evictable_locked(b) || b.state == Residence::OnHost ||
        b.state == Residence::SwappingOut)
      continue;
    try {
      start_swap_out_locked(b);
      stats.evictions_planned++;
    } catch (const OutOfMemory&) {
      // Host cap: leave it resident; the reactive path copes.
    }
  }
}

std::vector<std::uintptr_t> Swapper::Impl::advance_op_locked(StepState& s, bool force) {
  std::vector<std::uintptr_t> wanted;
  if (!force && !(s.auto_ops && (s.after_unpin || s.op < 0))) return wanted;
  s.op++;
  s.after_unpin = false;
  if (!s.executing) return wanted;
  const graph::Plan& p = s.plan;
  const auto n = static_cast<std::int64_t>(p.steps.size());
  // Evictions after the previous op: its work is enqueued and its blocks unpinned.
  if (s.op >= 1 && s.op - 1 < n) issue_evictions_locked(s, s.op - 1);
  // Prefetches due by this op and the adaptive look-ahead window.
  std::int64_t upto = std::min<std::int64_t>(n - 1, s.op + s.lookahead);
  for (auto j = static_cast<std::int64_t>(s.prefetched_upto); j <= upto; ++j) {
    for (graph::TensorIndex t : p.steps[j].prefetch_at) {
      if (auto base = base_for_id_locked(s, s.tensor_id[t])) wanted.push_back(*base);
    }
  }
  s.prefetched_upto = static_cast<std::size_t>(std::max<std::int64_t>(upto + 1, 0));
  reap_locked();
  return wanted;
}

void Swapper::Impl::on_pin_locked(StepState& s, SwapBlock& b, Stream stream) {
  if (!s.in_step) return;
  std::uintptr_t base = key(b.base);
  auto [it, fresh] = s.id_of.emplace(base, s.next_id);
  std::uint64_t id = it->second;
  if (fresh) {
    s.next_id++;
    if (s.base_of_id.size() <= id) s.base_of_id.resize(id + 1, 0);
    s.base_of_id[id] = base;
    if (s.executing && (id >= s.size_of_id.size() || s.size_of_id[id] != b.size)) {
      // The step no longer follows the recorded one: stop the plan, record again next step.
      s.executing = false;
      s.record_next = true;
      stats.deviations++;
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
  a.access = graph::Access::Read;
  a.stream = sit->second;
  a.time_s = static_cast<double>(profiling::TraceRecorder::global().now_ns() - s.t0_ns) * 1e-9;
  s.access_of_id_op[id] = s.trace.accesses.size();
  s.first_access_of_id.emplace(id, s.trace.accesses.size());
  s.trace.accesses.push_back(a);
}

void Swapper::Impl::on_unpin_locked(StepState& s, SwapBlock& b, bool wrote) {
  s.after_unpin = true;
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

}  // namespace spill

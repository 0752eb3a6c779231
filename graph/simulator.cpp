#include "graph/simulator.hpp"

#include <algorithm>
#include <set>

#include "core/errors.hpp"
#include "graph/device_model.hpp"
#include "graph/liveness.hpp"

namespace spill::graph {

const char* to_string(TimelineEvent::Kind k) {
  switch (k) {
    case TimelineEvent::Kind::Compute: return "compute";
    case TimelineEvent::Kind::SwapIn: return "swap_in";
    case TimelineEvent::Kind::SwapOut: return "swap_out";
    case TimelineEvent::Kind::Stall: return "stall";
    case TimelineEvent::Kind::Upload: return "upload";
    case TimelineEvent::Kind::Recompute: return "recompute";
  }
  return "?";
}

namespace {

enum class Where { Absent, Device, Host };

struct TensorState {
  Where where = Where::Absent;
  double ready = 0;       // on device: when its bytes are there
  double host_ready = 0;  // on host: when the copy out has finished
  bool host_valid = false;
  bool host_buffer = false;  // holds a pinned host buffer (from its first copy out until it dies)
};

// Mapped bytes over time, in issue order (see the header for the rules).
class Memory {
 public:
  Memory(const SimOptions& o) : budget_(o.budget), small_(o.small), lazy_(o.swapper_rules) {}

  // Maps `bytes` no earlier than `t`; returns when the mapping happened.
  double map(std::uint64_t bytes, double t) {
    t = std::max(t, cursor_);
    apply_until(t);
    if (mapped_with(bytes) + unreaped_bytes_ > budget_) {
      reap();  // the swapper completes the swap-outs that ended when room is needed
      while (mapped_with(bytes) > budget_ && !pending_.empty()) {
        t = std::max(t, pending_.begin()->t);
        apply_until(t);
      }
      reap();
    }
    if (mapped_with(bytes) > budget_) over_budget_ = true;
    (is_small(bytes) ? small_bytes_ : large_) += bytes;
    peak_ = std::max(peak_, mapped());
    cursor_ = t;
    return t;
  }
  void release(std::uint64_t bytes, double t) { pending_.insert({t, bytes, false}); }
  // A swap-out's release (with swapper_rules: cancellable until reaped).
  void release_swap_out(std::uint64_t bytes, double t) { pending_.insert({t, bytes, lazy_}); }
  // Takes back a swap-out's release at `t` that was not reaped (the memory stays mapped);
  // false when it was (or without swapper_rules).
  bool cancel_release(std::uint64_t bytes, double t) {
    if (!lazy_) return false;
    auto it = pending_.find({t, bytes, true});
    if (it != pending_.end()) {
      pending_.erase(it);
      return true;
    }
    auto done = unreaped_.find({t, bytes, true});
    if (done == unreaped_.end()) return false;
    unreaped_.erase(done);
    unreaped_bytes_ -= bytes;
    large_ += bytes;
    peak_ = std::max(peak_, mapped());
    return true;
  }

  std::uint64_t mapped() const { return mapped_with(0); }
  std::uint64_t peak() const { return peak_; }
  bool over_budget() const { return over_budget_; }

 private:
  struct Release {
    double t;
    std::uint64_t bytes;
    bool cancellable;
    auto operator<=>(const Release&) const = default;
  };
  bool is_small(std::uint64_t bytes) const { return small_.segment > 0 && bytes <= small_.limit; }
  // Mapped bytes once `bytes` more are mapped (swap-outs that ended count as released).
  std::uint64_t mapped_with(std::uint64_t bytes) const {
    const bool small = is_small(bytes);
    const std::uint64_t large = large_ + (small ? 0 : bytes);
    const std::uint64_t sm = small_bytes_ + (small ? bytes : 0);
    if (small_.segment == 0) return large + sm;
    return large + (sm + small_.segment - 1) / small_.segment * small_.segment;
  }
  void apply_until(double t) {
    while (!pending_.empty() && pending_.begin()->t <= t) {
      const Release r = *pending_.begin();
      pending_.erase(pending_.begin());
      (is_small(r.bytes) ? small_bytes_ : large_) -= r.bytes;
      if (r.cancellable) {
        unreaped_.insert(r);
        unreaped_bytes_ += r.bytes;
      }
    }
  }
  void reap() {
    unreaped_.clear();
    unreaped_bytes_ = 0;
  }
  std::multiset<Release> pending_;   // earliest first
  std::multiset<Release> unreaped_;  // swap-outs that ended, not yet reaped (swapper_rules)
  std::uint64_t unreaped_bytes_ = 0;
  std::uint64_t budget_;
  SmallPool small_;
  bool lazy_;
  std::uint64_t large_ = 0, small_bytes_ = 0;  // mapped at their own size; small ones' live bytes
  std::uint64_t peak_ = 0;
  double cursor_ = 0;
  bool over_budget_ = false;
};

class StepSim {
 public:
  StepSim(const Graph& g, const std::vector<double>& times, const LinkModel& link,
          const Plan* plan, const SimOptions& o)
      : g_(g), times_(times), link_(link), plan_(plan), o_(o), mem_(o),
        state_(g.tensors.size()), live_(analyze_liveness(g)) {}

  SimResult run() {
    start_residence();
    const int steps = std::max(1, o_.model.steps);
    double prev_end = 0;
    for (int k = 0; k < steps; ++k) {
      const bool last = k + 1 == steps;
      if (k > 0) r_ = SimResult{};
      recording_ = last && o_.record_timeline;
      step_start_ = prev_end;
      const double issue = begin_step(k, prev_end);
      for (std::size_t i = 0; i < g_.ops.size(); ++i)
        prev_end = run_op(i, prev_end, i == 0 ? issue : prev_end);
    }
    r_.step_time_s = steps == 1 ? std::max({prev_end, h2d_free_, d2h_free_}) : prev_end - step_start_;
    r_.peak_bytes = mem_.peak();
    r_.peak_host_bytes = host_peak_;
    r_.within_budget = !mem_.over_budget();
    return std::move(r_);
  }

 private:
  void start_residence() {
    std::vector<bool> on_host(g_.tensors.size(), false);
    if (plan_)
      for (TensorIndex t : plan_->start_on_host) on_host[t] = true;
    for (std::size_t t = 0; t < g_.tensors.size(); ++t) {
      if (!exists_at_start(g_.tensors[t].kind) || live_.live[t].first < 0) continue;
      if (on_host[t]) {
        state_[t] = {Where::Host, 0, 0, true};
        take_host_buffer(TensorIndex(t));
      } else {
        mem_.map(g_.tensors[t].bytes, 0);
        state_[t] = {Where::Device, 0, 0, false};
      }
    }
  }

  // Inputs of a step after the first are mapped again as it starts (the last step freed them);
  // then the model's uploads run. Returns when op 0's prefetches are issued.
  double begin_step(int k, double t) {
    for (std::size_t i = 0; i < g_.tensors.size(); ++i) {
      const TensorKind kind = g_.tensors[i].kind;
      if (k == 0 || !exists_at_start(kind) || persistent(kind) || live_.live[i].first < 0) continue;
      TensorState& s = state_[i];
      if (s.where == Where::Absent) s = {Where::Device, mem_.map(g_.tensors[i].bytes, t), 0, false};
    }
    double issue = t;
    for (const Upload& u : o_.model.uploads) {
      TensorState& s = state_[u.tensor];
      const double ready = std::max(t, s.ready);
      s.ready = transfer(true, u.tensor, u.bytes, ready, 0, TimelineEvent::Kind::Upload);
      issue = std::max(issue, s.ready);
    }
    return issue;
  }

  // A copy on the engine of its direction, FIFO; returns when it ends.
  double transfer(bool to_device, TensorIndex t, std::uint64_t bytes, double earliest,
                  std::int64_t op, TimelineEvent::Kind kind) {
    double& engine = to_device ? h2d_free_ : d2h_free_;
    const double other = to_device ? d2h_free_ : h2d_free_;
    double start = std::max(engine, earliest);
    double end = start + copy_time_s(link_, bytes, to_device, other > start);
    engine = end;
    record(kind, op, std::int64_t(t), start, end, bytes);
    return end;
  }

  double copy(bool to_device, TensorIndex t, double earliest, std::int64_t op) {
    (to_device ? r_.swapped_in_bytes : r_.swapped_out_bytes) += g_.tensors[t].bytes;
    return transfer(to_device, t, g_.tensors[t].bytes, earliest, op,
                    to_device ? TimelineEvent::Kind::SwapIn : TimelineEvent::Kind::SwapOut);
  }

  // Brings a tensor on the host back: map its memory, then copy once the engine is free; returns
  // when it was mapped. With swapper_rules, one whose swap-out was not reaped stays instead (the
  // copy out goes on).
  double fetch(TensorIndex t, double issue, std::int64_t op) {
    TensorState& s = state_[t];
    if (mem_.cancel_release(g_.tensors[t].bytes, s.host_ready)) {
      s.where = Where::Device;
      r_.cancelled_bytes += g_.tensors[t].bytes;
      return issue;
    }
    double mapped_at = mem_.map(g_.tensors[t].bytes, issue);
    s.ready = copy(true, t, std::max(mapped_at, s.host_ready), op);
    s.where = Where::Device;
    return mapped_at;
  }

  void evict(TensorIndex t, double after, std::int64_t op) {
    TensorState& s = state_[t];
    if (s.where != Where::Device) return;
    double released = std::max(after, s.ready);
    if (!s.host_valid) {
      released = copy(false, t, released, op);
      s.host_valid = true;
      take_host_buffer(t);
    } else if (o_.swapper_rules) {
      released = std::max(released, d2h_free_);  // the swapper's marker queues on the D2H stream
    }
    s.host_ready = released;
    s.where = Where::Host;
    mem_.release_swap_out(g_.tensors[t].bytes, released);
  }

  // Makes op's tensors resident for a run that may start at `start` (the compute stream is free
  // from prev_end): fetches those on the host, maps those absent; returns when it can start.
  double bring(const Op& op, std::int64_t oi, double prev_end, double start, TensorIndex skip) {
    for (const auto* list : {&op.reads, &op.writes}) {
      for (TensorIndex t : *list) {
        if (t == skip) continue;
        TensorState& s = state_[t];
        if (s.where == Where::Host) {
          ++r_.demand_fetches;
          fetch(t, prev_end, oi);
        } else if (s.where == Where::Absent) {
          start = std::max(start, mem_.map(g_.tensors[t].bytes, prev_end));
          s = {Where::Device, prev_end, 0, false};
        }
        start = std::max(start, s.ready);
      }
    }
    return start;
  }

  // Remakes tensor t before op oi by running its producer once the stream is free at `prev_end`
  // (and not before `start`); returns when the remake ends.
  double remake(TensorIndex t, std::int64_t oi, double prev_end, double start) {
    const std::int64_t maker = remaking_op(g_, t);
    SPILL_EXPECTS(maker >= 0, "simulate: plan '" + plan_->policy + "' recomputes tensor '" +
                                  g_.tensors[t].name + "', which no recomputable op makes");
    const Op& op = g_.ops[std::size_t(maker)];
    start = bring(op, oi, prev_end, start, t);
    TensorState& s = state_[t];
    if (s.where != Where::Device) start = std::max(start, mem_.map(g_.tensors[t].bytes, prev_end));
    if (op.workspace_bytes > 0) start = std::max(start, mem_.map(op.workspace_bytes, prev_end));
    if (start > prev_end) {
      r_.stall_time_s += start - prev_end;
      record(TimelineEvent::Kind::Stall, oi, -1, prev_end, start, 0);
    }
    const double end = start + times_[std::size_t(maker)];
    record(TimelineEvent::Kind::Recompute, oi, std::int64_t(t), start, end, g_.tensors[t].bytes);
    if (op.workspace_bytes > 0) mem_.release(op.workspace_bytes, end);
    drop_host_buffer(t);  // (a remade tensor was dropped: its block, and any buffer, freed)
    s = {Where::Device, end, 0, false};
    ++r_.recomputes;
    r_.recomputed_bytes += g_.tensors[t].bytes;
    r_.recompute_time_s += end - start;
    return end;
  }

  // Runs op i after the op before it ended at prev_end; its prefetches are issued at `issue`.
  double run_op(std::size_t i, double prev_end, double issue) {
    const Op& op = g_.ops[i];
    const auto oi = std::int64_t(i);
    double start = std::max(prev_end, issue);
    if (plan_)
      for (TensorIndex t : plan_->steps[i].prefetch_at) {
        if (state_[t].where != Where::Host) continue;
        const double mapped_at = fetch(t, issue, oi);
        if (o_.swapper_rules) start = std::max(start, mapped_at);  // the host waited for room
      }
    if (plan_)
      for (TensorIndex t : plan_->steps[i].recompute_before) {
        prev_end = remake(t, oi, prev_end, start);
        start = prev_end;
      }
    start = bring(op, oi, prev_end, start, TensorIndex(g_.tensors.size()));
    if (op.workspace_bytes > 0) start = std::max(start, mem_.map(op.workspace_bytes, prev_end));
    r_.mapped_at_op.push_back(mem_.mapped());
    const double end = start + times_[i];
    if (start > prev_end) {
      r_.stall_time_s += start - prev_end;
      record(TimelineEvent::Kind::Stall, oi, -1, prev_end, start, 0);
    }
    record(TimelineEvent::Kind::Compute, oi, -1, start, end, 0);
    r_.compute_time_s += times_[i];
    if (op.workspace_bytes > 0) mem_.release(op.workspace_bytes, end);
    for (TensorIndex t : op.writes) state_[t].host_valid = false;
    // Tensors that die here are freed; nothing survives its last use except persistent state
    // and, to the step's last op, what the step holds to its end.
    for (const auto* list : {&op.reads, &op.writes}) {
      for (TensorIndex t : *list) {
        TensorState& s = state_[t];
        if (s.where == Where::Device && !persistent(g_.tensors[t].kind) &&
            live_.live[t].last == oi) {
          s.where = Where::Absent;
          mem_.release(g_.tensors[t].bytes, end);
          drop_host_buffer(t);
        }
      }
    }
    if (i + 1 == g_.ops.size()) {
      for (std::size_t t = 0; t < g_.tensors.size(); ++t) {
        TensorState& s = state_[t];
        if (!g_.tensors[t].held_to_step_end || s.where == Where::Absent) continue;
        if (s.where == Where::Device) mem_.release(g_.tensors[t].bytes, end);
        s.where = Where::Absent;
        drop_host_buffer(TensorIndex(t));
      }
    }
    if (plan_) {
      for (TensorIndex t : plan_->steps[i].evict_after) evict(t, end, oi);
      for (TensorIndex t : plan_->steps[i].drop_after) {
        TensorState& s = state_[t];
        if (s.where != Where::Device) continue;
        s.where = Where::Absent;
        mem_.release(g_.tensors[t].bytes, end);
        drop_host_buffer(t);
      }
    }
    return end;
  }

  // The swapper keeps a block's host buffer from its first copy out until the block is freed
  // (later evictions reuse it; a clean one copies nothing).
  void take_host_buffer(TensorIndex t) {
    TensorState& s = state_[t];
    if (s.host_buffer) return;
    s.host_buffer = true;
    host_bytes_ += g_.tensors[t].bytes;
    host_peak_ = std::max(host_peak_, host_bytes_);
  }
  void drop_host_buffer(TensorIndex t) {
    TensorState& s = state_[t];
    if (!s.host_buffer) return;
    s.host_buffer = false;
    host_bytes_ -= g_.tensors[t].bytes;
  }

  void record(TimelineEvent::Kind k, std::int64_t op, std::int64_t t, double a, double b,
              std::uint64_t bytes) {
    if (recording_) r_.timeline.push_back({k, op, t, a - step_start_, b - step_start_, bytes});
  }

  const Graph& g_;
  const std::vector<double>& times_;
  const LinkModel& link_;
  const Plan* plan_;
  SimOptions o_;
  Memory mem_;
  std::vector<TensorState> state_;
  Liveness live_;
  SimResult r_;
  double h2d_free_ = 0, d2h_free_ = 0;
  double step_start_ = 0;   // when the step being simulated started
  std::uint64_t host_bytes_ = 0, host_peak_ = 0;  // tensors' host buffers: now, at most
  bool recording_ = false;  // the timeline records this step
};

}  // namespace

SimResult simulate(const Graph& g, const std::vector<double>& op_times, const LinkModel& link,
                   const Plan* plan, const SimOptions& options) {
  SPILL_EXPECTS(op_times.size() == g.ops.size(),
                "simulate: " + std::to_string(op_times.size()) + " op times for " +
                    std::to_string(g.ops.size()) + " ops of graph '" + g.name + "'");
  SPILL_EXPECTS(!plan || plan->steps.size() == g.ops.size(),
                "simulate: plan '" + (plan ? plan->policy : "") + "' does not fit graph '" +
                    g.name + "'");
  for (const Upload& u : options.model.uploads)
    SPILL_EXPECTS(u.tensor < g.tensors.size() && g.tensors[u.tensor].kind == TensorKind::Input &&
                      u.bytes <= g.tensors[u.tensor].bytes,
                  "simulate: an upload of " + std::to_string(u.bytes) + " bytes to tensor " +
                      std::to_string(u.tensor) + " of graph '" + g.name +
                      "' (uploads go to input tensors, at most their size)");
  return StepSim(g, op_times, link, plan, options).run();
}

}  // namespace spill::graph

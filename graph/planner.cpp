// The spill planner. One sweep over the ops: wherever the planned memory passes the budget,
// take the idle tensor that best covers the excess and evict it for (part of) its gap. A gap's
// window is [e, p): memory is saved from op e (after the copy out is expected to be done) to op
// p (where the prefetch is issued, early enough to arrive before the next use). When no hidden
// window covers the op, a window is stretched over it, trading predicted stall for memory.
// Several lead factors (slack for copy-engine contention) are tried and the plan whose
// simulation is fastest wins. Every window only ever lowers memory, and every idle swappable
// tensor can be stretched over any op, so the sweep meets the budget whenever check_budget does.
#include <algorithm>
#include <cmath>
#include <limits>

#include "graph/device_model.hpp"
#include "graph/liveness.hpp"
#include "graph/planner.hpp"
#include "graph/simulator.hpp"

namespace spill::graph {
namespace {

class SpillPlanner {
 public:
  SpillPlanner(const Graph& g, const std::vector<double>& times, const LinkModel& link,
               const PlannerOptions& o)
      : g_(g), link_(link), o_(o), n_(std::int64_t(g.ops.size())), live_(analyze_liveness(g)),
        gaps_(idle_gaps(g, live_, std::max<std::uint64_t>(o.min_swap_bytes, 1))) {
    start_.resize(g.ops.size() + 1, 0);
    for (std::size_t i = 0; i < g.ops.size(); ++i) start_[i + 1] = start_[i] + times[i];
  }

  Plan plan(double factor) {
    factor_ = factor;
    hidden_.resize(gaps_.size());  // a gap's hidden window depends only on the factor
    for (std::size_t k = 0; k < gaps_.size(); ++k) hidden_[k] = hidden(gaps_[k]);
    std::vector<Window> win(gaps_.size());
    Memory mem(live_.memory);
    const auto budget = std::int64_t(std::min<std::uint64_t>(
        o_.budget, std::uint64_t(std::numeric_limits<std::int64_t>::max())));
    std::vector<std::size_t> active;
    std::vector<bool> in_active(gaps_.size(), false);
    for (std::size_t k = 0; k < gaps_.size(); ++k)
      if (gaps_[k].wraps && gaps_[k].to - n_ > 0) {
        active.push_back(k);
        in_active[k] = true;
      }
    std::size_t next_gap = 0;
    for (std::int64_t i = 0; i < n_; ++i) {
      mem.move_to(i);
      for (; next_gap < gaps_.size() && gaps_[next_gap].from < i; ++next_gap) {
        if (!in_active[next_gap]) active.push_back(next_gap);
        in_active[next_gap] = true;
      }
      while (mem.now() > budget) {
        std::int64_t excess = mem.now() - budget;
        Choice best = choose(i, excess, active, in_active, win);
        if (best.gap < 0) break;  // nothing left to move: check_budget reports why
        apply(std::size_t(best.gap), best.window, win, mem);
      }
    }
    std::vector<Swap> swaps;
    for (std::size_t k = 0; k < gaps_.size(); ++k) {
      if (!win[k].chosen) continue;
      // The eviction is issued right after the last use; the window start only models when
      // its memory is expected back.
      swaps.push_back({gaps_[k].tensor, gaps_[k].from, win[k].p, gaps_[k].to});
    }
    return Plan::from_swaps("spill", o_.budget, g_.ops.size(), std::move(swaps));
  }

 private:
  struct Window {
    bool chosen = false;
    std::int64_t e = 0, p = 0;  // saves memory over virtual ops [e, p)
  };
  struct Choice {
    std::int64_t gap = -1;
    Window window;
  };

  double time_at(std::int64_t v) const {
    return v < n_ ? start_[std::size_t(v)] : start_.back() + start_[std::size_t(v - n_)];
  }
  double lead(const Gap& gp) const {
    return copy_time_s(link_, g_.tensors[gp.tensor].bytes, true, false);
  }
  double lag(const Gap& gp) const {
    return gp.dirty ? copy_time_s(link_, g_.tensors[gp.tensor].bytes, false, false) : 0.0;
  }
  // The window that hides both copies with `factor_` slack (possibly empty).
  Window hidden(const Gap& gp) const {
    const double latest = time_at(gp.to) - lead(gp) * factor_;
    const double earliest = time_at(gp.from + 1) + lag(gp) * factor_;
    std::int64_t lo = gp.from + 1, hi = gp.to;  // largest p in [lo, hi] with time(p) <= latest
    if (time_at(lo) > latest) return {true, lo, lo};
    while (lo < hi) {
      std::int64_t mid = (lo + hi + 1) / 2;
      if (time_at(mid) <= latest) lo = mid;
      else hi = mid - 1;
    }
    std::int64_t p = lo;
    lo = gp.from + 1;
    hi = p;  // smallest e in [from+1, p] with time(e) >= earliest
    while (lo < hi) {
      std::int64_t mid = (lo + hi) / 2;
      if (time_at(mid) >= earliest) hi = mid;
      else lo = mid + 1;
    }
    return {true, lo, p};
  }
  // Predicted cost of a window: the prefetch arriving late plus waiting for the copy out.
  double cost(const Gap& gp, const Window& w) const {
    double late = std::max(0.0, lead(gp) - (time_at(gp.to) - time_at(w.p)));
    double wait = std::max(0.0, time_at(gp.from + 1) + lag(gp) - time_at(w.e));
    return late + wait;
  }
  // Virtual index of op i inside the gap, or -1 when the tensor is in use at i.
  std::int64_t idle_index(const Gap& gp, std::int64_t i) const {
    if (i > gp.from && i < gp.to) return i;
    if (i + n_ > gp.from && i + n_ < gp.to) return i + n_;
    return -1;
  }

  Choice choose(std::int64_t i, std::int64_t excess, std::vector<std::size_t>& active,
                std::vector<bool>& in_active, const std::vector<Window>& win) const {
    Choice best_hidden, best_forced;
    double hidden_score = -1, forced_score = std::numeric_limits<double>::infinity();
    std::uint64_t forced_bytes = 0;
    for (std::size_t a = 0; a < active.size();) {
      const std::size_t k = active[a];
      const Gap& gp = gaps_[k];
      const std::int64_t v = idle_index(gp, i);
      if (v < 0) {  // not idle here; a wrapping gap comes back through next_gap at from + 1
        in_active[k] = false;
        active[a] = active.back();
        active.pop_back();
        continue;
      }
      ++a;
      const Window& cur = win[k];
      if (cur.chosen && cur.e <= v && v < cur.p) continue;  // already covers i
      const std::uint64_t bytes = g_.tensors[gp.tensor].bytes;
      const double useful = double(std::min<std::uint64_t>(bytes, std::uint64_t(excess)));
      if (!cur.chosen) {
        const Window& h = hidden_[k];
        if (h.e <= v && v < h.p) {
          // Long coverage ahead of i helps the ops still to come; moving bytes costs link time.
          double score = useful * (time_at(h.p) - time_at(v) + 1e-9) /
                         (double(bytes) * (gp.dirty ? 2.0 : 1.0));
          if (score > hidden_score) {
            hidden_score = score;
            best_hidden = {std::int64_t(k), h};
          }
          continue;
        }
      }
      const Window& base = cur.chosen ? cur : hidden_[k];
      Window w{true, std::min(base.e, v), std::max(base.p, v + 1)};
      double extra = cost(gp, w) - (cur.chosen ? cost(gp, cur) : 0.0);
      double score = (extra + 1e-12) / useful;
      if (score < forced_score || (score == forced_score && bytes > forced_bytes)) {
        forced_score = score;
        forced_bytes = bytes;
        best_forced = {std::int64_t(k), w};
      }
    }
    return best_hidden.gap >= 0 ? best_hidden : best_forced;
  }

  // The planned memory at the sweep's op and after it: liveness's figure less what the chosen
  // windows save. The sweep reads only its current op, so a window's saving is kept as a
  // difference from the current op on (constant time per window, whatever its length).
  class Memory {
   public:
    explicit Memory(const std::vector<std::uint64_t>& base)
        : base_(base), diff_(base.size() + 1, 0) {}
    void move_to(std::int64_t i) {
      i_ = i;
      saved_ += diff_[std::size_t(i)];
    }
    std::int64_t now() const { return std::int64_t(base_[std::size_t(i_)]) - saved_; }
    // Lowers virtual ops [a, b) (virtual op v is op v % n) by `bytes`.
    void lower(std::int64_t a, std::int64_t b, std::int64_t bytes) {
      const auto n = std::int64_t(base_.size());
      while (a < b) {  // one piece per step the range touches
        const std::int64_t op = a % n, len = std::min(b - a, n - op);
        lower_ops(op, op + len, bytes);
        a += len;
      }
    }

   private:
    void lower_ops(std::int64_t a, std::int64_t b, std::int64_t bytes) {
      a = std::max(a, i_);  // ops the sweep has passed are never read again
      if (a >= b) return;
      if (a == i_) saved_ += bytes;
      else diff_[std::size_t(a)] += bytes;
      diff_[std::size_t(b)] -= bytes;
    }
    const std::vector<std::uint64_t>& base_;
    std::vector<std::int64_t> diff_;
    std::int64_t i_ = 0, saved_ = 0;
  };

  void apply(std::size_t k, const Window& w, std::vector<Window>& win, Memory& mem) const {
    const auto bytes = std::int64_t(g_.tensors[gaps_[k].tensor].bytes);
    const Window old = win[k];
    if (!old.chosen) {
      mem.lower(w.e, w.p, bytes);
    } else {
      mem.lower(w.e, old.e, bytes);
      mem.lower(old.p, w.p, bytes);
    }
    win[k] = w;
  }

  const Graph& g_;
  const LinkModel& link_;
  PlannerOptions o_;
  std::int64_t n_;
  Liveness live_;
  std::vector<Gap> gaps_;
  std::vector<double> start_;  // start time of each op without stalls; back() = step time
  double factor_ = 1.0;
  std::vector<Window> hidden_;  // per gap: hidden(gap) at factor_
};

}  // namespace

Plan plan_spill(const Graph& g, const std::vector<double>& op_times, const LinkModel& link,
                const PlannerOptions& o) {
  if (g.ops.empty()) return Plan::from_swaps("spill", o.budget, 0, {});
  SpillPlanner planner(g, op_times, link, o);
  BudgetCheck check = check_budget(g, o);
  Plan best;
  double best_time = std::numeric_limits<double>::infinity();
  // Slack for contention on the copy engines: 1 = each copy alone on the link.
  for (double factor : {1.0, 1.5, 2.5, 4.0}) {
    Plan p = planner.plan(factor);
    const bool moves_nothing = p.swaps.empty();
    SimResult r = simulate(g, op_times, link, &p, {o.budget, false, o.model});
    double t = r.step_time_s + (r.within_budget ? 0.0 : 1e30);
    if (t < best_time) {
      best_time = t;
      best = std::move(p);
    }
    if (moves_nothing) break;  // nothing to move: other factors would not differ
  }
  best.feasible = check.feasible;
  best.reason = check.message;
  return best;
}

}  // namespace spill::graph

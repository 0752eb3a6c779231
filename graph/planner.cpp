// The spill planner. One sweep over the ops: wherever the planned memory passes the budget,
// take the idle tensor that best covers the excess and evict it for (part of) its gap. A gap's
// window is [e, p): memory is saved from op e (after the copy out is expected to be done) to op
// p (where the prefetch is issued, early enough to arrive before the next use). When no hidden
// window covers the op, a window is stretched over it, trading predicted stall for memory.
// After the sweep two passes may refine the windows (plan_spill tries the plan with and without
// them): windows whose bytes fit where they save memory are dropped (largest first: bytes the
// link need not move), and prefetches are issued earlier where memory has room, so that the one
// engine to the device, which runs its copies in order, is busy whenever copies are waiting
// rather than idle until each prefetch's own latest moment (in a phase where the copies in take
// longer than the compute, a prefetch timed as if alone on the link arrives late). The second
// pass is also tried with the sweep's lead factor as slack on every copy of the queue: timed
// exactly, a queue is late as soon as anything slows it (the remakes and stalls the op times
// leave out, copies issued together in another order, the other direction's copies), and where
// memory has room an earlier start costs nothing (the trainer's gpt-medium on an H200 over
// PCIe 5 stalled 53 ms per step with most of its budget free).
// A second sweep takes the optimizer state and weights the step writes only where no other
// tensor's hidden window covers the op: such a tensor goes out after its update, at the step's
// end, where the optimizer's short ops hide little of the copy.
// With recomputation allowed, an activation's gap may be a recompute instead: its tensor is
// dropped after the gap's first use and its producer runs again before the next (saving memory
// over the whole gap, costing the producer's time on the compute stream, no link time). Only
// where everything else the producer touches is live, unchanged and resident then: the gaps that
// would take such a tensor away at that op are blocked from being chosen (one level). Two more
// sweeps per factor use it: one where a recompute competes with stretched (late) swaps by cost
// per byte, and one that prefers recomputing tensors whose remake costs less than copying them
// in (the link is then what the plan saves; in a step whose copies outlast the compute, hidden
// windows are not hidden). Where the remakes chosen leave an op over the budget (what their
// producers read is held resident there and nothing else can move), the sweep is run again
// without them. The sweeps remake in one level; after each, a chained variant is tried (chain()):
// a swapped activation whose producer costs less than its copy in becomes a remake where what
// the producer reads is resident or a remake that can move to that op first (its own inputs
// likewise, to three links), where memory allows.
// Several lead factors (slack for copy-engine contention) are tried and the plan whose
// simulation is fastest wins. Every window only ever lowers memory, and every idle swappable
// tensor can be stretched over any op, so the sweep meets the budget whenever check_budget does;
// the refining passes only raise memory where it stays within the budget.
#include <algorithm>
#include <cmath>
#include <limits>

#include "graph/device_model.hpp"
#include "graph/liveness.hpp"
#include "graph/planner.hpp"
#include "graph/simulator.hpp"

namespace spill::graph {
namespace {

// Values per op with range add and range max (a segment tree with lazy additions kept at the
// nodes, so queries need no pushing down): the passes after the sweep ask whether bytes fit over
// a stretch of ops, O(log n) each.
class MaxTree {
 public:
  explicit MaxTree(const std::vector<std::int64_t>& values)
      : n_(std::int64_t(values.size())), max_(4 * values.size() + 4, 0), add_(max_.size(), 0) {
    if (n_ > 0) build(1, 0, n_, values);
  }
  void add(std::int64_t a, std::int64_t b, std::int64_t v) {
    if (a < b) add(1, 0, n_, a, b, v);
  }
  std::int64_t max(std::int64_t a, std::int64_t b) const {
    return a < b ? max(1, 0, n_, a, b) : std::numeric_limits<std::int64_t>::min();
  }
  // The last index in [a, b) whose value is above `limit`, or -1.
  std::int64_t last_above(std::int64_t a, std::int64_t b, std::int64_t limit) const {
    return a < b ? last_above(1, 0, n_, a, b, limit) : -1;
  }

 private:
  void build(std::size_t node, std::int64_t l, std::int64_t r, const std::vector<std::int64_t>& v) {
    if (r - l == 1) {
      max_[node] = v[std::size_t(l)];
      return;
    }
    const std::int64_t m = (l + r) / 2;
    build(2 * node, l, m, v);
    build(2 * node + 1, m, r, v);
    max_[node] = std::max(max_[2 * node], max_[2 * node + 1]);
  }
  // max_[node] is the node's maximum with its own additions, not its ancestors'.
  void add(std::size_t node, std::int64_t l, std::int64_t r, std::int64_t a, std::int64_t b,
           std::int64_t v) {
    if (b <= l || r <= a) return;
    if (a <= l && r <= b) {
      max_[node] += v;
      add_[node] += v;
      return;
    }
    const std::int64_t m = (l + r) / 2;
    add(2 * node, l, m, a, b, v);
    add(2 * node + 1, m, r, a, b, v);
    max_[node] = std::max(max_[2 * node], max_[2 * node + 1]) + add_[node];
  }
  std::int64_t max(std::size_t node, std::int64_t l, std::int64_t r, std::int64_t a,
                   std::int64_t b) const {
    if (b <= l || r <= a) return std::numeric_limits<std::int64_t>::min();
    if (a <= l && r <= b) return max_[node];
    const std::int64_t m = (l + r) / 2;
    return std::max(max(2 * node, l, m, a, b), max(2 * node + 1, m, r, a, b)) + add_[node];
  }
  // `limit` is relative to the node: its ancestors' additions are subtracted.
  std::int64_t last_above(std::size_t node, std::int64_t l, std::int64_t r, std::int64_t a,
                          std::int64_t b, std::int64_t limit) const {
    if (b <= l || r <= a || max_[node] <= limit) return -1;
    if (r - l == 1) return l;
    const std::int64_t m = (l + r) / 2, below = limit - add_[node];
    const std::int64_t right = last_above(2 * node + 1, m, r, a, b, below);
    return right >= 0 ? right : last_above(2 * node, l, m, a, b, below);
  }
  std::int64_t n_;
  std::vector<std::int64_t> max_, add_;
};

class SpillPlanner {
 public:
  SpillPlanner(const Graph& g, const std::vector<double>& times, const LinkModel& link,
               const PlannerOptions& o)
      : g_(g), link_(link), o_(o), n_(std::int64_t(g.ops.size())), live_(analyze_liveness(g)),
        gaps_(idle_gaps(g, live_, std::max<std::uint64_t>(o.min_swap_bytes, 1))),
        budget_(std::int64_t(std::min<std::uint64_t>(
            o.budget, std::uint64_t(std::numeric_limits<std::int64_t>::max())))) {
    start_.resize(g.ops.size() + 1, 0);
    for (std::size_t i = 0; i < g.ops.size(); ++i) start_[i + 1] = start_[i] + times[i];
    maker_.assign(gaps_.size(), -1);
    needs_.assign(gaps_.size(), {});
    if (o.recompute) find_remakes(times);
  }

  // Which passes follow the sweep (see the header comment).
  enum class Refine { None, Hoist, DropAndHoist, HoistWithSlack, DropAndHoistWithSlack };
  // Whether a sweep may choose recomputes: no; where one costs less per byte than the stall of
  // a stretched swap; or also first wherever the remake costs less than the copy in.
  enum class Remake { Off, Forced, Prefer };

  struct Window {
    bool chosen = false;
    std::int64_t e = 0, p = 0;  // saves memory over virtual ops [e, p)
    bool remake = false;        // a recompute (over the whole gap), not a swap
  };

  bool can_remake() const {
    return std::any_of(maker_.begin(), maker_.end(), [](std::int64_t m) { return m >= 0; });
  }

  // A gap of a tensor the step writes that lasts into the next step (a weight or optimizer
  // state): evicting it is a copy out after its last write, at the step's end, where the
  // optimizer's short ops hide little.
  static bool written_state(const Gap& gp) { return gp.wraps && gp.dirty; }

  // The sweep with lead factor `factor`: each gap's window. With `defer_state`, a written
  // state's hidden window is taken only where no other tensor's covers the op.
  std::vector<Window> sweep(double factor, bool defer_state, Remake remake = Remake::Off) {
    factor_ = factor;
    defer_state_ = defer_state;
    remake_ = remake;
    cap_.assign(gaps_.size(), std::numeric_limits<std::int64_t>::max());
    cappers_.assign(gaps_.size(), {});
    stuck_.clear();
    if (banned_.size() != gaps_.size()) banned_.assign(gaps_.size(), 0);
    hidden_.resize(gaps_.size());  // a gap's hidden window depends only on the factor
    for (std::size_t k = 0; k < gaps_.size(); ++k) hidden_[k] = hidden(gaps_[k]);
    std::vector<Window> win(gaps_.size());
    Memory mem(live_.memory);
    std::vector<std::size_t> active;
    std::vector<bool> in_active(gaps_.size(), false);
    for (std::size_t k = 0; k < gaps_.size(); ++k)
      if (gaps_[k].wraps && gaps_[k].to - n_ > 0) {
        active.push_back(k);
        in_active[k] = true;
      }
    std::vector<std::vector<std::size_t>> back_at(static_cast<std::size_t>(n_));
    std::size_t next_gap = 0;
    for (std::int64_t i = 0; i < n_; ++i) {
      mem.move_to(i);
      auto enter = [&](std::size_t k) {
        if (!in_active[k]) active.push_back(k);
        in_active[k] = true;
      };
      for (std::size_t k : back_at[std::size_t(i)]) enter(k);
      for (; next_gap < gaps_.size() && gaps_[next_gap].from < i; ++next_gap) enter(next_gap);
      while (mem.now() > budget_) {
        std::int64_t excess = mem.now() - budget_;
        Choice best = choose(i, excess, active, in_active, back_at, win);
        if (best.gap < 0) {  // nothing left to move: check_budget reports why
          note_stuck(i);
          break;
        }
        apply(std::size_t(best.gap), best.window, win, mem);
      }
    }
    return win;
  }

  // The recomputes chosen in the last sweep whose remakes kept a tensor resident at an op the
  // sweep could not bring within the budget; banning them and sweeping again is the repair.
  const std::vector<std::size_t>& stuck() const { return stuck_; }
  void ban(const std::vector<std::size_t>& remakes) {
    for (std::size_t k : remakes) banned_[k] = 1;
  }
  void clear_bans() { banned_.assign(gaps_.size(), 0); }

  bool takes_written_state(const std::vector<Window>& win) const {
    for (std::size_t k = 0; k < gaps_.size(); ++k)
      if (win[k].chosen && written_state(gaps_[k])) return true;
    return false;
  }

  // The plan of swept windows after the passes `refine` asks for.
  Plan plan(std::vector<Window> win, Refine refine) const {
    if (refine != Refine::None)
      this->refine(win, refine == Refine::DropAndHoist || refine == Refine::DropAndHoistWithSlack,
                   refine == Refine::HoistWithSlack || refine == Refine::DropAndHoistWithSlack
                       ? factor_
                       : 1.0);
    std::vector<Swap> swaps;
    std::vector<Recompute> remakes;
    for (std::size_t k = 0; k < gaps_.size(); ++k) {
      if (!win[k].chosen) continue;
      if (win[k].remake) {  // a chain's link is remade where its window ends, before its use
        remakes.push_back({gaps_[k].tensor, gaps_[k].from, gaps_[k].to,
                           win[k].p < gaps_[k].to ? win[k].p : -1});
        continue;
      }
      // The eviction is issued right after the last use; the window start only models when
      // its memory is expected back. A dead gap's window ends at the step's end (its `to`).
      swaps.push_back({gaps_[k].tensor, gaps_[k].from, win[k].p, gaps_[k].to, gaps_[k].dead});
    }
    Plan p = Plan::from_swaps("spill", o_.budget, g_.ops.size(), std::move(swaps),
                              std::move(remakes));
    order_remakes(g_, p);
    return p;
  }

  // Chained remakes: swapped activations whose producer costs less than their copy in, made
  // remakes where what the producer reads is resident at the remake or is itself remade there
  // first (a dropped input's remake moves to that op; its own inputs likewise, up to
  // kChainDepth links), where the planned memory stays within the budget. The windows are
  // unchanged when nothing qualifies (returns false).
  static constexpr int kChainDepth = 3;
  bool chain(std::vector<Window>& win) const {
    auto bytes_of = [&](std::size_t k) { return std::int64_t(g_.tensors[gaps_[k].tensor].bytes); };
    MaxTree mem = memory_of(win);
    bool changed = false;
    for (std::size_t k = 0; k < gaps_.size(); ++k) {
      const Gap& gp = gaps_[k];
      if (maker_[k] < 0 || !win[k].chosen || win[k].remake || remake_s_[k] >= lead(gp)) continue;
      if (needed_inside(k, win)) continue;  // a chosen remake reads the tensor inside its gap
      // The remakes to move to gp.to (gap, its old remake point), found depth first.
      std::vector<std::pair<std::size_t, std::int64_t>> moves;
      if (!chainable(k, gp.to, win, kChainDepth, moves)) continue;
      // Memory: the tensor is away over its whole gap (instead of its swap window); each moved
      // link is resident from gp.to to its old remake point.
      const Window old = win[k];
      const std::int64_t b = bytes_of(k);
      mem.add(old.e, old.p, b);
      mem.add(gp.from + 1, gp.to, -b);
      bool fits = true;
      for (auto [j, was] : moves) {
        mem.add(gp.to, was, bytes_of(j));
        fits = fits && mem.max(gp.to, was) <= budget_;
      }
      if (!fits) {  // undo
        for (auto [j, was] : moves) mem.add(gp.to, was, -bytes_of(j));
        mem.add(gp.from + 1, gp.to, b);
        mem.add(old.e, old.p, -b);
        continue;
      }
      for (auto [j, was] : moves) win[j].p = gp.to;
      win[k] = {true, gp.from + 1, gp.to, true};
      changed = true;
    }
    return changed;
  }

 private:
  struct Choice {
    std::int64_t gap = -1;
    Window window;
  };

  double time_at(std::int64_t v) const {
    return v < n_ ? start_[std::size_t(v)] : start_.back() + start_[std::size_t(v - n_)];
  }
  // The copy in (none for a dead gap: nothing needs the tensor back) and the copy out.
  double lead(const Gap& gp) const {
    return gp.dead ? 0.0 : copy_time_s(link_, g_.tensors[gp.tensor].bytes, true, false);
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
  // Which gaps may be recomputes (maker_: the op that remakes the tensor) and, for each, the
  // gaps of the tensors its producer touches that are idle at the remake, with the virtual op
  // of the remake in them (needs_): a gap of an activation made by a recomputable op (and not
  // used before it) whose producer's other tensors are live at the next use and not written
  // after the producer before it.
  void find_remakes(const std::vector<double>& times) {
    gaps_of_.assign(g_.tensors.size(), {});
    for (std::size_t k = 0; k < gaps_.size(); ++k) gaps_of_[gaps_[k].tensor].push_back(k);
    const auto& gaps_of = gaps_of_;
    std::vector<std::vector<std::int64_t>> writers(g_.tensors.size());
    std::vector<std::int64_t> maker_of(g_.tensors.size(), -1);
    for (std::size_t i = 0; i < g_.ops.size(); ++i)
      for (TensorIndex t : g_.ops[i].writes) {
        if (writers[t].empty() && g_.ops[i].recomputable) maker_of[t] = std::int64_t(i);
        writers[t].push_back(std::int64_t(i));
      }
    remake_s_.assign(gaps_.size(), 0.0);
    for (std::size_t k = 0; k < gaps_.size(); ++k) {
      const Gap& gp = gaps_[k];
      const std::int64_t m = maker_of[gp.tensor];
      if (gp.wraps || gp.dead || m < 0 || gp.from < m ||
          g_.tensors[gp.tensor].kind != TensorKind::Activation)
        continue;
      bool ok = true;
      std::vector<std::pair<std::size_t, std::int64_t>> needs;
      const Op& op = g_.ops[std::size_t(m)];
      for (const auto* list : {&op.reads, &op.writes})
        for (TensorIndex x : *list) {
          if (x == gp.tensor) continue;
          ok = ok && (persistent(g_.tensors[x].kind) || live_.live[x].live_at(gp.to));
          for (std::int64_t w : writers[x]) ok = ok && (w <= m || w >= gp.to);
          for (std::size_t j : gaps_of[x])
            if (const std::int64_t at = idle_index(gaps_[j], gp.to); at >= 0)
              needs.push_back({j, at});
        }
      if (!ok) continue;
      maker_[k] = m;
      needs_[k] = std::move(needs);
      remake_s_[k] = times[std::size_t(m)];
    }
  }
  // Gap k can be a recompute now: no chosen recompute needs its tensor inside it, and no
  // window chosen takes away a tensor its remake needs (a swap's window ends, where its
  // prefetch is issued, by the remake; a recompute's covers its whole gap).
  bool remakable(std::size_t k, const std::vector<Window>& win) const {
    if (maker_[k] < 0 || banned_[k] || cap_[k] != std::numeric_limits<std::int64_t>::max())
      return false;
    for (auto [j, at] : needs_[k])
      if (win[j].chosen && (win[j].remake || win[j].p > at)) return false;
    return true;
  }

  // Whether a chosen remake's producer touches gap k's tensor where the gap is idle (it relies
  // on the tensor being resident there).
  bool needed_inside(std::size_t k, const std::vector<Window>& win) const {
    const TensorIndex t = gaps_[k].tensor;
    for (std::size_t r = 0; r < gaps_.size(); ++r) {
      if (!win[r].chosen || !win[r].remake || idle_index(gaps_[k], win[r].p) < 0) continue;
      const Op& op = g_.ops[std::size_t(maker_[r])];
      for (const auto* list : {&op.reads, &op.writes})
        if (std::find(list->begin(), list->end(), t) != list->end()) return true;
    }
    return false;
  }

  // Whether gap k's producer can run again before op `at` with what the windows leave resident
  // there, remaking dropped inputs first (their remake points move to `at`: `moves`, with each
  // one's old point) to `depth` links. Inputs swapped out at `at` are refused.
  bool chainable(std::size_t k, std::int64_t at, const std::vector<Window>& win, int depth,
                 std::vector<std::pair<std::size_t, std::int64_t>>& moves) const {
    if (maker_[k] < 0) return false;
    const Op& op = g_.ops[std::size_t(maker_[k])];
    for (const auto* list : {&op.reads, &op.writes})
      for (TensorIndex x : *list) {
        if (x == gaps_[k].tensor) continue;
        if (!persistent(g_.tensors[x].kind) && !live_.live[x].live_at(at)) return false;
        for (std::size_t j : gaps_of_[x]) {
          const std::int64_t v = idle_index(gaps_[j], at);
          if (v < 0 || !win[j].chosen) continue;  // in use at `at`, or kept: resident
          if (!win[j].remake) {
            if (v < win[j].p) return false;  // swapped out, its prefetch not issued yet
            continue;
          }
          if (v >= win[j].p) continue;  // remade by then (a link already moved to `at`)
          // Dropped at `at`: a link of the chain when its own inputs can be remade there too.
          if (depth <= 1) return false;
          if (std::any_of(moves.begin(), moves.end(), [&](auto m) { return m.first == j; })) continue;
          moves.push_back({j, win[j].p});
          if (!chainable(j, at, win, depth - 1, moves)) return false;
        }
      }
    return true;
  }

  // Whether a chosen recompute keeps gap k's tensor resident at its virtual op v: from its cap
  // on, and over the whole of a dead gap (whose window cannot end before the step's end).
  bool capped_out(std::size_t k, std::int64_t v) const {
    return v >= cap_[k] ||
           (gaps_[k].dead && cap_[k] != std::numeric_limits<std::int64_t>::max());
  }

  // Virtual index of op i inside the gap, or -1 when the tensor is in use at i.
  std::int64_t idle_index(const Gap& gp, std::int64_t i) const {
    if (i > gp.from && i < gp.to) return i;
    if (i + n_ > gp.from && i + n_ < gp.to) return i + n_;
    return -1;
  }

  // The best candidate at op i. Gaps not idle at i leave `active`, and so do chosen ones
  // whose window covers i, until the op where it ends (`back_at`): the scan is over the gaps
  // that could still be chosen or stretched.
  Choice choose(std::int64_t i, std::int64_t excess, std::vector<std::size_t>& active,
                std::vector<bool>& in_active, std::vector<std::vector<std::size_t>>& back_at,
                const std::vector<Window>& win) const {
    Choice best_hidden, best_deferred, best_forced, best_remake;
    double hidden_score = -1, deferred_score = -1, remake_score = -1;
    double forced_score = std::numeric_limits<double>::infinity();
    std::uint64_t forced_bytes = 0;
    for (std::size_t a = 0; a < active.size();) {
      const std::size_t k = active[a];
      const Gap& gp = gaps_[k];
      const std::int64_t v = idle_index(gp, i);
      const Window& cur = win[k];
      const bool covered = v >= 0 && cur.chosen && cur.e <= v && v < cur.p;
      if (v < 0 || covered) {  // a wrapping gap also comes back through next_gap at from + 1
        if (covered && cur.p < gp.to) {
          const std::int64_t back = cur.p - (v >= n_ ? n_ : 0);
          if (back < n_) back_at[std::size_t(back)].push_back(k);
        }
        in_active[k] = false;
        active[a] = active.back();
        active.pop_back();
        continue;
      }
      ++a;
      // A chosen recompute needs the tensor back by virtual op cap: windows end there.
      const std::int64_t cap = cap_[k];
      if (capped_out(k, v)) continue;
      const std::uint64_t bytes = g_.tensors[gp.tensor].bytes;
      const double useful = double(std::min<std::uint64_t>(bytes, std::uint64_t(excess)));
      if (remake_ != Remake::Off && !cur.chosen && remakable(k, win)) {
        const Window whole{true, gp.from + 1, gp.to, true};
        const double rc = remake_s_[k];
        if (remake_ == Remake::Prefer && rc <= lead(gp)) {
          const double score = useful / (rc + 1e-12);  // bytes saved per second remaking
          if (score > remake_score) {
            remake_score = score;
            best_remake = {std::int64_t(k), whole};
          }
          continue;
        }
        const double score = (rc + 1e-12) / useful;  // competes with stretched swaps
        if (score < forced_score || (score == forced_score && bytes > forced_bytes)) {
          forced_score = score;
          forced_bytes = bytes;
          best_forced = {std::int64_t(k), whole};
        }
      }
      if (!cur.chosen) {
        Window h = hidden_[k];
        h.p = std::min(h.p, cap);
        if (h.e <= v && v < h.p) {
          // Long coverage ahead of i helps the ops still to come; moving bytes costs link time.
          const double copies = std::max(1, (gp.dead ? 0 : 1) + (gp.dirty ? 1 : 0));
          double score = useful * (time_at(h.p) - time_at(v) + 1e-9) / (double(bytes) * copies);
          const bool later = defer_state_ && written_state(gp);
          double& best_score = later ? deferred_score : hidden_score;
          if (score > best_score) {
            best_score = score;
            (later ? best_deferred : best_hidden) = {std::int64_t(k), h};
          }
          continue;
        }
      }
      const Window& base = cur.chosen ? cur : hidden_[k];
      Window w{true, std::min(base.e, v), std::min(std::max(base.p, v + 1), cap)};
      double extra = cost(gp, w) - (cur.chosen ? cost(gp, cur) : 0.0);
      double score = (extra + 1e-12) / useful;
      if (score < forced_score || (score == forced_score && bytes > forced_bytes)) {
        forced_score = score;
        forced_bytes = bytes;
        best_forced = {std::int64_t(k), w};
      }
    }
    if (best_remake.gap >= 0) return best_remake;
    if (best_hidden.gap >= 0) return best_hidden;
    return best_deferred.gap >= 0 ? best_deferred : best_forced;
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

  void apply(std::size_t k, const Window& w, std::vector<Window>& win, Memory& mem) {
    const auto bytes = std::int64_t(g_.tensors[gaps_[k].tensor].bytes);
    const Window old = win[k];
    if (w.remake)
      for (auto [j, at] : needs_[k]) {
        cap_[j] = std::min(cap_[j], at);
        cappers_[j].push_back(k);
      }
    if (!old.chosen) {
      mem.lower(w.e, w.p, bytes);
    } else {
      mem.lower(w.e, old.e, bytes);
      mem.lower(old.p, w.p, bytes);
    }
    win[k] = w;
  }

  // The sweep is over the budget at op i with nothing left to choose: the remakes that capped a
  // gap idle at i (keeping its tensor resident there) are to blame.
  void note_stuck(std::int64_t i) {
    for (std::size_t k = 0; k < gaps_.size(); ++k) {
      const std::int64_t v = idle_index(gaps_[k], i);
      if (v < 0 || !capped_out(k, v)) continue;
      stuck_.insert(stuck_.end(), cappers_[k].begin(), cappers_[k].end());
    }
  }

  // Calls f(a, b, v) for the pieces of ops [a, b) that virtual ops [va, vb) cover (v: the
  // virtual op of a), the later piece first. A window is at most a step long.
  template <class F>
  void pieces(std::int64_t va, std::int64_t vb, F&& f) const {
    if (va >= vb) return;
    if (va < n_ && vb > n_) {
      f(std::int64_t(0), vb - n_, n_);
      f(va, n_, va);
    } else {
      const std::int64_t off = va >= n_ ? n_ : 0;
      f(va - off, vb - off, va);
    }
  }

  // The sweep's memory model of a set of windows: liveness's curve less each chosen window's
  // bytes over its virtual ops [e, p).
  MaxTree memory_of(const std::vector<Window>& win) const {
    std::vector<std::int64_t> diff(std::size_t(n_) + 1, 0);
    for (std::size_t k = 0; k < gaps_.size(); ++k)
      if (win[k].chosen) {
        const auto bytes = std::int64_t(g_.tensors[gaps_[k].tensor].bytes);
        pieces(win[k].e, win[k].p, [&](std::int64_t a, std::int64_t b, std::int64_t) {
          diff[std::size_t(a)] -= bytes;
          diff[std::size_t(b)] += bytes;
        });
      }
    std::vector<std::int64_t> curve(static_cast<std::size_t>(n_));
    std::int64_t run = 0;
    for (std::int64_t i = 0; i < n_; ++i) {
      run += diff[std::size_t(i)];
      curve[std::size_t(i)] = std::int64_t(live_.memory[std::size_t(i)]) + run;
    }
    return MaxTree(curve);
  }

  // The passes after the sweep. The memory curve is the sweep's model: liveness's curve less
  // each chosen window's bytes over its virtual ops [e, p).
  void refine(std::vector<Window>& win, bool drop, double slack) const {
    std::vector<std::size_t> chosen;
    auto bytes_of = [&](std::size_t k) { return std::int64_t(g_.tensors[gaps_[k].tensor].bytes); };
    for (std::size_t k = 0; k < gaps_.size(); ++k)
      if (win[k].chosen) chosen.push_back(k);
    MaxTree mem = memory_of(win);
    auto raise = [&](std::int64_t va, std::int64_t vb, std::int64_t bytes) {
      pieces(va, vb, [&](std::int64_t a, std::int64_t b, std::int64_t) { mem.add(a, b, bytes); });
    };
    if (drop) {
      // Largest first: a window dropped is a copy each way the link does not make.
      std::stable_sort(chosen.begin(), chosen.end(),
                       [&](std::size_t a, std::size_t b) { return bytes_of(a) > bytes_of(b); });
      std::erase_if(chosen, [&](std::size_t k) {
        std::int64_t most = std::numeric_limits<std::int64_t>::min();
        pieces(win[k].e, win[k].p, [&](std::int64_t a, std::int64_t b, std::int64_t) {
          most = std::max(most, mem.max(a, b));
        });
        if (most + bytes_of(k) > budget_) return false;
        raise(win[k].e, win[k].p, bytes_of(k));
        win[k].chosen = false;
        return true;
      });
    }
    // The latest start of each copy in, last use first: one engine copies them in order, so
    // each ends by its use and before the next one starts (each taking `slack` times its time
    // alone). Recomputes and dead gaps copy nothing in.
    std::erase_if(chosen, [&](std::size_t k) { return win[k].remake || gaps_[k].dead; });
    std::stable_sort(chosen.begin(), chosen.end(),
                     [&](std::size_t a, std::size_t b) { return gaps_[a].to > gaps_[b].to; });
    std::vector<double> latest(chosen.size());
    double next_start = std::numeric_limits<double>::infinity();
    for (std::size_t j = 0; j < chosen.size(); ++j) {
      const Gap& gp = gaps_[chosen[j]];
      latest[j] = std::min(time_at(gp.to), next_start) - lead(gp) * slack;
      next_start = latest[j];
    }
    // First use first: each prefetch moves to the latest op that starts by its latest start,
    // or as far towards it as memory has room for the tensor (never before its window begins).
    for (std::size_t j = chosen.size(); j-- > 0;) {
      Window& w = win[chosen[j]];
      const std::int64_t bytes = bytes_of(chosen[j]);
      if (time_at(w.p) <= latest[j] || w.p <= w.e + 1) continue;
      std::int64_t lo = w.e + 1, hi = w.p;  // the target: largest v in [lo, hi] starting in time
      while (lo < hi) {
        const std::int64_t mid = (lo + hi + 1) / 2;
        if (time_at(mid) <= latest[j]) lo = mid;
        else hi = mid - 1;
      }
      std::int64_t p = lo;  // after the last op in [lo, w.p) without room for the tensor
      bool found = false;
      pieces(lo, w.p, [&](std::int64_t a, std::int64_t b, std::int64_t v) {
        if (found) return;
        const std::int64_t full = mem.last_above(a, b, budget_ - bytes);
        if (full >= 0) {
          p = v + (full - a) + 1;
          found = true;
        }
      });
      raise(p, w.p, bytes);
      w.p = p;
    }
  }

  const Graph& g_;
  const LinkModel& link_;
  PlannerOptions o_;
  std::int64_t n_;
  Liveness live_;
  std::vector<Gap> gaps_;
  std::int64_t budget_;
  std::vector<double> start_;  // start time of each op without stalls; back() = step time
  double factor_ = 1.0;
  bool defer_state_ = false;
  std::vector<Window> hidden_;  // per gap: hidden(gap) at factor_
  Remake remake_ = Remake::Off;
  std::vector<std::int64_t> maker_;               // per gap (find_remakes)
  std::vector<std::vector<std::pair<std::size_t, std::int64_t>>> needs_;  // per gap
  std::vector<double> remake_s_;                  // per gap: the producer's time
  std::vector<std::vector<std::size_t>> gaps_of_;  // per tensor: its gaps
  // Per gap: the virtual op by which a chosen recompute needs its tensor back (no window of
  // the gap may reach past it); max when none does.
  std::vector<std::int64_t> cap_;
  std::vector<std::vector<std::size_t>> cappers_;  // per gap: the chosen remakes that capped it
  std::vector<std::size_t> stuck_;                 // see stuck()
  std::vector<char> banned_;                       // per gap: no recompute (see ban())
};

}  // namespace

Plan plan_spill(const Graph& g, const std::vector<double>& op_times, const LinkModel& link,
                const PlannerOptions& o) {
  if (g.ops.empty()) return Plan::from_swaps("spill", o.budget, 0, {});
  SpillPlanner planner(g, op_times, link, o);
  BudgetCheck check = check_budget(g, o);
  Plan best;
  double best_time = std::numeric_limits<double>::infinity();
  // Slack for contention on the copy engines: 1 = each copy alone on the link. Each factor's
  // sweep (and once the sweep that takes written state last), as swept and refined; on a tie
  // the earlier plan stays.
  using Refine = SpillPlanner::Refine;
  bool moves_nothing = false;
  const bool remakes = o.recompute && planner.can_remake();
  for (double factor : {1.0, 1.5, 2.5, 4.0}) {
    std::vector<std::vector<SpillPlanner::Window>> swept{planner.sweep(factor, false)};
    // Deferring written state changes nothing when the plain sweep took none; it is tried
    // at the first factor only (at the others it gained under 1% on the zoo models).
    if (factor == 1.0 && planner.takes_written_state(swept[0]))
      swept.push_back(planner.sweep(factor, true));
    if (remakes)
      for (auto mode : {SpillPlanner::Remake::Forced, SpillPlanner::Remake::Prefer}) {
        // A remake keeps what its producer reads resident at the remake; where that leaves an
        // op over the budget, sweep again without the remakes to blame (a few rounds).
        planner.clear_bans();
        auto windows = planner.sweep(factor, false, mode);
        for (int round = 0; round < 8 && !planner.stuck().empty(); ++round) {
          planner.ban(planner.stuck());
          windows = planner.sweep(factor, false, mode);
        }
        swept.push_back(windows);
        // The same with chained remakes where a producer costs less than the copy it saves.
        if (planner.chain(windows)) swept.push_back(std::move(windows));
      }
    for (const auto& windows : swept) {
      for (Refine refine : {Refine::None, Refine::Hoist, Refine::DropAndHoist,
                            Refine::HoistWithSlack, Refine::DropAndHoistWithSlack}) {
        if (factor == 1.0 && refine >= Refine::HoistWithSlack) break;  // the same as without
        Plan p = planner.plan(windows, refine);
        moves_nothing = p.swaps.empty() && p.recomputes.empty();
        SimResult r = simulate(g, op_times, link, &p, {o.budget, false, o.model});
        double t = r.step_time_s + (r.within_budget ? 0.0 : 1e30);
        if (t < best_time) {
          best_time = t;
          best = std::move(p);
        }
        if (moves_nothing) break;  // nothing to move: nothing to refine or defer
      }
      if (moves_nothing) break;
    }
    if (moves_nothing) break;  // other factors would not differ
  }
  best.feasible = check.feasible;
  best.reason = check.message;
  return best;
}

}  // namespace spill::graph

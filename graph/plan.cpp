#include "graph/plan.hpp"

#include <algorithm>

#include "core/errors.hpp"
#include "graph/liveness.hpp"

namespace spill::graph {

Plan Plan::from_swaps(std::string policy, std::uint64_t budget, std::size_t n_ops,
                      std::vector<Swap> swaps, std::vector<Recompute> recomputes) {
  Plan p;
  p.policy = std::move(policy);
  p.budget_bytes = budget;
  p.steps.resize(n_ops);
  const auto n = static_cast<std::int64_t>(n_ops);
  std::sort(swaps.begin(), swaps.end(), [](const Swap& a, const Swap& b) {
    return a.evict_after != b.evict_after ? a.evict_after < b.evict_after : a.tensor < b.tensor;
  });
  for (const Swap& s : swaps) {
    p.steps[std::size_t(s.evict_after % n)].evict_after.push_back(s.tensor);
    if (s.to_step_end) continue;  // never brought back in the step
    p.steps[std::size_t(s.prefetch_at % n)].prefetch_at.push_back(s.tensor);
    // Prefetched in the next step: it must already be on the host when a step begins.
    if (s.prefetch_at >= n) p.start_on_host.push_back(s.tensor);
  }
  std::sort(p.start_on_host.begin(), p.start_on_host.end());
  p.swaps = std::move(swaps);
  std::sort(recomputes.begin(), recomputes.end(), [](const Recompute& a, const Recompute& b) {
    return a.drop_after != b.drop_after ? a.drop_after < b.drop_after : a.tensor < b.tensor;
  });
  for (const Recompute& r : recomputes) {
    p.steps[std::size_t(r.drop_after)].drop_after.push_back(r.tensor);
    p.steps[std::size_t(r.remade_before())].recompute_before.push_back(r.tensor);
  }
  p.recomputes = std::move(recomputes);
  return p;
}

std::uint64_t Plan::recomputed_bytes(const Graph& g) const {
  std::uint64_t sum = 0;
  for (const Recompute& r : recomputes) sum += g.tensors[r.tensor].bytes;
  return sum;
}

std::size_t Plan::chain_links() const {
  return std::size_t(std::count_if(recomputes.begin(), recomputes.end(),
                                   [](const Recompute& r) { return r.remade_before() != r.next_use; }));
}

std::int64_t remaking_op(const Graph& g, TensorIndex t) {
  if (t >= g.tensors.size() || g.tensors[t].kind != TensorKind::Activation) return -1;
  for (std::size_t i = 0; i < g.ops.size(); ++i) {
    const Op& op = g.ops[i];
    if (std::find(op.writes.begin(), op.writes.end(), t) != op.writes.end())
      return op.recomputable ? std::int64_t(i) : -1;  // validate(): its only writer
  }
  return -1;
}

void order_remakes(const Graph& g, Plan& p) {
  for (PlanStep& s : p.steps)
    std::stable_sort(s.recompute_before.begin(), s.recompute_before.end(),
                     [&](TensorIndex a, TensorIndex b) {
                       return remaking_op(g, a) < remaking_op(g, b);
                     });
}

namespace {

// The recompute rules of check_plan (see plan.hpp).
void check_recomputes(const Graph& g, const Plan& p, const Liveness& l) {
  const auto n = static_cast<std::int64_t>(g.ops.size());
  std::vector<std::vector<OpIndex>> writers(g.tensors.size());
  for (std::size_t i = 0; i < g.ops.size(); ++i)
    for (TensorIndex t : g.ops[i].writes)
      if (writers[t].empty() || writers[t].back() != i) writers[t].push_back(OpIndex(i));
  // Whether tensor x is away just before op u by some action of the plan: evicted and its
  // prefetch not issued yet (once issued, the remake waits for it as an op would).
  auto swapped_at = [&](TensorIndex x, std::int64_t u) {
    for (const Swap& s : p.swaps)
      if (s.tensor == x && ((s.evict_after < u && u < s.prefetch_at) ||
                            (s.evict_after < u + n && u + n < s.prefetch_at)))
        return true;
    return false;
  };
  // The recompute of x whose drop covers the moment just before op u, if any (remade at u
  // counts: whether it comes before the remake that reads it depends on the list's order).
  auto dropped_at = [&](TensorIndex x, std::int64_t u) -> const Recompute* {
    for (const Recompute& r : p.recomputes)
      if (r.tensor == x && r.drop_after < u && u <= r.remade_before()) return &r;
    return nullptr;
  };
  for (std::size_t k = 0; k < p.recomputes.size(); ++k) {
    const Recompute& r = p.recomputes[k];
    const std::string at = "plan '" + p.policy + "' recompute " + std::to_string(k);
    SPILL_EXPECTS(r.tensor < g.tensors.size(), at + ": no tensor " + std::to_string(r.tensor));
    const std::string name = "'" + g.tensors[r.tensor].name + "'";
    const std::int64_t maker = remaking_op(g, r.tensor);
    SPILL_EXPECTS(maker >= 0, at + ": tensor " + name +
                                  " is not an activation made by a recomputable op");
    const std::int64_t when = r.remade_before();
    SPILL_EXPECTS(r.drop_after >= maker && r.drop_after + 1 < when && when <= r.next_use &&
                      r.next_use < n,
                  at + " (" + name + "): drop_after " + std::to_string(r.drop_after) +
                      ", remade before op " + std::to_string(when) + ", next_use " +
                      std::to_string(r.next_use) + " are out of order or range (made by op " +
                      std::to_string(maker) + ")");
    const auto& uses = l.uses[r.tensor];
    SPILL_EXPECTS(std::binary_search(uses.begin(), uses.end(), OpIndex(r.next_use)),
                  at + ": op " + std::to_string(r.next_use) + " does not use tensor " + name);
    for (OpIndex u : uses)
      SPILL_EXPECTS(!(std::int64_t(u) > r.drop_after && std::int64_t(u) < r.next_use),
                    at + ": tensor " + name + " is used by op " + std::to_string(u) +
                        " while it is dropped");
    for (const Swap& s : p.swaps)
      SPILL_EXPECTS(s.tensor != r.tensor || s.next_use <= r.drop_after ||
                        s.evict_after >= r.next_use,
                    at + ": tensor " + name + " is also swapped inside its window");
    for (std::size_t j = 0; j < p.recomputes.size(); ++j) {
      const Recompute& o = p.recomputes[j];
      SPILL_EXPECTS(j == k || o.tensor != r.tensor || o.next_use <= r.drop_after ||
                        o.drop_after >= r.next_use,
                    at + ": overlaps another recompute of tensor " + name);
    }
    // What the producer touches besides the tensor is there, and as it was, at the remake: a
    // dropped one only when it is remade before the same op, earlier in the list (a chain).
    const Op& op = g.ops[std::size_t(maker)];
    const auto& list_at = p.steps[std::size_t(when)].recompute_before;
    const auto self = std::find(list_at.begin(), list_at.end(), r.tensor);
    SPILL_EXPECTS(self != list_at.end(),
                  at + ": tensor " + name + " is not in the remakes before op " + std::to_string(when));
    for (const auto* list : {&op.reads, &op.writes}) {
      for (TensorIndex x : *list) {
        if (x == r.tensor) continue;
        const std::string input = at + " (" + name + " before op " + std::to_string(when) +
                                  "): its producer's tensor '" + g.tensors[x].name + "' ";
        SPILL_EXPECTS(persistent(g.tensors[x].kind) || l.live[x].live_at(when),
                      input + "is no longer live there");
        for (OpIndex w : writers[x])
          SPILL_EXPECTS(std::int64_t(w) <= maker || std::int64_t(w) >= when,
                        input + "is written by op " + std::to_string(w) + " in between");
        SPILL_EXPECTS(!swapped_at(x, when), input + "is swapped out there");
        if (const Recompute* d = dropped_at(x, when)) {
          SPILL_EXPECTS(d->remade_before() == when,
                        input + "is dropped there and not remade before it (a chain's first "
                                "link needs its inputs resident)");
          SPILL_EXPECTS(std::find(list_at.begin(), self, x) != self,
                        input + "is remade before the same op but after it (a chain's links "
                                "are remade producer first)");
        }
      }
    }
  }
}

}  // namespace

void check_plan(const Graph& g, const Plan& p) {
  const auto n = static_cast<std::int64_t>(g.ops.size());
  SPILL_EXPECTS(p.steps.size() == g.ops.size(),
                "plan '" + p.policy + "' has " + std::to_string(p.steps.size()) +
                    " steps for a graph of " + std::to_string(n) + " ops");
  Liveness l = analyze_liveness(g);
  std::vector<std::vector<std::pair<std::int64_t, std::int64_t>>> windows(g.tensors.size());
  for (std::size_t k = 0; k < p.swaps.size(); ++k) {
    const Swap& s = p.swaps[k];
    const std::string at = "plan '" + p.policy + "' swap " + std::to_string(k);
    SPILL_EXPECTS(s.tensor < g.tensors.size(), at + ": no tensor " + std::to_string(s.tensor));
    SPILL_EXPECTS(s.evict_after >= 0 && s.evict_after < n && s.prefetch_at > s.evict_after &&
                      s.next_use >= s.prefetch_at && s.next_use < 2 * n,
                  at + " ('" + g.tensors[s.tensor].name + "'): evict_after " +
                      std::to_string(s.evict_after) + ", prefetch_at " +
                      std::to_string(s.prefetch_at) + ", next_use " +
                      std::to_string(s.next_use) + " are out of order or range");
    if (s.to_step_end)
      SPILL_EXPECTS(g.tensors[s.tensor].held_to_step_end && !g.tensors[s.tensor].carried_over &&
                        s.prefetch_at == n && s.next_use == n,
                    at + ": only a tensor held to the step's end, not carried over to the next, "
                         "may leave for the rest of it (then prefetch_at and next_use are the op "
                         "count, " +
                         std::to_string(n) + "; tensor '" + g.tensors[s.tensor].name + "')");
    else
      SPILL_EXPECTS(s.next_use < n || persistent(g.tensors[s.tensor].kind),
                    at + ": only weights and optimizer state may be swapped across the step end");
    // No use strictly inside (evict_after, next_use).
    for (OpIndex u : l.uses[s.tensor]) {
      for (std::int64_t v : {std::int64_t(u), std::int64_t(u) + n}) {
        SPILL_EXPECTS(!(v > s.evict_after && v < s.next_use),
                      at + ": tensor '" + g.tensors[s.tensor].name + "' is used by op " +
                          std::to_string(u) + " while it is meant to be on the host");
      }
    }
    for (auto [a, b] : windows[s.tensor]) {
      SPILL_EXPECTS(s.next_use <= a || s.evict_after >= b,
                    at + ": overlaps another swap of tensor '" + g.tensors[s.tensor].name + "'");
    }
    windows[s.tensor].push_back({s.evict_after, s.next_use});
  }
  check_recomputes(g, p, l);
}

std::vector<std::uint64_t> planned_memory(const Graph& g, const Plan& p) {
  Liveness l = analyze_liveness(g);
  const auto n = static_cast<std::int64_t>(g.ops.size());
  std::vector<std::int64_t> delta(g.ops.size() + 1, 0);
  auto subtract = [&](std::int64_t a, std::int64_t b, std::uint64_t bytes) {  // ops [a, b)
    if (a >= b) return;
    delta[std::size_t(a)] -= std::int64_t(bytes);
    delta[std::size_t(b)] += std::int64_t(bytes);
  };
  for (const Swap& s : p.swaps) {
    const std::uint64_t bytes = g.tensors[s.tensor].bytes;
    std::int64_t a = s.evict_after + 1, b = s.prefetch_at;
    if (b <= n) {
      subtract(a, b, bytes);
    } else {
      subtract(a, n, bytes);
      subtract(0, b - n, bytes);
    }
  }
  std::vector<std::uint64_t> extra(g.ops.size(), 0);  // a remake's workspace beyond the op's
  for (const Recompute& r : p.recomputes) {
    subtract(r.drop_after + 1, r.remade_before(), g.tensors[r.tensor].bytes);
    const std::int64_t maker = remaking_op(g, r.tensor);
    const auto u = std::size_t(r.remade_before());
    if (maker >= 0 && g.ops[std::size_t(maker)].workspace_bytes > g.ops[u].workspace_bytes)
      extra[u] = std::max(extra[u],
                          g.ops[std::size_t(maker)].workspace_bytes - g.ops[u].workspace_bytes);
  }
  std::vector<std::uint64_t> mem(g.ops.size());
  std::int64_t running = 0;
  for (std::size_t i = 0; i < g.ops.size(); ++i) {
    running += delta[i];
    mem[i] = std::uint64_t(std::int64_t(l.memory[i]) + running) + extra[i];
  }
  return mem;
}

}  // namespace spill::graph

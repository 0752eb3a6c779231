#include "graph/plan.hpp"

#include <algorithm>

#include "core/errors.hpp"
#include "graph/liveness.hpp"

namespace spill::graph {

Plan Plan::from_swaps(std::string policy, std::uint64_t budget, std::size_t n_ops,
                      std::vector<Swap> swaps) {
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
    p.steps[std::size_t(s.prefetch_at % n)].prefetch_at.push_back(s.tensor);
    // Prefetched in the next step: it must already be on the host when a step begins.
    if (s.prefetch_at >= n) p.start_on_host.push_back(s.tensor);
  }
  std::sort(p.start_on_host.begin(), p.start_on_host.end());
  p.swaps = std::move(swaps);
  return p;
}

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
  std::vector<std::uint64_t> mem(g.ops.size());
  std::int64_t running = 0;
  for (std::size_t i = 0; i < g.ops.size(); ++i) {
    running += delta[i];
    mem[i] = std::uint64_t(std::int64_t(l.memory[i]) + running);
  }
  return mem;
}

}  // namespace spill::graph

#include "graph/batch.hpp"

#include <limits>

#include "core/errors.hpp"

namespace spill::graph {

bool has_batch_scaling(const Graph& g) { return g.batch > 0; }

Graph at_batch(const Graph& g, std::uint64_t batch) {
  SPILL_EXPECTS(has_batch_scaling(g),
                "graph '" + g.name + "' does not say how its sizes grow with the batch (graph "
                "format version 2 with \"batch\", as spill.torch.capture writes at a batch of 2 "
                "or more); plan it at its own batch, or capture it again");
  SPILL_EXPECTS(batch > 0, "graph '" + g.name + "': the batch must be at least 1");
  if (batch == g.batch) return g;
  Graph out = g;
  out.batch = batch;
  const double ratio = double(batch) / double(g.batch);
  constexpr std::uint64_t kMax = std::numeric_limits<std::int64_t>::max();
  for (Tensor& t : out.tensors) {
    if (t.batch_bytes == 0) continue;
    const std::uint64_t per_sample = t.batch_bytes / g.batch;
    const std::uint64_t fixed = t.bytes - t.batch_bytes;
    SPILL_EXPECTS(per_sample <= (kMax - fixed) / batch,
                  "graph '" + g.name + "': tensor '" + t.name + "' at batch " +
                      std::to_string(batch) + " would pass 2^63 bytes");
    t.batch_bytes = per_sample * batch;
    t.bytes = fixed + t.batch_bytes;
  }
  for (Op& op : out.ops) {
    const double flops = op.flops - op.batch_flops + op.batch_flops * ratio;
    const double bytes = op.bytes - op.batch_bytes + op.batch_bytes * ratio;
    if (op.time_s) {
      // A measured time scales like the op's work: FLOPs when it has any, else traffic.
      const double f = op.flops > 0 ? flops / op.flops : op.bytes > 0 ? bytes / op.bytes : 1.0;
      op.time_s = *op.time_s * f;
    }
    op.batch_flops *= ratio;
    op.batch_bytes *= ratio;
    op.flops = flops;
    op.bytes = bytes;
  }
  out.validate();
  return out;
}

}  // namespace spill::graph

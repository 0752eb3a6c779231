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
  for (std::size_t i = 0; i < out.ops.size(); ++i) {
    const Op& was = g.ops[i];
    Op& op = out.ops[i];
    op.flops = was.flops - was.batch_flops + was.batch_flops * ratio;
    op.bytes = was.bytes - was.batch_bytes + was.batch_bytes * ratio;
    op.batch_flops = was.batch_flops * ratio;
    op.batch_bytes = was.batch_bytes * ratio;
    if (op.time_s) {
      // A measured time scales like the op's work: FLOPs when it has any, else its traffic as
      // the roofline counts it (`bytes`, or where that is 0 the tensors it touches, now
      // rescaled: taking `bytes` alone kept such an op's time at every batch; audit 41b #2).
      const double traffic = op_traffic_bytes(g, was);
      const double f = was.flops > 0 ? op.flops / was.flops
                       : traffic > 0 ? op_traffic_bytes(out, op) / traffic
                                     : 1.0;
      op.time_s = *op.time_s * f;
    }
  }
  out.validate();
  return out;
}

}  // namespace spill::graph

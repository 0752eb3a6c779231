#include "train/program.hpp"

#include <cstring>

#include "core/errors.hpp"

namespace spill::train {
namespace {

std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

TensorId Program::add_tensor(TensorSpec t) {
  SPILL_EXPECTS(t.bytes > 0, "program '" + name + "': tensor '" + t.name + "' has no bytes");
  tensors.push_back(std::move(t));
  return static_cast<TensorId>(tensors.size() - 1);
}

void Program::add_op(OpSpec op) {
  for (const auto* list : {&op.reads, &op.writes})
    for (TensorId t : *list)
      SPILL_EXPECTS(t < tensors.size(), "program '" + name + "': op '" + op.name +
                                            "' uses tensor " + std::to_string(t) +
                                            ", which does not exist");
  ops.push_back(std::move(op));
}

void Program::initial_value(TensorId t, std::span<std::byte> out) const {
  const TensorSpec& spec = tensors.at(t);
  SPILL_EXPECTS(out.size() == spec.bytes, "initial value of '" + spec.name + "': " +
                                              std::to_string(out.size()) + " bytes for " +
                                              std::to_string(spec.bytes));
  std::memset(out.data(), 0, out.size());
  auto* f = reinterpret_cast<float*>(out.data());
  std::uint64_t state = seed * 0x2545F4914F6CDD1Dull + t;
  for (const InitSegment& seg : spec.init) {
    SPILL_EXPECTS((seg.offset + seg.elems) * sizeof(float) <= spec.bytes,
                  "initial value of '" + spec.name + "': a segment ends past the tensor");
    for (std::size_t i = 0; i < seg.elems; ++i) {
      float v = seg.value;
      if (seg.uniform) {
        const double u = double(splitmix(state) >> 11) * (1.0 / 9007199254740992.0);
        v = static_cast<float>((2.0 * u - 1.0) * seg.value);
      }
      f[seg.offset + i] = v;
    }
  }
}

graph::Graph to_graph(const Program& p, kernels::Kernels& k, const kernels::Roofline& roofline,
                      const std::function<std::uint64_t(std::uint64_t)>& alloc_bytes,
                      const std::vector<double>* measured) {
  SPILL_EXPECTS(!measured || measured->size() == p.ops.size(),
                "to_graph: " + std::to_string(measured ? measured->size() : 0) +
                    " measured op times for " + std::to_string(p.ops.size()) + " ops");
  graph::Graph g;
  g.name = p.name;
  for (std::size_t t = 0; t < p.tensors.size(); ++t) {
    const TensorSpec& s = p.tensors[t];
    g.add_tensor({t, s.name, alloc_bytes(s.bytes), s.dtype, s.kind});
  }
  // Costing: the op's code runs with a recorder attached; its pointers are never dereferenced.
  std::vector<void*> fake(p.tensors.size());
  for (std::size_t t = 0; t < fake.size(); ++t)
    fake[t] = reinterpret_cast<void*>(std::uintptr_t(t + 1) << 32);
  kernels::CostRecorder rec;
  rec.roofline = roofline;
  k.set_recorder(&rec);
  try {
    for (std::size_t i = 0; i < p.ops.size(); ++i) {
      const OpSpec& op = p.ops[i];
      rec = kernels::CostRecorder{};
      rec.roofline = roofline;
      op.run(OpContext{k, nullptr, 1, fake});
      graph::Op o;
      o.name = op.name;
      o.type = op.type;
      o.phase = op.phase;
      o.layer = op.layer;
      o.reads.assign(op.reads.begin(), op.reads.end());
      o.writes.assign(op.writes.begin(), op.writes.end());
      o.flops = rec.total.flops;
      o.bytes = rec.total.bytes;
      o.time_s = measured ? (*measured)[i] : rec.time_s;
      o.recomputable = op.recomputable;
      g.add_op(std::move(o));
    }
  } catch (...) {
    k.set_recorder(nullptr);
    throw;
  }
  k.set_recorder(nullptr);
  // The loss is read back once the step's work is queued: it lives to the step's end.
  if (!g.ops.empty() && p.loss < g.tensors.size()) g.ops.back().reads.push_back(p.loss);
  g.validate();
  return g;
}

}  // namespace spill::train

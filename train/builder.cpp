#include "train/builder.hpp"

#include "core/errors.hpp"

namespace spill::train {

using graph::DType;
using graph::Phase;
using graph::TensorKind;
using kernels::Trans;

std::size_t ParamGroup::add(std::size_t n, bool uniform, float value) {
  const std::size_t offset = elems;
  init.push_back({offset, n, uniform, value});
  elems += n;
  return offset;
}

Builder::Builder(std::string model, const kernels::AdamW& adamw, std::uint64_t seed)
    : adamw_(adamw) {
  p_.name = std::move(model);
  p_.seed = seed;
}

TensorId Builder::input(const std::string& name, std::uint64_t bytes, DType dtype) {
  return p_.add_tensor({name, bytes, TensorKind::Input, dtype, {}});
}
TensorId Builder::act(const std::string& name, std::size_t elems) {
  return p_.add_tensor({name, elems * 4, TensorKind::Activation, DType::F32, {}});
}
TensorId Builder::grad(const std::string& name, std::size_t elems) {
  return p_.add_tensor({name, elems * 4, TensorKind::Gradient, DType::F32, {}});
}
TensorId Builder::scratch(const std::string& name, std::size_t elems) {
  return p_.add_tensor({name, elems * 4, TensorKind::Workspace, DType::F32, {}});
}

void Builder::make(ParamGroup& g) {
  SPILL_EXPECTS(g.elems > 0, "parameter group '" + g.name + "' is empty");
  const std::uint64_t bytes = g.elems * 4;
  g.w = p_.add_tensor({g.name + ".weight", bytes, TensorKind::Weight, DType::F32, g.init});
  g.g = p_.add_tensor({g.name + ".grad", bytes, TensorKind::Gradient, DType::F32, {}});
  g.m = p_.add_tensor({g.name + ".adam_m", bytes, TensorKind::OptimizerState, DType::F32, {}});
  g.v = p_.add_tensor({g.name + ".adam_v", bytes, TensorKind::OptimizerState, DType::F32, {}});
  p_.parameters += g.elems;
  groups_.push_back(g);
}

void Builder::op(std::string name, std::string type, Phase phase, int layer,
                 std::vector<TensorId> reads, std::vector<TensorId> writes,
                 std::function<void(const OpContext&)> run) {
  p_.add_op({std::move(name), std::move(type), phase, layer, std::move(reads), std::move(writes),
             std::move(run)});
}

void Builder::recomputable() {
  SPILL_EXPECTS(!p_.ops.empty(), "Builder::recomputable: no op yet");
  p_.ops.back().recomputable = true;
}

Program Builder::finish(TensorId loss,
                        std::function<void(int, TensorId, std::span<std::byte>)> batch) {
  for (const ParamGroup& g : groups_) {
    const kernels::AdamW hp = adamw_;
    const std::size_t n = g.elems;
    const TensorId w = g.w, gr = g.g, m = g.m, v = g.v;
    op("adamw." + g.name, "adamw", Phase::Optimizer, g.layer, {gr, w, m, v}, {w, m, v},
       [=](const OpContext& c) { c.k.adamw(c.stream, c.f(w), c.f(m), c.f(v), c.f(gr), n, hp, c.step); });
  }
  p_.loss = loss;
  p_.batch = std::move(batch);
  return std::move(p_);
}

void linear_forward(const OpContext& c, float* y, const float* x, const float* w, const float* b,
                    int rows, int in, int out, float beta) {
  c.k.gemm(c.stream, Trans::No, Trans::No, rows, out, in, 1.0f, x, in, w, out, beta, y, out);
  if (b != nullptr) c.k.bias_add(c.stream, y, b, rows, out);
}

void linear_backward(const OpContext& c, float* dx, float* dw, float* db, const float* dy,
                     const float* x, const float* w, int rows, int in, int out) {
  if (dx != nullptr)
    c.k.gemm(c.stream, Trans::No, Trans::Yes, rows, in, out, 1.0f, dy, out, w, out, 0.0f, dx, in);
  c.k.gemm(c.stream, Trans::Yes, Trans::No, in, out, rows, 1.0f, x, in, dy, out, 0.0f, dw, out);
  if (db != nullptr) c.k.bias_grad(c.stream, db, dy, rows, out);
}

}  // namespace spill::train

#include "graph/zoo_layers.hpp"

#include "core/errors.hpp"

namespace spill::graph::zoo {
namespace {

std::uint64_t pow_k(std::uint64_t k, std::size_t n) {
  std::uint64_t r = 1;
  for (std::size_t i = 0; i < n; ++i) r *= k;
  return r;
}

}  // namespace

std::uint64_t Layers::elems(const Act& a) const {
  std::optional<std::uint64_t> n = mul_within(batch_, a.c);
  for (auto d : a.dims) n = n ? mul_within(*n, d) : n;
  if (n) return *n;
  std::string extent;
  for (auto d : a.dims) extent += (extent.empty() ? "" : "x") + std::to_string(d);
  throw InvalidArgument("model '" + b_.model_name() + "': an activation of batch " +
                        std::to_string(batch_) + " x " + std::to_string(a.c) + " channels x " +
                        extent + " passes 2^63 - 1 elements");
}

Act Layers::conv(const std::string& name, const Act& x, std::uint64_t out_c, std::uint64_t k,
                 std::uint64_t stride, std::uint64_t pad, bool bias) {
  Act y{0, out_c, x.dims};
  for (auto& d : y.dims) {
    SPILL_EXPECTS(d + 2 * pad >= k, "layer '" + name + "': input extent " + std::to_string(d) +
                                        " is smaller than the kernel");
    d = (d + 2 * pad - k) / stride + 1;
  }
  const std::uint64_t kernel = pow_k(k, x.dims.size());
  std::vector<TensorIndex> params{b_.param(name + ".weight", out_c * x.c * kernel)};
  if (bias) params.push_back(b_.param(name + ".bias", out_c));
  ZooBuilder::Layer l{name, "conv", {x.t}, params};
  l.out_elems = elems(y);
  l.flops = 2.0 * double(l.out_elems) * double(x.c * kernel);
  y.t = b_.layer(std::move(l));
  return y;
}

Act Layers::upconv(const std::string& name, const Act& x, std::uint64_t out_c, std::uint64_t k) {
  Act y{0, out_c, x.dims};
  for (auto& d : y.dims) d *= k;
  const std::uint64_t kernel = pow_k(k, x.dims.size());
  ZooBuilder::Layer l{name, "upconv", {x.t}, {b_.param(name + ".weight", x.c * out_c * kernel)}};
  l.out_elems = elems(y);
  // Each input element scatters into k^n outputs for each output channel.
  l.flops = 2.0 * double(elems(x)) * double(out_c * kernel);
  y.t = b_.layer(std::move(l));
  return y;
}

Act Layers::batchnorm(const std::string& name, const Act& x) {
  Act y = x;
  ZooBuilder::Layer l{name, "batchnorm", {x.t},
                      {b_.param(name + ".weight", x.c), b_.param(name + ".bias", x.c)}};
  l.out_elems = elems(x);
  l.flops = 8.0 * double(l.out_elems);  // mean, variance, normalize, scale and shift
  l.backward_flops = 12.0 * double(l.out_elems);
  y.t = b_.layer(std::move(l));
  return y;
}

Act Layers::relu(const std::string& name, const Act& x) {
  Act y = x;
  ZooBuilder::Layer l{name, "relu", {x.t}, {}};
  l.out_elems = elems(x);
  l.flops = double(l.out_elems);
  l.backward_flops = double(l.out_elems);
  // In place, as torchvision's models run it; the backward needs only the output (the mask).
  l.saves_inputs = false;
  l.saves_output = true;
  l.in_place = true;
  y.t = b_.layer(std::move(l));
  return y;
}

Act Layers::pool(const std::string& name, const Act& x, std::uint64_t k, std::uint64_t stride,
                 std::uint64_t pad) {
  Act y{0, x.c, x.dims};
  for (auto& d : y.dims) d = (d + 2 * pad - k) / stride + 1;
  ZooBuilder::Layer l{name, "pool", {x.t}, {}};
  l.out_elems = elems(y);
  l.flops = double(l.out_elems) * double(pow_k(k, x.dims.size()));
  l.backward_flops = l.flops;
  y.t = b_.layer(std::move(l));
  return y;
}

Act Layers::global_avgpool(const std::string& name, const Act& x) {
  Act y{0, x.c, std::vector<std::uint64_t>(x.dims.size(), 1)};
  ZooBuilder::Layer l{name, "avgpool", {x.t}, {}};
  l.out_elems = elems(y);
  l.flops = double(elems(x));
  l.backward_flops = l.flops;
  l.saves_inputs = false;  // the gradient spreads evenly; no input needed
  y.t = b_.layer(std::move(l));
  return y;
}

Act Layers::add(const std::string& name, const Act& a, const Act& b) {
  Act y = a;
  ZooBuilder::Layer l{name, "add", {a.t, b.t}, {}};
  l.out_elems = elems(a);
  l.flops = double(l.out_elems);
  l.backward_flops = 0;  // the gradient passes through unchanged
  l.saves_inputs = false;
  y.t = b_.layer(std::move(l));
  return y;
}

Act Layers::concat(const std::string& name, const Act& a, const Act& b) {
  Act y{0, a.c + b.c, a.dims};
  ZooBuilder::Layer l{name, "concat", {a.t, b.t}, {}};
  l.out_elems = elems(y);
  l.flops = 0;
  l.backward_flops = 0;
  l.saves_inputs = false;
  y.t = b_.layer(std::move(l));
  return y;
}

Act Layers::linear(const std::string& name, const Act& x, std::uint64_t out_features) {
  const std::uint64_t in_features = checked_mul(x.c, x.spatial(), "linear layer inputs");
  Act y{0, out_features, {}};
  ZooBuilder::Layer l{name, "matmul", {x.t},
                      {b_.param(name + ".weight", in_features * out_features),
                       b_.param(name + ".bias", out_features)}};
  l.out_elems = batch_ * out_features;
  l.flops = 2.0 * double(batch_) * double(in_features) * double(out_features);
  y.t = b_.layer(std::move(l));
  return y;
}

void Layers::softmax_loss(const std::string& name, const Act& logits, TensorIndex labels) {
  b_.loss(name, logits.t, labels, 5.0 * double(elems(logits)));
}

}  // namespace spill::graph::zoo

// Layer helpers shared by the zoo's convolutional models: they compute output shapes, parameter
// counts and FLOPs (2 per multiply-add) and call the builder. Internal to graph/.
// Convolutions use "same"-style arithmetic: out = (in + 2*pad - k) / stride + 1.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/checked.hpp"
#include "graph/zoo_builder.hpp"

namespace spill::graph::zoo {

// An activation with its shape: channels and spatial extent (2 dims for images, 3 for volumes).
struct Act {
  TensorIndex t;
  std::uint64_t c;
  std::vector<std::uint64_t> dims;
  // Elements per channel and sample; throws InvalidArgument when the product passes 2^63 - 1.
  std::uint64_t spatial() const {
    std::uint64_t n = 1;
    for (auto d : dims) n = checked_mul(n, d, "activation extent");
    return n;
  }
};

class Layers {
 public:
  Layers(ZooBuilder& b, std::uint64_t batch) : b_(b), batch_(batch) {}
  std::uint64_t batch() const { return batch_; }
  // batch x channels x extent; throws InvalidArgument naming the model past 2^63 - 1.
  std::uint64_t elems(const Act& a) const;

  Act conv(const std::string& name, const Act& x, std::uint64_t out_c, std::uint64_t k,
           std::uint64_t stride, std::uint64_t pad, bool bias);
  // Transposed convolution with kernel = stride = `k` (U-Net up-sampling), no bias.
  Act upconv(const std::string& name, const Act& x, std::uint64_t out_c, std::uint64_t k);
  Act batchnorm(const std::string& name, const Act& x);
  Act relu(const std::string& name, const Act& x);
  Act pool(const std::string& name, const Act& x, std::uint64_t k, std::uint64_t stride,
           std::uint64_t pad);
  Act global_avgpool(const std::string& name, const Act& x);
  Act add(const std::string& name, const Act& a, const Act& b);
  Act concat(const std::string& name, const Act& a, const Act& b);
  // Fully connected on the flattened input.
  Act linear(const std::string& name, const Act& x, std::uint64_t out_features);
  void softmax_loss(const std::string& name, const Act& logits, TensorIndex labels);

 private:
  ZooBuilder& b_;
  std::uint64_t batch_;
};

}  // namespace spill::graph::zoo

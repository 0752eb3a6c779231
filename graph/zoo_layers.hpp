// Layer helpers shared by the zoo's convolutional models: they compute output shapes, parameter
// counts and FLOPs (2 per multiply-add) and call the builder. Internal to graph/.
// Convolutions use "same"-style arithmetic: out = (in + 2*pad - k) / stride + 1.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "graph/zoo_builder.hpp"

namespace spill::graph::zoo {

// An activation with its shape: channels and spatial extent (2 dims for images, 3 for volumes).
struct Act {
  TensorIndex t;
  std::uint64_t c;
  std::vector<std::uint64_t> dims;
  std::uint64_t spatial() const {
    std::uint64_t n = 1;
    for (auto d : dims) n *= d;
    return n;
  }
};

class Layers {
 public:
  Layers(ZooBuilder& b, std::uint64_t batch) : b_(b), batch_(batch) {}
  std::uint64_t batch() const { return batch_; }
  std::uint64_t elems(const Act& a) const { return batch_ * a.c * a.spatial(); }

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

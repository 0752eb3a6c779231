// The model zoo: training steps (forward + backward + optimizer) of well-known networks, built
// from their layer shapes so that parameter counts match the published ones and FLOPs follow
// from the shapes (2 FLOPs per multiply-add). Names are stable; scripts rely on them:
// mlp, vgg16, resnet50, resnet152, unet3d, gpt2-small, gpt2-medium, gpt2-large, gpt2-xl,
// bert-large.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "graph/ir.hpp"

namespace spill::graph {

enum class Optimizer { Sgd, Momentum, Adam };
const char* to_string(Optimizer o);
Optimizer parse_optimizer(std::string_view s);  // sgd | momentum | adam

struct ZooOptions {
  int batch = 1;
  int seq = 0;      // transformers: sequence length (0: the model's maximum, 1024 or 512)
  int volume = 0;   // unet3d: side of the cubic input volume, a multiple of 8 (0: 128)
  DType dtype = DType::F32;
  Optimizer optimizer = Optimizer::Adam;
};

// The model names, in a stable order.
const std::vector<std::string>& zoo_models();
// Builds a model's training step; throws InvalidArgument for an unknown name (listing the known
// ones) or options the model cannot take.
Graph build_model(std::string_view name, const ZooOptions& options);

// Individual builders (also reachable through build_model).
Graph build_mlp(const ZooOptions& o);
Graph build_vgg16(const ZooOptions& o);
Graph build_resnet(int depth, const ZooOptions& o);  // 50 or 152
Graph build_unet3d(const ZooOptions& o);
Graph build_gpt2(std::string_view size, const ZooOptions& o);  // small|medium|large|xl
Graph build_bert_large(const ZooOptions& o);

}  // namespace spill::graph

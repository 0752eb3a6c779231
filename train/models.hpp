// The reference trainer's models, defined in C++ with real shapes, each with a seeded synthetic
// task it can learn (generated in memory, so the loss visibly falls):
//   mlp         ReLU MLP (6 hidden layers of 1024, batch 512) on a random linear teacher's labels;
//   cnn         residual CNN with batch norm (two stages of residual blocks, max pooling,
//               global average pooling) on 32x32 images of class-specific stripes and noise;
//   gpt-mini    GPT-style pre-norm decoder (4 layers, width 256, 4 heads, sequence 128, byte
//               vocabulary, batch 16) on a Markov chain of tokens;
//   gpt-medium  the same decoder at GPT-2 medium's shape (24 layers, width 1024, 16 heads,
//               sequence 1024, vocabulary 50304, batch 8): for a GPU.
// Options left at 0 take the preset's value.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "train/program.hpp"

namespace spill::train {

struct ModelOptions {
  int batch = 0;
  int layers = 0;  // mlp: hidden layers; cnn: residual blocks per stage; gpt: decoder layers
  int width = 0;   // mlp: hidden width; cnn: channels of the first stage; gpt: model width
  int seq = 0;     // gpt: sequence length
  float lr = 0;    // AdamW learning rate
  std::uint64_t seed = 1;
};

// The largest value of each option build_model takes (0 always means the model's default).
inline constexpr int kMaxModelBatch = 65536, kMaxModelLayers = 4096, kMaxModelWidth = 65536,
                     kMaxModelSeq = 32767;  // batch * seq stays below 2^31

const std::vector<std::string>& model_names();
// Throws InvalidArgument naming the model (and listing the known ones) or the bad option
// (one outside its range above).
Program build_model(std::string_view name, const ModelOptions& options);

Program build_mlp(const ModelOptions& options);
Program build_cnn(const ModelOptions& options);
Program build_gpt(std::string_view preset, const ModelOptions& options);

// A small seeded generator for initialisation and synthetic data (same numbers everywhere).
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : s_(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  std::uint64_t next();
  float uniform(float lo, float hi);  // [lo, hi)
  std::uint32_t below(std::uint32_t n);

 private:
  std::uint64_t s_;
};

}  // namespace spill::train

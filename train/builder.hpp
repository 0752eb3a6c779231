// What the models share: a Program under construction with parameter groups (a flat weight
// tensor, its gradient and AdamW's two moments; an AdamW op per group is appended at the end),
// and the kernels of a linear layer forward and backward.
#pragma once

#include <string>
#include <vector>

#include "kernels/kernels.hpp"
#include "train/program.hpp"

namespace spill::train {

// A flat group of parameters (e.g. every matrix of a transformer layer): one weight tensor,
// one gradient tensor (written part by part by the backward ops), and AdamW's m and v.
struct ParamGroup {
  std::string name;
  int layer = -1;
  std::size_t elems = 0;
  std::vector<InitSegment> init;
  TensorId w = 0, g = 0, m = 0, v = 0;
  // Adds `n` parameters (uniform in [-value, value], or constant `value`); returns their offset.
  std::size_t add(std::size_t n, bool uniform, float value);
};

class Builder {
 public:
  Builder(std::string model, const kernels::AdamW& adamw, std::uint64_t seed);

  TensorId input(const std::string& name, std::uint64_t bytes, graph::DType dtype);
  TensorId act(const std::string& name, std::size_t elems);      // activation (float)
  TensorId grad(const std::string& name, std::size_t elems);     // gradient of an activation
  TensorId scratch(const std::string& name, std::size_t elems);  // lives inside one op
  // Creates the group's tensors once its parameters are added.
  void make(ParamGroup& group);
  void op(std::string name, std::string type, graph::Phase phase, int layer,
          std::vector<TensorId> reads, std::vector<TensorId> writes,
          std::function<void(const OpContext&)> run);
  // Marks the op just added recomputable (OpSpec::recomputable).
  void recomputable();
  // Appends one AdamW op per group (in creation order) and returns the program.
  Program finish(TensorId loss, std::function<void(int, TensorId, std::span<std::byte>)> batch);

 private:
  Program p_;
  kernels::AdamW adamw_;
  std::vector<ParamGroup> groups_;
};

// y[rows][out] = x[rows][in] W[in][out] (+ b) + beta * y.
void linear_forward(const OpContext& c, float* y, const float* x, const float* w, const float* b,
                    int rows, int in, int out, float beta = 0.0f);
// dx = dy W^T (when dx is not null), dW = x^T dy, db = column sums of dy (when db is not null).
void linear_backward(const OpContext& c, float* dx, float* dw, float* db, const float* dy,
                     const float* x, const float* w, int rows, int in, int out);

}  // namespace spill::train

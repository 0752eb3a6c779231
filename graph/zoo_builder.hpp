// Builds a training step (forward, backward, optimizer) from layer calls, the way autograd does:
// each forward layer records what its backward needs; finish() replays the tape in reverse and
// then appends one optimizer op per module that owns parameters.
// Invariants: every backward op reads the gradient of its forward output (except the loss) and
// the tensors its forward saved; gradients of tensors used twice accumulate into one tensor;
// optimizer state is created with its parameters and is fp32 (plus an fp32 master copy of the
// weights when the model's dtype is 16-bit), as mixed-precision trainers keep it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "graph/ir.hpp"
#include "graph/zoo.hpp"

namespace spill::graph {

class ZooBuilder {
 public:
  ZooBuilder(std::string model_name, const ZooOptions& options);

  // A tensor the step starts with (images, token ids); never gets a gradient.
  TensorIndex input(const std::string& name, std::uint64_t elems, DType dtype);
  // A parameter of the module being declared; its optimizer state is created alongside.
  TensorIndex param(const std::string& name, std::uint64_t elems);

  struct Layer {
    std::string name;
    std::string type;
    std::vector<TensorIndex> inputs;  // activations (get gradients) or inputs (do not)
    std::vector<TensorIndex> params;  // parameters this layer reads (and gets gradients of)
    std::vector<TensorIndex> saved;   // extra tensors its backward reads (e.g. its own output)
    std::uint64_t out_elems = 0;
    double flops = 0;                 // forward FLOPs
    double backward_flops = -1;       // <0: 2x forward (1x when no input needs a gradient)
    bool saves_inputs = true;         // backward reads the forward inputs
    bool saves_output = false;        // backward reads the forward output (relu, softmax)
    bool in_place = false;            // overwrites inputs[0] (ReLU as torchvision runs it)
    DType out_dtype = DType::F32;     // used when has_out_dtype
    bool has_out_dtype = false;
  };
  // Emits the forward op and records its backward; returns the output activation.
  TensorIndex layer(Layer l);
  // The loss: reads the logits (and labels) and produces a scalar; its backward seeds the
  // gradient of the logits.
  void loss(const std::string& name, TensorIndex logits, TensorIndex labels, double flops);

  // Appends backward and optimizer ops; returns the finished, validated graph.
  Graph finish();

  const std::string& model_name() const { return g_.name; }
  DType dtype() const { return options_.dtype; }
  std::uint64_t dtype_bytes() const { return dtype_size(options_.dtype); }

 private:
  struct TapeEntry {
    OpIndex forward;
    std::vector<TensorIndex> inputs, params, saved;
    TensorIndex output;
    double backward_flops;
    bool is_loss;
  };
  TensorIndex new_tensor(const std::string& name, std::uint64_t elems, DType dtype,
                         TensorKind kind);
  TensorIndex grad_of(TensorIndex t);  // creates the gradient tensor on first use

  ZooOptions options_;
  Graph g_;
  std::vector<TapeEntry> tape_;
  std::vector<std::int64_t> grad_;  // per tensor: its gradient tensor, -1 when none yet
  struct Module {
    std::string name;
    std::vector<TensorIndex> params;
  };
  std::vector<Module> modules_;
  int next_layer_ = 0;
  std::uint64_t next_id_ = 0;
};

}  // namespace spill::graph

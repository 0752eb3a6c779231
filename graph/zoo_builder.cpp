#include "graph/zoo_builder.hpp"

#include <algorithm>

#include "core/checked.hpp"
#include "core/errors.hpp"

namespace spill::graph {

ZooBuilder::ZooBuilder(std::string model_name, const ZooOptions& options) : options_(options) {
  SPILL_EXPECTS(options.batch >= 1, "model '" + model_name + "': batch must be at least 1, got " +
                                        std::to_string(options.batch));
  g_.name = std::move(model_name);
}

TensorIndex ZooBuilder::new_tensor(const std::string& name, std::uint64_t elems, DType dtype,
                                   TensorKind kind) {
  auto bytes = mul_within(elems, dtype_size(dtype));
  SPILL_EXPECTS(bytes, "model '" + g_.name + "': tensor '" + name + "' of " +
                           std::to_string(elems) + " elements of " +
                           std::to_string(dtype_size(dtype)) + " bytes passes 2^63 - 1 bytes");
  TensorIndex t = g_.add_tensor({next_id_++, name, *bytes, dtype, kind});
  grad_.push_back(-1);
  return t;
}

TensorIndex ZooBuilder::input(const std::string& name, std::uint64_t elems, DType dtype) {
  return new_tensor(name, elems, dtype, TensorKind::Input);
}

TensorIndex ZooBuilder::param(const std::string& name, std::uint64_t elems) {
  return new_tensor(name, elems, options_.dtype, TensorKind::Weight);
}

TensorIndex ZooBuilder::grad_of(TensorIndex t) {
  if (grad_[t] < 0) {
    const Tensor& x = g_.tensors[t];
    std::uint64_t elems = x.bytes / dtype_size(x.dtype);
    TensorIndex gt = new_tensor("grad:" + x.name, elems, x.dtype, TensorKind::Gradient);
    grad_[t] = gt;
  }
  return TensorIndex(grad_[t]);
}

TensorIndex ZooBuilder::layer(Layer l) {
  DType out_dtype = l.has_out_dtype ? l.out_dtype : options_.dtype;
  SPILL_EXPECTS(!l.in_place || (!l.inputs.empty() && g_.tensors[l.inputs[0]].kind ==
                                                           TensorKind::Activation),
                "layer '" + l.name + "': only an activation can be overwritten in place");
  // In place, the output is the input's buffer and gradient: backward overwrites the gradient.
  TensorIndex out = l.in_place ? l.inputs[0]
                               : new_tensor(l.name, l.out_elems, out_dtype, TensorKind::Activation);
  // Overwritten in place, the input is no longer what its producer makes: that op is not
  // recomputable any more (running it again would undo this layer).
  if (l.in_place)
    for (Op& earlier : g_.ops)
      if (std::find(earlier.writes.begin(), earlier.writes.end(), out) != earlier.writes.end())
        earlier.recomputable = false;
  Op op;
  op.name = l.name;
  op.type = l.type;
  op.phase = Phase::Forward;
  op.layer = next_layer_++;
  op.reads = l.inputs;
  op.reads.insert(op.reads.end(), l.params.begin(), l.params.end());
  op.writes = {out};
  op.flops = l.flops;
  op.recomputable = !l.in_place;  // the zoo's forward layers are pure functions of their reads
  OpIndex fwd = g_.add_op(std::move(op));

  bool any_input_grad = std::any_of(l.inputs.begin(), l.inputs.end(), [&](TensorIndex t) {
    return g_.tensors[t].kind == TensorKind::Activation;
  });
  double bwd = l.backward_flops >= 0 ? l.backward_flops
                                     : (any_input_grad ? 2.0 : 1.0) * l.flops;
  std::vector<TensorIndex> saved = l.saved;
  if (l.saves_output) saved.push_back(out);
  if (l.saves_inputs) saved.insert(saved.end(), l.inputs.begin(), l.inputs.end());
  saved.insert(saved.end(), l.params.begin(), l.params.end());
  tape_.push_back({fwd, l.inputs, l.params, saved, out, bwd, false});

  // A module is the set of parameters a layer reads first; it gets one optimizer op.
  Module m{l.name, {}};
  for (TensorIndex p : l.params) {
    bool owned = std::any_of(modules_.begin(), modules_.end(), [&](const Module& x) {
      return std::find(x.params.begin(), x.params.end(), p) != x.params.end();
    });
    if (!owned) m.params.push_back(p);
  }
  if (!m.params.empty()) modules_.push_back(std::move(m));
  return out;
}

void ZooBuilder::loss(const std::string& name, TensorIndex logits, TensorIndex labels,
                      double flops) {
  TensorIndex out = new_tensor(name, 1, DType::F32, TensorKind::Activation);
  Op op;
  op.name = name;
  op.type = "loss";
  op.phase = Phase::Forward;
  op.layer = next_layer_++;
  op.reads = {logits, labels};
  op.writes = {out};
  op.flops = flops;
  OpIndex fwd = g_.add_op(std::move(op));
  tape_.push_back({fwd, {logits}, {}, {logits, labels, out}, out, flops, true});
}

Graph ZooBuilder::finish() {
  for (auto it = tape_.rbegin(); it != tape_.rend(); ++it) {
    const Op& f = g_.ops[it->forward];
    Op op;
    op.name = f.name + ".backward";
    op.type = f.type + "_backward";
    op.phase = Phase::Backward;
    op.layer = f.layer;
    op.flops = it->backward_flops;
    if (!it->is_loss) op.reads.push_back(grad_of(it->output));
    for (TensorIndex s : it->saved)
      if (std::find(op.reads.begin(), op.reads.end(), s) == op.reads.end()) op.reads.push_back(s);
    // Gradients accumulate: a gradient written before (a tensor used twice) is also read.
    for (const auto* list : {&it->inputs, &it->params}) {
      for (TensorIndex x : *list) {
        if (g_.tensors[x].kind == TensorKind::Input) continue;
        bool existed = grad_[x] >= 0;
        TensorIndex gx = grad_of(x);
        if (existed) op.reads.push_back(gx);
        op.writes.push_back(gx);
      }
    }
    std::sort(op.reads.begin(), op.reads.end());
    op.reads.erase(std::unique(op.reads.begin(), op.reads.end()), op.reads.end());
    g_.add_op(std::move(op));
  }
  // Optimizer: per module, read weights and gradients, update weights and state in place.
  const bool half = options_.dtype == DType::F16 || options_.dtype == DType::BF16;
  std::vector<std::string> state_names;
  if (options_.optimizer == Optimizer::Adam) state_names = {"adam_m:", "adam_v:"};
  if (options_.optimizer == Optimizer::Momentum) state_names = {"momentum:"};
  if (half) state_names.push_back("master:");  // fp32 master weights
  for (const Module& m : modules_) {
    Op op;
    op.name = m.name + ".step";
    op.type = std::string(to_string(options_.optimizer)) + "_step";
    op.phase = Phase::Optimizer;
    double elems = 0;
    for (TensorIndex p : m.params) {
      const Tensor& w = g_.tensors[p];
      std::uint64_t n = w.bytes / dtype_size(w.dtype);
      elems += double(n);
      op.reads.push_back(p);
      op.reads.push_back(grad_of(p));
      op.writes.push_back(p);
      for (const std::string& sname : state_names) {
        TensorIndex st = new_tensor(sname + w.name, n, DType::F32, TensorKind::OptimizerState);
        op.reads.push_back(st);
        op.writes.push_back(st);
      }
    }
    // Adam: about a dozen FLOPs per parameter; memory-bound on every GPU anyway.
    op.flops = elems * (options_.optimizer == Optimizer::Adam ? 12.0 : 3.0);
    g_.add_op(std::move(op));
  }
  g_.validate();
  return std::move(g_);
}

const char* to_string(Optimizer o) {
  switch (o) {
    case Optimizer::Sgd: return "sgd";
    case Optimizer::Momentum: return "momentum";
    case Optimizer::Adam: return "adam";
  }
  return "?";
}

Optimizer parse_optimizer(std::string_view s) {
  if (s == "sgd") return Optimizer::Sgd;
  if (s == "momentum") return Optimizer::Momentum;
  if (s == "adam") return Optimizer::Adam;
  throw InvalidArgument("unknown optimizer '" + std::string(s) + "' (known: sgd, momentum, adam)");
}

}  // namespace spill::graph

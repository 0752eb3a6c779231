// A ReLU MLP on `width` inputs: `layers` hidden layers of `width` (linear, then ReLU in place),
// a linear classifier and softmax cross-entropy. A linear layer's weight matrix and its bias are
// separate parameter groups (a matrix of 4 MiB maps exactly 4 MiB; with its bias it would take
// a third granule). Task: inputs uniform in [-1, 1); the label is the argmax of a fixed random linear
// teacher, which the network can learn exactly.
#include <cmath>
#include <memory>

#include "core/errors.hpp"
#include "train/builder.hpp"
#include "train/models.hpp"

namespace spill::train {

using graph::DType;
using graph::Phase;

Program build_mlp(const ModelOptions& o) {
  const int B = o.batch ? o.batch : 512, width = o.width ? o.width : 1024;
  const int hidden = o.layers ? o.layers : 6, in = width, classes = 16;
  const float lr = o.lr > 0 ? o.lr : 3e-4f;
  Builder b("mlp", {lr, 0.9f, 0.999f, 1e-8f, 0.0f}, o.seed);
  const TensorId x = b.input("x", std::uint64_t(B) * in * 4, DType::F32);
  const TensorId labels = b.input("labels", std::uint64_t(B) * 4, DType::I32);
  struct Fc {
    ParamGroup p, bias;
    int fin, fout;
    TensorId in, out;
  };
  std::vector<Fc> fcs;
  TensorId cur = x;
  for (int l = 0; l <= hidden; ++l) {
    Fc f;
    f.fin = l == 0 ? in : width;
    f.fout = l == hidden ? classes : width;
    f.p = ParamGroup{"fc" + std::to_string(l) + ".weight", l};
    f.p.add(std::size_t(f.fin) * f.fout, true, std::sqrt(6.0f / float(f.fin)));  // He uniform
    b.make(f.p);
    f.bias = ParamGroup{"fc" + std::to_string(l) + ".bias", l};
    f.bias.add(std::size_t(f.fout), false, 0.0f);
    b.make(f.bias);
    f.in = cur;
    f.out = b.act(l == hidden ? "logits" : "fc" + std::to_string(l), std::size_t(B) * f.fout);
    const Fc c0 = f;
    b.op("fc" + std::to_string(l), "matmul", Phase::Forward, l, {c0.in, c0.p.w, c0.bias.w},
         {c0.out}, [=](const OpContext& c) {
           linear_forward(c, c.f(c0.out), c.f(c0.in), c.f(c0.p.w), c.f(c0.bias.w), B, c0.fin,
                          c0.fout);
         });
    // A hidden layer's output is overwritten by its ReLU in place: only the logits' op makes
    // what it writes.
    if (l == hidden) b.recomputable();
    if (l < hidden) {
      b.op("relu" + std::to_string(l), "relu", Phase::Forward, l, {c0.out}, {c0.out},
           [=](const OpContext& c) {
             c.k.relu_forward(c.stream, c.f(c0.out), c.f(c0.out), std::size_t(B) * c0.fout);
           });
    }
    fcs.push_back(f);
    cur = f.out;
  }
  const TensorId logits = cur, loss = b.act("loss", 1);
  b.op("loss", "cross_entropy", Phase::Forward, hidden, {logits, labels}, {loss},
       [=](const OpContext& c) {
         c.k.softmax_xent_forward(c.stream, c.f(loss), c.f(logits), c.i32(labels), B, classes);
       });
  TensorId dout = b.grad("logits.grad", std::size_t(B) * classes);
  b.op("loss.backward", "cross_entropy", Phase::Backward, hidden, {logits, labels}, {dout},
       [=](const OpContext& c) {
         c.k.softmax_xent_backward(c.stream, c.f(dout), c.f(logits), c.i32(labels), B, classes);
       });
  for (int l = hidden; l >= 0; --l) {
    const Fc f = fcs[std::size_t(l)];
    if (l < hidden) {
      b.op("relu" + std::to_string(l) + ".backward", "relu", Phase::Backward, l, {dout, f.out},
           {dout}, [=](const OpContext& c) {
             c.k.relu_backward(c.stream, c.f(dout), c.f(dout), c.f(f.out), std::size_t(B) * f.fout);
           });
    }
    const TensorId din = l > 0 ? b.grad("fc" + std::to_string(l - 1) + ".grad",
                                        std::size_t(B) * f.fin)
                               : dout;
    std::vector<TensorId> writes{f.p.g, f.bias.g};
    if (l > 0) writes.push_back(din);
    b.op("fc" + std::to_string(l) + ".backward", "matmul", Phase::Backward, l,
         {dout, f.in, f.p.w}, writes, [=](const OpContext& c) {
           linear_backward(c, l > 0 ? c.f(din) : nullptr, c.f(f.p.g), c.f(f.bias.g), c.f(dout),
                           c.f(f.in), c.f(f.p.w), B, f.fin, f.fout);
         });
    dout = din;
  }

  auto teacher = std::make_shared<std::vector<float>>(std::size_t(in) * classes);
  Rng tr(o.seed + 101);
  for (float& v : *teacher) v = tr.uniform(-1, 1);
  const std::uint64_t seed = o.seed;
  return b.finish(loss, [=](int step, TensorId t, std::span<std::byte> out) {
    std::vector<float> row(static_cast<std::size_t>(in));
    for (int r = 0; r < B; ++r) {
      Rng g(seed * 1000003u + std::uint64_t(step) * 7919u + std::uint64_t(r));
      for (float& v : row) v = g.uniform(-1, 1);
      if (t == x) {
        std::copy(row.begin(), row.end(), reinterpret_cast<float*>(out.data()) + std::size_t(r) * in);
        continue;
      }
      int best = 0;
      double best_v = -1e300;
      for (int k = 0; k < classes; ++k) {
        double s = 0;
        for (int i = 0; i < in; ++i) s += double(row[std::size_t(i)]) * (*teacher)[std::size_t(i) * classes + k];
        if (s > best_v) best_v = s, best = k;
      }
      reinterpret_cast<std::int32_t*>(out.data())[r] = best;
    }
  });
}

}  // namespace spill::train

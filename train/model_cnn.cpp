// A small residual CNN with batch norm: a stem convolution, a stage of residual blocks at 32x32,
// max pooling, a transition convolution doubling the channels, a stage of residual blocks at
// 16x16, global average pooling, a linear classifier and softmax cross-entropy. A unit is a
// 3x3 convolution then batch norm and ReLU (a block's second unit adds the block input before
// the ReLU); conv and batch norm are separate ops, as are their backward passes.
// Task: 3x32x32 images of stripes whose orientation, frequency and colour depend on the class
// (10 classes), at a random phase, with uniform noise.
#include <cmath>
#include <memory>
#include <optional>

#include "core/errors.hpp"
#include "train/builder.hpp"
#include "train/models.hpp"

namespace spill::train {
namespace {

using graph::DType;
using graph::Phase;
using kernels::Conv2dShape;

constexpr int kImage = 32, kClasses = 10;

struct Unit {
  std::string name;
  int layer = 0;
  ParamGroup p;
  std::size_t gamma = 0, beta = 0;
  Conv2dShape sh;
  TensorId x = 0, y = 0, a = 0, st = 0;
  std::optional<TensorId> skip;  // the block input added before the ReLU
  int hw() const { return sh.out_h() * sh.out_w(); }
  std::size_t out_elems() const { return sh.out_elems(); }
};

class Cnn {
 public:
  Cnn(Builder& b, int batch) : b_(b), batch_(batch) {}

  Unit unit(const std::string& name, TensorId x, int c, int k, int hw, std::optional<TensorId> skip) {
    Unit u;
    u.name = name;
    u.layer = layer_++;
    u.sh = Conv2dShape{.n = batch_, .c = c, .h = hw, .w = hw, .k = k, .r = 3, .s = 3, .stride = 1,
                       .pad = 1};
    u.p = ParamGroup{name, u.layer};
    u.p.add(u.sh.weight_elems(), true, std::sqrt(6.0f / float(c * 9)));
    u.gamma = u.p.add(std::size_t(k), false, 1.0f);
    u.beta = u.p.add(std::size_t(k), false, 0.0f);
    b_.make(u.p);
    u.x = x;
    u.skip = skip;
    u.y = b_.act(name + ".conv", u.out_elems());
    u.a = b_.act(name + ".bn", u.out_elems());
    u.st = b_.act(name + ".bn.stats", 2 * std::size_t(k));
    const Unit c0 = u;
    b_.op(name + ".conv", "conv", Phase::Forward, u.layer, {c0.x, c0.p.w}, {c0.y},
          [=](const OpContext& c) { c.k.conv2d_forward(c.stream, c.f(c0.y), c.f(c0.x), c.f(c0.p.w), c0.sh); });
    b_.recomputable();
    std::vector<TensorId> reads{c0.y, c0.p.w};
    if (skip) reads.push_back(*skip);
    b_.op(name + ".bn", "batchnorm", Phase::Forward, u.layer, reads, {c0.a, c0.st},
          [=](const OpContext& c) {
            const float* w = c.f(c0.p.w);
            c.k.batch_norm_forward(c.stream, c.f(c0.a), c.f(c0.st), c.f(c0.st) + c0.sh.k,
                                   c.f(c0.y), w + c0.gamma, w + c0.beta, c0.sh.n, c0.sh.k,
                                   c0.hw(), 1e-5f);
            if (c0.skip) c.k.add(c.stream, c.f(c0.a), c.f(*c0.skip), c0.out_elems());
            c.k.relu_forward(c.stream, c.f(c0.a), c.f(c0.a), c0.out_elems());
          });
    b_.recomputable();
    return u;
  }

  // Backward of a unit: `da` (the gradient of its output) is masked in place; returns the
  // gradient of its input (none for the stem). `dskip`, when given, is added to it (the block
  // input's other path).
  std::optional<TensorId> backward(const Unit& u, TensorId da, std::optional<TensorId> dskip,
                                   bool needs_dx) {
    const TensorId dy = b_.grad(u.name + ".conv.grad", u.out_elems());
    b_.op(u.name + ".bn.backward", "batchnorm", Phase::Backward, u.layer,
          {da, u.a, u.y, u.st, u.p.w}, {da, dy, u.p.g}, [=](const OpContext& c) {
            c.k.relu_backward(c.stream, c.f(da), c.f(da), c.f(u.a), u.out_elems());
            c.k.batch_norm_backward(c.stream, c.f(dy), c.f(u.p.g) + u.gamma, c.f(u.p.g) + u.beta,
                                    c.f(da), c.f(u.y), c.f(u.p.w) + u.gamma, c.f(u.st),
                                    c.f(u.st) + u.sh.k, u.sh.n, u.sh.k, u.hw());
          });
    std::optional<TensorId> dx;
    if (needs_dx) dx = b_.grad(u.name + ".in.grad", u.sh.in_elems());
    std::vector<TensorId> reads{dy, u.x, u.p.w}, writes{u.p.g};
    if (dskip) reads.push_back(*dskip);
    if (dx) writes.push_back(*dx);
    b_.op(u.name + ".conv.backward", "conv", Phase::Backward, u.layer, reads, writes,
          [=](const OpContext& c) {
            c.k.conv2d_backward_filter(c.stream, c.f(u.p.g), c.f(dy), c.f(u.x), u.sh);
            if (!dx) return;
            c.k.conv2d_backward_data(c.stream, c.f(*dx), c.f(dy), c.f(u.p.w), u.sh);
            if (dskip) c.k.add(c.stream, c.f(*dx), c.f(*dskip), u.sh.in_elems());
          });
    return dx;
  }

  int next_layer() { return layer_++; }

 private:
  Builder& b_;
  int batch_;
  int layer_ = 0;
};

}  // namespace

Program build_cnn(const ModelOptions& o) {
  const int B = o.batch ? o.batch : 64, C = o.width ? o.width : 16, blocks = o.layers ? o.layers : 2;
  const float lr = o.lr > 0 ? o.lr : 3e-3f;
  Builder b("cnn", {lr, 0.9f, 0.999f, 1e-8f, 0.0f}, o.seed);
  const TensorId img = b.input("images", std::uint64_t(B) * 3 * kImage * kImage * 4, DType::F32);
  const TensorId labels = b.input("labels", std::uint64_t(B) * 4, DType::I32);
  Cnn net(b, B);
  std::vector<Unit> units;  // in forward order
  units.push_back(net.unit("stem", img, 3, C, kImage, std::nullopt));
  auto stage = [&](const std::string& name, int ch, int hw) {
    for (int k = 0; k < blocks; ++k) {
      const TensorId in = units.back().a;
      const std::string n = name + ".block" + std::to_string(k);
      units.push_back(net.unit(n + ".unit1", in, ch, ch, hw, std::nullopt));
      units.push_back(net.unit(n + ".unit2", units.back().a, ch, ch, hw, in));
    }
  };
  stage("stage1", C, kImage);
  const int half = kImage / 2;
  const kernels::Pool2dShape ps{.n = B, .c = C, .h = kImage, .w = kImage, .window = 2, .stride = 2};
  const TensorId pre_pool = units.back().a;
  const TensorId pooled = b.act("pool", ps.out_elems());
  const int pool_layer = net.next_layer();
  b.op("pool", "pool", Phase::Forward, pool_layer, {pre_pool}, {pooled}, [=](const OpContext& c) {
    c.k.max_pool_forward(c.stream, c.f(pooled), c.f(pre_pool), ps);
  });
  b.recomputable();
  const std::size_t first_stage2 = units.size();
  units.push_back(net.unit("transition", pooled, C, 2 * C, half, std::nullopt));
  stage("stage2", 2 * C, half);
  const int C2 = 2 * C, hw2 = half * half;
  const TensorId last = units.back().a;
  const TensorId gv = b.act("gap", std::size_t(B) * C2);
  const int head_layer = net.next_layer();
  b.op("gap", "pool", Phase::Forward, head_layer, {last}, {gv}, [=](const OpContext& c) {
    c.k.avg_pool_forward(c.stream, c.f(gv), c.f(last), B, C2, hw2);
  });
  b.recomputable();
  ParamGroup fc{"fc", head_layer};
  fc.add(std::size_t(C2) * kClasses, true, std::sqrt(6.0f / float(C2)));
  const std::size_t fc_bias = fc.add(kClasses, false, 0.0f);
  b.make(fc);
  const TensorId logits = b.act("logits", std::size_t(B) * kClasses), loss = b.act("loss", 1);
  b.op("fc", "matmul", Phase::Forward, head_layer, {gv, fc.w}, {logits}, [=](const OpContext& c) {
    linear_forward(c, c.f(logits), c.f(gv), c.f(fc.w), c.f(fc.w) + fc_bias, B, C2, kClasses);
  });
  b.recomputable();
  b.op("loss", "cross_entropy", Phase::Forward, head_layer, {logits, labels}, {loss},
       [=](const OpContext& c) {
         c.k.softmax_xent_forward(c.stream, c.f(loss), c.f(logits), c.i32(labels), B, kClasses);
       });

  // ---- backward
  const TensorId dlogits = b.grad("logits.grad", std::size_t(B) * kClasses);
  b.op("loss.backward", "cross_entropy", Phase::Backward, head_layer, {logits, labels}, {dlogits},
       [=](const OpContext& c) {
         c.k.softmax_xent_backward(c.stream, c.f(dlogits), c.f(logits), c.i32(labels), B, kClasses);
       });
  const TensorId dgv = b.grad("gap.grad", std::size_t(B) * C2);
  b.op("fc.backward", "matmul", Phase::Backward, head_layer, {dlogits, gv, fc.w}, {dgv, fc.g},
       [=](const OpContext& c) {
         linear_backward(c, c.f(dgv), c.f(fc.g), c.f(fc.g) + fc_bias, c.f(dlogits), c.f(gv),
                         c.f(fc.w), B, C2, kClasses);
       });
  TensorId d = b.grad(units.back().name + ".grad", std::size_t(B) * C2 * hw2);
  b.op("gap.backward", "pool", Phase::Backward, head_layer, {dgv}, {d}, [=](const OpContext& c) {
    c.k.avg_pool_backward(c.stream, c.f(d), c.f(dgv), B, C2, hw2);
  });
  // Units in reverse; a block's second unit hands its masked gradient to the first as dskip.
  std::optional<TensorId> dskip;
  for (std::size_t i = units.size(); i-- > 0;) {
    const Unit& u = units[i];
    const bool second = u.skip.has_value();
    std::optional<TensorId> dx = net.backward(u, d, second ? std::nullopt : dskip, i > 0);
    dskip = second ? std::optional<TensorId>(d) : std::nullopt;
    if (i == first_stage2) {  // the transition's input is the pooled map
      const TensorId dpre = b.grad("pool.in.grad", ps.in_elems());
      const TensorId dpool = *dx;
      b.op("pool.backward", "pool", Phase::Backward, pool_layer, {dpool, pre_pool, pooled}, {dpre},
           [=](const OpContext& c) {
             c.k.max_pool_backward(c.stream, c.f(dpre), c.f(dpool), c.f(pre_pool), c.f(pooled), ps);
           });
      dx = dpre;
    }
    if (dx) d = *dx;
  }

  const std::uint64_t seed = o.seed;
  return b.finish(loss, [=](int step, TensorId t, std::span<std::byte> out) {
    for (int r = 0; r < B; ++r) {
      Rng g(seed * 1000003u + std::uint64_t(step) * 7919u + std::uint64_t(r));
      const int k = static_cast<int>(g.below(kClasses));
      if (t == labels) {
        reinterpret_cast<std::int32_t*>(out.data())[r] = k;
        continue;
      }
      const float angle = 3.14159265f * float(k) / kClasses, freq = 0.35f + 0.15f * float(k % 3);
      const float phase = g.uniform(0, 6.2831853f);
      float* px = reinterpret_cast<float*>(out.data()) + std::size_t(r) * 3 * kImage * kImage;
      for (int ch = 0; ch < 3; ++ch) {
        const float colour = ((k + ch) % 2 ? 1.0f : -1.0f) * (0.5f + 0.25f * float((k * 7 + ch) % 3));
        for (int yy = 0; yy < kImage; ++yy)
          for (int xx = 0; xx < kImage; ++xx)
            *px++ = colour * std::sin(freq * (float(xx) * std::cos(angle) + float(yy) * std::sin(angle)) + phase) +
                    g.uniform(-0.5f, 0.5f);
      }
    }
  });
}

}  // namespace spill::train

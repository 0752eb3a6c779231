// A GPT-style decoder: token + position embedding, pre-norm layers (layer norm, fused QKV
// projection, causal attention from batched GEMMs and a causal softmax, output projection with
// the residual, layer norm, MLP with GELU and the residual), a final layer norm and an untied LM
// head; the loss is next-token cross-entropy. Every layer's matrices are one flat parameter
// group (swappable when large) and its vectors another. The residual stream's gradient is one
// tensor updated in place through the backward pass.
// Task: sequences of a Markov chain (the next token is a fixed permutation of the current one
// with probability 0.8, else uniform), so the loss falls from log(vocab) towards the chain's
// entropy.
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>

#include "core/errors.hpp"
#include "train/builder.hpp"
#include "train/models.hpp"

namespace spill::train {
namespace {

using graph::DType;
using graph::Phase;
using kernels::Trans;

struct GptShape {
  int layers, width, heads, seq, vocab, batch;
  float lr;
};

// The token sequence of one batch row of one step: seq + 1 tokens.
void markov_row(std::uint64_t seed, int step, int row, const std::vector<std::int32_t>& perm,
                int vocab, std::int32_t* out, int n) {
  Rng r(seed * 1000003u + std::uint64_t(step) * 7919u + std::uint64_t(row));
  std::int32_t t = static_cast<std::int32_t>(r.below(std::uint32_t(vocab)));
  for (int i = 0; i < n; ++i) {
    out[i] = t;
    t = r.uniform(0, 1) < 0.8f ? perm[std::size_t(t)]
                               : static_cast<std::int32_t>(r.below(std::uint32_t(vocab)));
  }
}

}  // namespace

Program build_gpt(std::string_view preset, const ModelOptions& o) {
  GptShape s = preset == "gpt-medium" ? GptShape{24, 1024, 16, 1024, 50304, 8, 3e-4f}
                                      : GptShape{4, 256, 4, 128, 256, 16, 1e-3f};
  if (o.layers) s.layers = o.layers;
  if (o.width) {
    SPILL_EXPECTS(o.width < 64 || o.width % 64 == 0,
                  std::string(preset) + ": width " + std::to_string(o.width) +
                      " must be below 64 (one head) or a multiple of the head size 64");
    s.width = o.width;
    s.heads = std::max(1, o.width / 64);
  }
  if (o.seq) s.seq = o.seq;
  if (o.batch) s.batch = o.batch;
  if (o.lr > 0) s.lr = o.lr;
  SPILL_EXPECTS(s.width % s.heads == 0,
                std::string(preset) + ": width " + std::to_string(s.width) +
                    " is not a multiple of the head count " + std::to_string(s.heads));
  // The attention's rows (batch * heads * seq) are an int for the kernels.
  SPILL_EXPECTS(std::int64_t(s.batch) * s.heads * s.seq <= std::numeric_limits<int>::max(),
                std::string(preset) + ": batch " + std::to_string(s.batch) + " x heads " +
                    std::to_string(s.heads) + " x seq " + std::to_string(s.seq) +
                    " passes 2^31 - 1 attention rows");
  const int B = s.batch, T = s.seq, d = s.width, H = s.heads, hd = d / H, V = s.vocab, L = s.layers;
  const int N = B * T;
  const std::size_t nd = std::size_t(N) * d, scores = std::size_t(B) * H * T * T;
  const float scale = 1.0f / std::sqrt(float(hd));
  const float init = 0.02f * std::sqrt(3.0f);  // uniform with standard deviation 0.02
  const float init_out = init / std::sqrt(2.0f * float(L));  // GPT-2's residual scaling
  Builder b(std::string(preset), {s.lr, 0.9f, 0.95f, 1e-8f, 0.01f}, o.seed);

  const TensorId tokens = b.input("tokens", std::uint64_t(N) * 4, DType::I32);
  const TensorId targets = b.input("targets", std::uint64_t(N) * 4, DType::I32);
  ParamGroup embed{"embed"};
  const std::size_t tok_off = embed.add(std::size_t(V) * d, true, init);
  const std::size_t pos_off = embed.add(std::size_t(T) * d, true, init / 2);
  b.make(embed);

  struct Layer {
    ParamGroup mat, vec;
    std::size_t wqkv, wo, w1, w2;                     // offsets in mat
    std::size_t ln1g, ln1b, bqkv, bo, ln2g, ln2b, b1, b2;  // offsets in vec
    TensorId x, h1, st1, qkv, probs, att, xm, h2, st2, u, gl;
  };
  std::vector<Layer> layers(static_cast<std::size_t>(L));
  std::vector<TensorId> xs;
  xs.push_back(b.act("x0", nd));
  b.op("embed", "embedding", Phase::Forward, 0, {tokens, embed.w}, {xs[0]},
       [=, w = embed.w, x = xs[0]](const OpContext& c) {
         c.k.embedding_forward(c.stream, c.f(x), c.i32(tokens), c.f(w) + tok_off,
                               c.f(w) + pos_off, B, T, d);
       });
  b.recomputable();
  // A block's layer norm of x into h (mean and inverse deviation per row into stats), with the
  // gain and bias at offsets g and bias of the block's vector group vw.
  auto layer_norm = [&](const std::string& name, int l, TensorId x, TensorId h, TensorId stats,
                        TensorId vw, std::size_t g, std::size_t bias) {
    b.op(name, "layernorm", Phase::Forward, l, {x, vw}, {h, stats}, [=](const OpContext& c) {
      const float* v = c.f(vw);
      c.k.layer_norm_forward(c.stream, c.f(h), c.f(stats), c.f(stats) + N, c.f(x), v + g,
                             v + bias, N, d, 1e-5f);
    });
    b.recomputable();
  };
  for (int l = 0; l < L; ++l) {
    Layer& y = layers[std::size_t(l)];
    const std::string n = "L" + std::to_string(l);
    y.mat = ParamGroup{n + ".matrices", l};
    y.wqkv = y.mat.add(std::size_t(d) * 3 * d, true, init);
    y.wo = y.mat.add(std::size_t(d) * d, true, init_out);
    y.w1 = y.mat.add(std::size_t(d) * 4 * d, true, init);
    y.w2 = y.mat.add(std::size_t(4) * d * d, true, init_out);
    b.make(y.mat);
    y.vec = ParamGroup{n + ".vectors", l};
    y.ln1g = y.vec.add(d, false, 1.0f);
    y.ln1b = y.vec.add(d, false, 0.0f);
    y.bqkv = y.vec.add(3 * std::size_t(d), false, 0.0f);
    y.bo = y.vec.add(d, false, 0.0f);
    y.ln2g = y.vec.add(d, false, 1.0f);
    y.ln2b = y.vec.add(d, false, 0.0f);
    y.b1 = y.vec.add(4 * std::size_t(d), false, 0.0f);
    y.b2 = y.vec.add(d, false, 0.0f);
    b.make(y.vec);
    y.x = xs.back();
    y.h1 = b.act(n + ".ln1", nd);
    y.st1 = b.act(n + ".ln1.stats", 2 * std::size_t(N));
    y.qkv = b.act(n + ".qkv", 3 * nd);
    y.probs = b.act(n + ".attn.probs", scores);
    y.att = b.act(n + ".attn", nd);
    y.xm = b.act(n + ".resid1", nd);
    y.h2 = b.act(n + ".ln2", nd);
    y.st2 = b.act(n + ".ln2.stats", 2 * std::size_t(N));
    y.u = b.act(n + ".fc1", 4 * nd);
    y.gl = b.act(n + ".gelu", 4 * nd);
    xs.push_back(b.act(n + ".resid2", nd));
    const TensorId xo = xs.back();
    const Layer c0 = y;  // captured by value below
    layer_norm(n + ".ln1", l, c0.x, c0.h1, c0.st1, c0.vec.w, c0.ln1g, c0.ln1b);
    b.op(n + ".qkv", "matmul", Phase::Forward, l, {c0.h1, c0.mat.w, c0.vec.w}, {c0.qkv},
         [=](const OpContext& c) {
           linear_forward(c, c.f(c0.qkv), c.f(c0.h1), c.f(c0.mat.w) + c0.wqkv,
                          c.f(c0.vec.w) + c0.bqkv, N, d, 3 * d);
         });
    b.recomputable();
    // The attention in two ops: the probabilities (large, cheap to remake from qkv), then the
    // context from them.
    b.op(n + ".attn.probs", "attention", Phase::Forward, l, {c0.qkv}, {c0.probs},
         [=](const OpContext& c) {
           const float* q = c.f(c0.qkv);
           float* p = c.f(c0.probs);
           for (int bi = 0; bi < B; ++bi) {  // scores S = Q K^T, every head at once
             const float* base = q + std::size_t(bi) * T * 3 * d;
             c.k.gemm_batched(c.stream, Trans::No, Trans::Yes, T, T, hd, 1.0f, base, 3 * d, hd,
                              base + d, 3 * d, hd, 0.0f, p + std::size_t(bi) * H * T * T, T,
                              std::int64_t(T) * T, H);
           }
           c.k.causal_softmax_forward(c.stream, p, p, B * H * T, T, scale);
         });
    b.recomputable();
    b.op(n + ".attn", "attention", Phase::Forward, l, {c0.probs, c0.qkv}, {c0.att},
         [=](const OpContext& c) {
           const float* q = c.f(c0.qkv);
           const float* p = c.f(c0.probs);
           for (int bi = 0; bi < B; ++bi) {  // Y = P V, heads side by side
             const float* base = q + std::size_t(bi) * T * 3 * d;
             c.k.gemm_batched(c.stream, Trans::No, Trans::No, T, hd, T, 1.0f,
                              p + std::size_t(bi) * H * T * T, T, std::int64_t(T) * T,
                              base + 2 * d, 3 * d, hd, 0.0f, c.f(c0.att) + std::size_t(bi) * T * d,
                              d, hd, H);
           }
         });
    b.recomputable();
    b.op(n + ".proj", "matmul", Phase::Forward, l, {c0.att, c0.x, c0.mat.w, c0.vec.w}, {c0.xm},
         [=](const OpContext& c) {
           c.k.copy(c.stream, c.f(c0.xm), c.f(c0.x), nd);  // the residual, then += att Wo + bo
           linear_forward(c, c.f(c0.xm), c.f(c0.att), c.f(c0.mat.w) + c0.wo,
                          c.f(c0.vec.w) + c0.bo, N, d, d, 1.0f);
         });
    b.recomputable();
    layer_norm(n + ".ln2", l, c0.xm, c0.h2, c0.st2, c0.vec.w, c0.ln2g, c0.ln2b);
    b.op(n + ".fc1", "matmul", Phase::Forward, l, {c0.h2, c0.mat.w, c0.vec.w}, {c0.u},
         [=](const OpContext& c) {
           linear_forward(c, c.f(c0.u), c.f(c0.h2), c.f(c0.mat.w) + c0.w1, c.f(c0.vec.w) + c0.b1,
                          N, d, 4 * d);
         });
    b.recomputable();
    b.op(n + ".gelu", "gelu", Phase::Forward, l, {c0.u}, {c0.gl}, [=](const OpContext& c) {
      c.k.gelu_forward(c.stream, c.f(c0.gl), c.f(c0.u), 4 * nd);
    });
    b.recomputable();
    b.op(n + ".fc2", "matmul", Phase::Forward, l, {c0.gl, c0.xm, c0.mat.w, c0.vec.w}, {xo},
         [=](const OpContext& c) {
           c.k.copy(c.stream, c.f(xo), c.f(c0.xm), nd);
           linear_forward(c, c.f(xo), c.f(c0.gl), c.f(c0.mat.w) + c0.w2, c.f(c0.vec.w) + c0.b2,
                          N, 4 * d, d, 1.0f);
         });
    b.recomputable();
  }
  ParamGroup head{"head", L};
  const std::size_t lnfg = head.add(d, false, 1.0f);
  const std::size_t lnfb = head.add(d, false, 0.0f);
  const std::size_t wh = head.add(std::size_t(d) * V, true, init);
  b.make(head);
  const TensorId xl = xs.back(), hf = b.act("lnf", nd), stf = b.act("lnf.stats", 2 * std::size_t(N));
  const TensorId logits = b.act("logits", std::size_t(N) * V), loss = b.act("loss", 1);
  const TensorId hw = head.w, hg = head.g;
  b.op("lnf", "layernorm", Phase::Forward, L, {xl, hw}, {hf, stf}, [=](const OpContext& c) {
    c.k.layer_norm_forward(c.stream, c.f(hf), c.f(stf), c.f(stf) + N, c.f(xl), c.f(hw) + lnfg,
                           c.f(hw) + lnfb, N, d, 1e-5f);
  });
  b.recomputable();
  b.op("head", "matmul", Phase::Forward, L, {hf, hw}, {logits}, [=](const OpContext& c) {
    linear_forward(c, c.f(logits), c.f(hf), c.f(hw) + wh, nullptr, N, d, V);
  });
    b.recomputable();
  b.op("loss", "cross_entropy", Phase::Forward, L, {logits, targets}, {loss},
       [=](const OpContext& c) {
         c.k.softmax_xent_forward(c.stream, c.f(loss), c.f(logits), c.i32(targets), N, V);
       });

  // ---- backward
  const TensorId dlogits = b.grad("logits.grad", std::size_t(N) * V);
  const TensorId dhf = b.grad("lnf.grad", nd), dx = b.grad("resid.grad", nd);
  b.op("loss.backward", "cross_entropy", Phase::Backward, L, {logits, targets}, {dlogits},
       [=](const OpContext& c) {
         c.k.softmax_xent_backward(c.stream, c.f(dlogits), c.f(logits), c.i32(targets), N, V);
       });
  b.op("head.backward", "matmul", Phase::Backward, L, {dlogits, hf, hw}, {dhf, hg},
       [=](const OpContext& c) {
         linear_backward(c, c.f(dhf), c.f(hg) + wh, nullptr, c.f(dlogits), c.f(hf), c.f(hw) + wh,
                         N, d, V);
       });
  b.op("lnf.backward", "layernorm", Phase::Backward, L, {dhf, xl, stf, hw}, {dx, hg},
       [=](const OpContext& c) {
         c.k.layer_norm_backward(c.stream, c.f(dx), c.f(hg) + lnfg, c.f(hg) + lnfb, c.f(dhf),
                                 c.f(xl), c.f(hw) + lnfg, c.f(stf), c.f(stf) + N, N, d, false);
       });
  // A block's linear backward: dY (out features) into dX (in features), and the weight at
  // offset w and bias at offset bias of the block's parameter groups into their gradients.
  auto linear_back = [&](const std::string& name, int l, const Layer& y, TensorId dy,
                         TensorId x, TensorId dxo, std::size_t w, std::size_t bias, int in,
                         int out) {
    const TensorId mw = y.mat.w, mg = y.mat.g, vg = y.vec.g;
    b.op(name, "matmul", Phase::Backward, l, {dy, x, mw}, {dxo, mg, vg},
         [=](const OpContext& c) {
           linear_backward(c, c.f(dxo), c.f(mg) + w, c.f(vg) + bias, c.f(dy), c.f(x),
                           c.f(mw) + w, N, in, out);
         });
  };
  // A block's layer-norm backward: dH into the residual gradient dx (accumulated), its gain
  // and bias gradients at offsets g and bias of the block's vector group.
  auto layer_norm_back = [&](const std::string& name, int l, const Layer& y, TensorId dh,
                             TensorId x, TensorId stats, std::size_t g, std::size_t bias) {
    const TensorId vw = y.vec.w, vg = y.vec.g;
    b.op(name, "layernorm", Phase::Backward, l, {dh, x, stats, vw, dx}, {dx, vg},
         [=](const OpContext& c) {
           c.k.layer_norm_backward(c.stream, c.f(dx), c.f(vg) + g, c.f(vg) + bias, c.f(dh),
                                   c.f(x), c.f(vw) + g, c.f(stats), c.f(stats) + N, N, d, true);
         });
  };
  for (int l = L - 1; l >= 0; --l) {
    const Layer y = layers[std::size_t(l)];
    const std::string n = "L" + std::to_string(l);
    const TensorId dgl = b.grad(n + ".gelu.grad", 4 * nd), dh2 = b.grad(n + ".ln2.grad", nd);
    const TensorId datt = b.grad(n + ".attn.grad", nd), dqkv = b.grad(n + ".qkv.grad", 3 * nd);
    const TensorId dprobs = b.scratch(n + ".attn.probs.grad", scores);
    const TensorId dh1 = b.grad(n + ".ln1.grad", nd);
    linear_back(n + ".fc2.backward", l, y, dx, y.gl, dgl, y.w2, y.b2, 4 * d, d);
    b.op(n + ".gelu.backward", "gelu", Phase::Backward, l, {dgl, y.u}, {dgl},
         [=](const OpContext& c) {
           c.k.gelu_backward(c.stream, c.f(dgl), c.f(dgl), c.f(y.u), 4 * nd);
         });
    linear_back(n + ".fc1.backward", l, y, dgl, y.h2, dh2, y.w1, y.b1, d, 4 * d);
    layer_norm_back(n + ".ln2.backward", l, y, dh2, y.xm, y.st2, y.ln2g, y.ln2b);
    linear_back(n + ".proj.backward", l, y, dx, y.att, datt, y.wo, y.bo, d, d);
    b.op(n + ".attn.backward", "attention", Phase::Backward, l, {datt, y.probs, y.qkv},
         {dqkv, dprobs}, [=](const OpContext& c) {
           const float* p = c.f(y.probs);
           const float* q = c.f(y.qkv);
           float* dq = c.f(dqkv);
           float* dp = c.f(dprobs);
           for (int bi = 0; bi < B; ++bi) {
             const std::size_t o3 = std::size_t(bi) * T * 3 * d, os = std::size_t(bi) * H * T * T;
             const float* dy = c.f(datt) + std::size_t(bi) * T * d;
             // dP = dY V^T; dV = P^T dY
             c.k.gemm_batched(c.stream, Trans::No, Trans::Yes, T, T, hd, 1.0f, dy, d, hd,
                              q + o3 + 2 * d, 3 * d, hd, 0.0f, dp + os, T, std::int64_t(T) * T, H);
             c.k.gemm_batched(c.stream, Trans::Yes, Trans::No, T, hd, T, 1.0f, p + os, T,
                              std::int64_t(T) * T, dy, d, hd, 0.0f, dq + o3 + 2 * d, 3 * d, hd, H);
           }
           c.k.causal_softmax_backward(c.stream, dp, dp, p, B * H * T, T, scale);
           for (int bi = 0; bi < B; ++bi) {
             const std::size_t o3 = std::size_t(bi) * T * 3 * d, os = std::size_t(bi) * H * T * T;
             // dQ = dS K; dK = dS^T Q
             c.k.gemm_batched(c.stream, Trans::No, Trans::No, T, hd, T, 1.0f, dp + os, T,
                              std::int64_t(T) * T, q + o3 + d, 3 * d, hd, 0.0f, dq + o3, 3 * d,
                              hd, H);
             c.k.gemm_batched(c.stream, Trans::Yes, Trans::No, T, hd, T, 1.0f, dp + os, T,
                              std::int64_t(T) * T, q + o3, 3 * d, hd, 0.0f, dq + o3 + d, 3 * d,
                              hd, H);
           }
         });
    linear_back(n + ".qkv.backward", l, y, dqkv, y.h1, dh1, y.wqkv, y.bqkv, d, 3 * d);
    layer_norm_back(n + ".ln1.backward", l, y, dh1, y.x, y.st1, y.ln1g, y.ln1b);
  }
  const TensorId ew = embed.w, eg = embed.g;
  b.op("embed.backward", "embedding", Phase::Backward, 0, {dx, tokens}, {eg},
       [=](const OpContext& c) {
         c.k.embedding_backward(c.stream, c.f(eg) + tok_off, c.f(eg) + pos_off, c.f(dx),
                                c.i32(tokens), B, T, d, V);
       });
  (void)ew;

  auto perm = std::make_shared<std::vector<std::int32_t>>(std::size_t(V));
  for (int i = 0; i < V; ++i) (*perm)[std::size_t(i)] = i;
  Rng pr(o.seed + 17);
  for (int i = V - 1; i > 0; --i) std::swap((*perm)[std::size_t(i)], (*perm)[pr.below(std::uint32_t(i + 1))]);
  const std::uint64_t seed = o.seed;
  Program p = b.finish(loss, [=](int step, TensorId t, std::span<std::byte> out) {
    auto* dst = reinterpret_cast<std::int32_t*>(out.data());
    std::vector<std::int32_t> row(std::size_t(T) + 1);
    for (int r = 0; r < B; ++r) {
      markov_row(seed, step, r, *perm, V, row.data(), T + 1);
      const std::int32_t* src = row.data() + (t == targets ? 1 : 0);
      std::copy(src, src + T, dst + std::size_t(r) * T);
    }
  });
  return p;
}

}  // namespace spill::train

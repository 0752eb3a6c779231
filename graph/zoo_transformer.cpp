// Transformer models of the zoo: GPT-2 (small/medium/large/XL, pre-norm, tied LM head) and
// BERT-large (post-norm encoder, pooler, MLM decoder tied to the word embeddings, NSP head).
// Parameter counts equal the released checkpoints: GPT-2 124,439,808 / 354,823,168 /
// 774,030,080 / 1,557,611,200; BERT-large 335,141,888 (BertModel) + 2,050 (NSP classifier).
#include <string>

#include "core/errors.hpp"
#include "graph/zoo.hpp"
#include "graph/zoo_builder.hpp"

namespace spill::graph {
namespace {

struct Dims {
  std::uint64_t batch, seq, d, heads, vocab;
  std::uint64_t tokens() const { return batch * seq; }
};

class Transformer {
 public:
  Transformer(ZooBuilder& b, Dims dims) : b_(b), x_(dims) {}

  TensorIndex linear(const std::string& n, TensorIndex in, std::uint64_t fin,
                     std::uint64_t fout) {
    ZooBuilder::Layer l{n, "matmul", {in},
                        {b_.param(n + ".weight", fin * fout), b_.param(n + ".bias", fout)}};
    l.out_elems = x_.tokens() * fout;
    l.flops = 2.0 * double(x_.tokens()) * double(fin * fout);
    return b_.layer(std::move(l));
  }
  TensorIndex layernorm(const std::string& n, TensorIndex in) {
    ZooBuilder::Layer l{n, "layernorm", {in},
                        {b_.param(n + ".weight", x_.d), b_.param(n + ".bias", x_.d)}};
    l.out_elems = x_.tokens() * x_.d;
    l.flops = 8.0 * double(l.out_elems);
    l.backward_flops = 12.0 * double(l.out_elems);
    return b_.layer(std::move(l));
  }
  TensorIndex elementwise(const std::string& n, const std::string& type,
                          std::vector<TensorIndex> in, std::uint64_t elems, double flops_per,
                          bool saves_inputs) {
    ZooBuilder::Layer l{n, type, std::move(in), {}};
    l.out_elems = elems;
    l.flops = flops_per * double(elems);
    l.backward_flops = saves_inputs ? l.flops : 0;
    l.saves_inputs = saves_inputs;
    return b_.layer(std::move(l));
  }
  // Multi-head self-attention from the fused QKV projection: scores, softmax, context.
  TensorIndex attention(const std::string& n, TensorIndex qkv) {
    const std::uint64_t score_elems = x_.batch * x_.heads * x_.seq * x_.seq;
    const double matmul = 2.0 * double(x_.batch) * double(x_.seq * x_.seq) * double(x_.d);
    ZooBuilder::Layer s{n + ".scores", "batched_matmul", {qkv}, {}};
    s.out_elems = score_elems;
    s.flops = matmul;
    TensorIndex scores = b_.layer(std::move(s));
    ZooBuilder::Layer p{n + ".softmax", "softmax", {scores}, {}};
    p.out_elems = score_elems;
    p.flops = 5.0 * double(score_elems);
    p.saves_inputs = false;
    p.saves_output = true;  // softmax backward needs its output only
    TensorIndex probs = b_.layer(std::move(p));
    ZooBuilder::Layer c{n + ".context", "batched_matmul", {probs, qkv}, {}};
    c.out_elems = x_.tokens() * x_.d;
    c.flops = matmul;
    return b_.layer(std::move(c));
  }
  TensorIndex mlp(const std::string& n, TensorIndex in) {
    TensorIndex h = linear(n + ".fc", in, x_.d, 4 * x_.d);
    h = elementwise(n + ".gelu", "gelu", {h}, x_.tokens() * 4 * x_.d, 8.0, true);
    return linear(n + ".proj", h, 4 * x_.d, x_.d);
  }
  // Embedding lookup plus position (and optionally token-type) embeddings.
  TensorIndex embed(TensorIndex ids, std::vector<TensorIndex> tables) {
    ZooBuilder::Layer l{"embed", "embedding", {ids}, std::move(tables)};
    l.out_elems = x_.tokens() * x_.d;
    l.flops = 2.0 * double(l.out_elems);
    l.backward_flops = l.flops;
    return b_.layer(std::move(l));
  }
  // Logits through the (tied) word embedding matrix, then softmax cross-entropy.
  void lm_head_loss(TensorIndex h, TensorIndex wte, TensorIndex labels,
                    std::vector<TensorIndex> extra_params = {}) {
    ZooBuilder::Layer l{"lm_head", "matmul", {h}, {wte}};
    l.params.insert(l.params.end(), extra_params.begin(), extra_params.end());
    l.out_elems = x_.tokens() * x_.vocab;
    l.flops = 2.0 * double(x_.tokens()) * double(x_.d * x_.vocab);
    TensorIndex logits = b_.layer(std::move(l));
    b_.loss("loss", logits, labels, 5.0 * double(x_.tokens() * x_.vocab));
  }
  const Dims& dims() const { return x_; }

 private:
  ZooBuilder& b_;
  Dims x_;
};

std::uint64_t resolve_seq(const ZooOptions& o, std::uint64_t max_seq, const std::string& model) {
  if (o.seq == 0) return max_seq;
  SPILL_EXPECTS(o.seq > 0 && std::uint64_t(o.seq) <= max_seq,
                model + ": sequence length must be in 1.." + std::to_string(max_seq) + ", got " +
                    std::to_string(o.seq));
  return std::uint64_t(o.seq);
}

}  // namespace

Graph build_gpt2(std::string_view size, const ZooOptions& o) {
  struct Cfg {
    const char* name;
    std::uint64_t d, layers, heads;
  };
  static const Cfg cfgs[] = {{"small", 768, 12, 12}, {"medium", 1024, 24, 16},
                             {"large", 1280, 36, 20}, {"xl", 1600, 48, 25}};
  const Cfg* cfg = nullptr;
  for (const Cfg& c : cfgs)
    if (size == c.name) cfg = &c;
  SPILL_EXPECTS(cfg, "unknown GPT-2 size '" + std::string(size) +
                         "' (known: small, medium, large, xl)");
  const std::string model = "gpt2-" + std::string(size);
  const std::uint64_t n_ctx = 1024;
  Dims dims{std::uint64_t(o.batch), resolve_seq(o, n_ctx, model), cfg->d, cfg->heads, 50257};
  ZooBuilder b(model, o);
  Transformer T(b, dims);
  TensorIndex ids = b.input("token_ids", dims.tokens(), DType::I64);
  TensorIndex labels = b.input("labels", dims.tokens(), DType::I64);
  TensorIndex wte = b.param("wte", dims.vocab * dims.d);
  TensorIndex wpe = b.param("wpe", n_ctx * dims.d);
  TensorIndex h = T.embed(ids, {wte, wpe});
  const std::uint64_t act = dims.tokens() * dims.d;
  for (std::uint64_t i = 0; i < cfg->layers; ++i) {
    const std::string n = "h" + std::to_string(i);
    TensorIndex a = T.layernorm(n + ".ln_1", h);
    a = T.linear(n + ".attn.c_attn", a, dims.d, 3 * dims.d);
    a = T.attention(n + ".attn", a);
    a = T.linear(n + ".attn.c_proj", a, dims.d, dims.d);
    h = T.elementwise(n + ".add_1", "add", {h, a}, act, 1.0, false);
    TensorIndex m = T.layernorm(n + ".ln_2", h);
    m = T.mlp(n + ".mlp", m);
    h = T.elementwise(n + ".add_2", "add", {h, m}, act, 1.0, false);
  }
  h = T.layernorm("ln_f", h);
  T.lm_head_loss(h, wte, labels);
  return b.finish();
}

Graph build_bert_large(const ZooOptions& o) {
  const std::uint64_t max_pos = 512, d = 1024;
  Dims dims{std::uint64_t(o.batch), resolve_seq(o, max_pos, "bert-large"), d, 16, 30522};
  ZooBuilder b("bert-large", o);
  Transformer T(b, dims);
  TensorIndex ids = b.input("token_ids", dims.tokens(), DType::I64);
  TensorIndex labels = b.input("labels", dims.tokens(), DType::I64);
  TensorIndex words = b.param("embeddings.word", dims.vocab * d);
  TensorIndex h = T.embed(ids, {words, b.param("embeddings.position", max_pos * d),
                                b.param("embeddings.token_type", 2 * d)});
  h = T.layernorm("embeddings.ln", h);
  const std::uint64_t act = dims.tokens() * d;
  for (int i = 0; i < 24; ++i) {
    const std::string n = "layer" + std::to_string(i);
    TensorIndex a = T.linear(n + ".attention.qkv", h, d, 3 * d);
    a = T.attention(n + ".attention", a);
    a = T.linear(n + ".attention.output", a, d, d);
    h = T.layernorm(n + ".attention.ln",
                    T.elementwise(n + ".add_1", "add", {h, a}, act, 1.0, false));
    TensorIndex m = T.mlp(n + ".ffn", h);
    h = T.layernorm(n + ".output.ln", T.elementwise(n + ".add_2", "add", {h, m}, act, 1.0, false));
  }
  // Pooler on the [CLS] token and the next-sentence classifier; their loss is folded into the
  // MLM loss op, which reads the NSP logits as an extra input.
  ZooBuilder::Layer pool{"pooler", "matmul", {h},
                         {b.param("pooler.weight", d * d), b.param("pooler.bias", d)}};
  pool.out_elems = dims.batch * d;
  pool.flops = 2.0 * double(dims.batch) * double(d * d);
  TensorIndex pooled = b.layer(std::move(pool));
  ZooBuilder::Layer nsp{"nsp", "matmul", {pooled},
                        {b.param("nsp.weight", d * 2), b.param("nsp.bias", 2)}};
  nsp.out_elems = dims.batch * 2;
  nsp.flops = 2.0 * double(dims.batch) * double(d * 2);
  TensorIndex nsp_logits = b.layer(std::move(nsp));
  // MLM logits through the tied word embeddings; the NSP logits join them in the loss.
  ZooBuilder::Layer head{"mlm_head", "matmul", {h, nsp_logits}, {words}};
  head.out_elems = dims.tokens() * dims.vocab;
  head.flops = 2.0 * double(dims.tokens()) * double(d * dims.vocab);
  TensorIndex logits = b.layer(std::move(head));
  b.loss("loss", logits, labels, 5.0 * double(dims.tokens() * dims.vocab));
  return b.finish();
}

}  // namespace spill::graph

#include "train/models.hpp"

#include <cmath>

#include "core/errors.hpp"

namespace spill::train {

const std::vector<std::string>& model_names() {
  static const std::vector<std::string> names{"mlp", "cnn", "gpt-mini", "gpt-medium"};
  return names;
}

Program build_model(std::string_view name, const ModelOptions& o) {
  // Ranges that keep every size the builders compute in range: gpt's batch * seq rows are an
  // int, and a width of 2^31 asked for a 128 GiB host table before any check (issue 11).
  struct Bound {
    const char* option;
    int value, max;
  };
  for (const Bound& b : {Bound{"batch", o.batch, kMaxModelBatch}, {"layers", o.layers, kMaxModelLayers},
                         {"width", o.width, kMaxModelWidth}, {"seq", o.seq, kMaxModelSeq}})
    SPILL_EXPECTS(b.value >= 0 && b.value <= b.max,
                  "model '" + std::string(name) + "': " + b.option + " must be in 0.." +
                      std::to_string(b.max) + " (0: the model's default), got " +
                      std::to_string(b.value));
  SPILL_EXPECTS(std::isfinite(o.lr) && o.lr >= 0,
                "model '" + std::string(name) + "': lr must be a finite number not below 0");
  if (name == "mlp") return build_mlp(o);
  if (name == "cnn") return build_cnn(o);
  if (name == "gpt-mini" || name == "gpt-medium") return build_gpt(name, o);
  std::string known;
  for (const std::string& n : model_names()) known += (known.empty() ? "" : ", ") + n;
  throw InvalidArgument("unknown model '" + std::string(name) + "' (known: " + known + ")");
}

std::uint64_t Rng::next() {
  std::uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

float Rng::uniform(float lo, float hi) {
  return lo + (hi - lo) * static_cast<float>(double(next() >> 11) * (1.0 / 9007199254740992.0));
}

std::uint32_t Rng::below(std::uint32_t n) { return static_cast<std::uint32_t>(next() % n); }

}  // namespace spill::train

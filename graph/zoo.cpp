// Dispatch from the zoo's stable model names to the builders.
#include "graph/zoo.hpp"

#include "core/errors.hpp"

namespace spill::graph {

const std::vector<std::string>& zoo_models() {
  static const std::vector<std::string> names{"mlp",        "vgg16",       "resnet50",
                                              "resnet152",  "unet3d",      "gpt2-small",
                                              "gpt2-medium", "gpt2-large", "gpt2-xl",
                                              "bert-large"};
  return names;
}

Graph build_model(std::string_view name, const ZooOptions& o) {
  if (name == "mlp") return build_mlp(o);
  if (name == "vgg16") return build_vgg16(o);
  if (name == "resnet50") return build_resnet(50, o);
  if (name == "resnet152") return build_resnet(152, o);
  if (name == "unet3d") return build_unet3d(o);
  if (name == "bert-large") return build_bert_large(o);
  if (name.substr(0, 5) == "gpt2-") {
    std::string_view size = name.substr(5);
    if (size == "small" || size == "medium" || size == "large" || size == "xl")
      return build_gpt2(size, o);
  }
  std::string known;
  for (const std::string& n : zoo_models()) known += (known.empty() ? "" : ", ") + n;
  throw InvalidArgument("unknown model '" + std::string(name) + "' (known: " + known +
                        ", or a path to a JSON graph)");
}

}  // namespace spill::graph

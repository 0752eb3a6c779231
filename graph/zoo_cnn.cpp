// Convolutional and dense models of the zoo: MLP, VGG-16, ResNet-50/152, 3D U-Net.
// Shapes follow the reference definitions (torchvision for VGG-16 and ResNet v1.5, Cicek et
// al. 2016 for 3D U-Net), so parameter counts match the published ones.
#include <string>

#include "core/checked.hpp"
#include "core/errors.hpp"
#include "graph/zoo.hpp"
#include "graph/zoo_layers.hpp"

namespace spill::graph {

using zoo::Act;
using zoo::Layers;

// 1024 -> 4 x 4096 (ReLU) -> 1000: a plain dense network for quick experiments.
Graph build_mlp(const ZooOptions& o) {
  ZooBuilder b("mlp", o);
  Layers L(b, std::uint64_t(o.batch));
  Act x{b.input("features", std::uint64_t(o.batch) * 1024, o.dtype), 1024, {}};
  TensorIndex labels = b.input("labels", std::uint64_t(o.batch), DType::I64);
  for (int i = 0; i < 4; ++i) {
    std::string n = "fc" + std::to_string(i + 1);
    x = L.relu(n + ".relu", L.linear(n, x, 4096));
  }
  L.softmax_loss("loss", L.linear("fc5", x, 1000), labels);
  return b.finish();
}

// VGG-16 (configuration D) on 224x224 images: 138,357,544 parameters.
Graph build_vgg16(const ZooOptions& o) {
  ZooBuilder b("vgg16", o);
  Layers L(b, std::uint64_t(o.batch));
  Act x{b.input("images", std::uint64_t(o.batch) * 3 * 224 * 224, o.dtype), 3, {224, 224}};
  TensorIndex labels = b.input("labels", std::uint64_t(o.batch), DType::I64);
  const int cfg[] = {64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0};
  int conv = 0, pool = 0;
  for (int c : cfg) {
    if (c == 0) {
      x = L.pool("pool" + std::to_string(++pool), x, 2, 2, 0);
      continue;
    }
    std::string n = "conv" + std::to_string(++conv);
    x = L.relu(n + ".relu", L.conv(n, x, std::uint64_t(c), 3, 1, 1, true));
  }
  x = L.relu("fc6.relu", L.linear("fc6", x, 4096));
  x = L.relu("fc7.relu", L.linear("fc7", x, 4096));
  L.softmax_loss("loss", L.linear("fc8", x, 1000), labels);
  return b.finish();
}

namespace {

Act conv_bn(Layers& L, const std::string& n, const Act& x, std::uint64_t c, std::uint64_t k,
            std::uint64_t stride, std::uint64_t pad, bool relu) {
  Act y = L.batchnorm(n + ".bn", L.conv(n, x, c, k, stride, pad, false));
  return relu ? L.relu(n + ".relu", y) : y;
}

// Bottleneck block (ResNet v1.5: the stride sits on the 3x3 convolution).
Act bottleneck(Layers& L, const std::string& n, const Act& x, std::uint64_t width,
               std::uint64_t stride) {
  Act y = conv_bn(L, n + ".conv1", x, width, 1, 1, 0, true);
  y = conv_bn(L, n + ".conv2", y, width, 3, stride, 1, true);
  y = conv_bn(L, n + ".conv3", y, width * 4, 1, 1, 0, false);
  Act shortcut = x;
  if (stride != 1 || x.c != width * 4)
    shortcut = conv_bn(L, n + ".downsample", x, width * 4, 1, stride, 0, false);
  return L.relu(n + ".relu", L.add(n + ".add", y, shortcut));
}

}  // namespace

// ResNet-50 (25,557,032 parameters) and ResNet-152 (60,192,808) on 224x224 images.
Graph build_resnet(int depth, const ZooOptions& o) {
  std::vector<int> blocks;
  if (depth == 50) blocks = {3, 4, 6, 3};
  else if (depth == 152) blocks = {3, 8, 36, 3};
  else throw InvalidArgument("resnet depth must be 50 or 152, got " + std::to_string(depth));
  ZooBuilder b("resnet" + std::to_string(depth), o);
  Layers L(b, std::uint64_t(o.batch));
  Act x{b.input("images", std::uint64_t(o.batch) * 3 * 224 * 224, o.dtype), 3, {224, 224}};
  TensorIndex labels = b.input("labels", std::uint64_t(o.batch), DType::I64);
  x = conv_bn(L, "conv1", x, 64, 7, 2, 3, true);
  x = L.pool("maxpool", x, 3, 2, 1);
  for (std::size_t s = 0; s < blocks.size(); ++s) {
    std::uint64_t width = 64ull << s;
    for (int i = 0; i < blocks[s]; ++i) {
      std::string n = "layer" + std::to_string(s + 1) + "." + std::to_string(i);
      x = bottleneck(L, n, x, width, (i == 0 && s > 0) ? 2 : 1);
    }
  }
  x = L.global_avgpool("avgpool", x);
  L.softmax_loss("loss", L.linear("fc", x, 1000), labels);
  return b.finish();
}

// 3D U-Net (Cicek et al. 2016): 3 input channels, 3 classes, four resolution levels, each
// 3x3x3 convolution followed by batch norm and ReLU, 2x2x2 max pooling and 2x2x2 up-convolution
// (no bias). "Same" padding keeps the volume a power-of-two friendly cube (the paper uses valid
// convolutions on 132x132x116). Parameters: 19,069,955 as published plus 4,672 batch-norm
// scale/shift parameters that the published count leaves out.
Graph build_unet3d(const ZooOptions& o) {
  const int v = o.volume == 0 ? 128 : o.volume;
  SPILL_EXPECTS(v >= 8 && v % 8 == 0,
                "unet3d: volume must be a positive multiple of 8, got " + std::to_string(v));
  ZooBuilder b("unet3d", o);
  Layers L(b, std::uint64_t(o.batch));
  const std::uint64_t side = std::uint64_t(v);
  const std::uint64_t vox = checked_mul(checked_mul(side, side, "unet3d: volume"), side,
                                        "unet3d: volume (voxels)");
  const std::uint64_t label_elems = checked_mul(std::uint64_t(o.batch), vox, "unet3d: labels");
  Act x{b.input("volume", checked_mul(label_elems, 3, "unet3d: input volume"), o.dtype), 3,
        {side, side, side}};
  TensorIndex labels = b.input("labels", label_elems, DType::U8);
  auto block = [&](const std::string& n, Act a, std::uint64_t c) {
    a = L.batchnorm(n + ".bn", L.conv(n, a, c, 3, 1, 1, true));
    return L.relu(n + ".relu", a);
  };
  std::vector<Act> skips;
  const std::uint64_t widths[] = {32, 64, 128, 256};
  for (int lvl = 0; lvl < 4; ++lvl) {
    std::string n = "down" + std::to_string(lvl + 1);
    std::uint64_t c = widths[lvl];
    x = block(n + ".conv1", x, c);
    x = block(n + ".conv2", x, 2 * c);
    if (lvl < 3) {
      skips.push_back(x);
      x = L.pool(n + ".pool", x, 2, 2, 0);
    }
  }
  for (int lvl = 2; lvl >= 0; --lvl) {
    std::string n = "up" + std::to_string(lvl + 1);
    x = L.upconv(n + ".upconv", x, x.c, 2);
    x = L.concat(n + ".concat", skips[std::size_t(lvl)], x);
    x = block(n + ".conv1", x, widths[lvl] * 2);
    x = block(n + ".conv2", x, widths[lvl] * 2);
  }
  Act logits = L.conv("head", x, 3, 1, 1, 0, true);
  L.softmax_loss("loss", logits, labels);
  return b.finish();
}

}  // namespace spill::graph

// A graph at another batch size: captured graphs (format version 2) say which part of each
// tensor's bytes and each op's FLOPs and traffic is proportional to the batch, so one capture
// answers for every batch. Sizes are exact (a whole number of bytes per sample); FLOPs, traffic
// and measured times scale with their proportional part; workspace does not scale.
#pragma once

#include <cstdint>

#include "graph/ir.hpp"

namespace spill::graph {

// Whether `g` can be rescaled (it records its batch and how sizes depend on it).
bool has_batch_scaling(const Graph& g);

// `g` at `batch` samples. Throws InvalidArgument when `g` has no batch scaling (naming the graph
// and how to get one) or `batch` is 0.
Graph at_batch(const Graph& g, std::uint64_t batch);

}  // namespace spill::graph

// Internal factories of the two Kernels implementations (kernels.cpp picks one by device).
#pragma once

#include <memory>

#include "kernels/kernels.hpp"

namespace spill::kernels {

// Runs kernels::cpu math on the stream workers of a SimDevice, each call taking the simulated
// time `roofline` gives its cost. Throws InvalidArgument when `device` is not a SimDevice.
std::unique_ptr<Kernels> make_cpu_kernels(Device& device, const Roofline& roofline);

}  // namespace spill::kernels

// The swapper's view of the memory below it: ResidencyBackend, LargeBlockObserver and
// HostMemory are defined by the allocator (allocator/residency.hpp), since dependencies point
// from the swapper down to the allocator, never back.
#pragma once

#include "allocator/residency.hpp"

// NVTX ranges around spill's own work (swap-out, swap-in, prefetch, evict, pin waits, OOM), so
// Nsight Systems shows them beside the framework's. NVTX3 is header-only: without a profiler
// attached each range costs a branch, and nothing links against libcuda or libnvToolsExt.
#pragma once

#include <nvtx3/nvToolsExt.h>

namespace spill::profiling {

// The domain all of spill's ranges live in.
inline nvtxDomainHandle_t nvtx_domain() {
  static nvtxDomainHandle_t domain = nvtxDomainCreateA("spill");
  return domain;
}

// A range's or a mark's attributes: an ASCII name and a colour.
inline nvtxEventAttributes_t nvtx_attributes(const char* name, unsigned argb) {
  nvtxEventAttributes_t a{};
  a.version = NVTX_VERSION;
  a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
  a.colorType = NVTX_COLOR_ARGB;
  a.color = argb;
  a.messageType = NVTX_MESSAGE_TYPE_ASCII;
  a.message.ascii = name;
  return a;
}

// RAII range: pushed on construction, popped on destruction. `name` must outlive the range
// (use string literals).
class NvtxRange {
 public:
  explicit NvtxRange(const char* name, unsigned argb = 0xff4a90d9u) {
    const nvtxEventAttributes_t a = nvtx_attributes(name, argb);
    nvtxDomainRangePushEx(nvtx_domain(), &a);
  }
  ~NvtxRange() { nvtxDomainRangePop(nvtx_domain()); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

// An instant marker (a step's beginning); `name` as for NvtxRange.
inline void nvtx_mark(const char* name, unsigned argb) {
  const nvtxEventAttributes_t a = nvtx_attributes(name, argb);
  nvtxDomainMarkEx(nvtx_domain(), &a);
}

// Colours by kind of work, so the timeline reads at a glance.
inline constexpr unsigned kNvtxSwapOut = 0xffe67e22u;
inline constexpr unsigned kNvtxSwapIn = 0xff27ae60u;
inline constexpr unsigned kNvtxPrefetch = 0xff2ecc71u;
inline constexpr unsigned kNvtxEvict = 0xffd35400u;
inline constexpr unsigned kNvtxWait = 0xffc0392bu;
inline constexpr unsigned kNvtxOom = 0xff8e44adu;
inline constexpr unsigned kNvtxStep = 0xff34495eu;

}  // namespace spill::profiling

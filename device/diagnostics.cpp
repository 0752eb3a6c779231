#include "device/diagnostics.hpp"

#include <vector>

#include "core/pattern.hpp"

namespace spill {

int count_stale_reads(Device& dev, int trials, bool join, std::size_t bytes) {
  void* d = dev.allocate(bytes);
  std::vector<unsigned char> in(bytes), out(bytes);
  Stream writer = dev.create_stream(), reader = dev.create_stream();
  Event written = dev.create_event();
  int stale = 0;
  for (int trial = 0; trial < trials; ++trial) {
    const std::uint64_t seed = 1000 + static_cast<std::uint64_t>(trial);
    fill_pattern(in.data(), bytes, seed);
    dev.fill_async(d, 0, bytes, writer);
    dev.synchronize(writer);
    dev.copy_async(d, in.data(), bytes, CopyKind::HostToDevice, writer);
    dev.record(written, writer);
    if (join) dev.wait(reader, written);
    dev.copy_async(out.data(), d, bytes, CopyKind::DeviceToHost, reader);
    dev.synchronize();
    stale += find_pattern_mismatch(out.data(), bytes, seed) != bytes;
  }
  dev.destroy_event(written);
  dev.destroy_stream(writer);
  dev.destroy_stream(reader);
  dev.deallocate(d);
  return stale;
}

}  // namespace spill

// A note on stderr when the process faults inside a simulated device's address space: there
// the fault means a block that is not mapped (swapped out, or freed) was touched without a pin,
// which on the CPU bridge is how a missing pin shows (a thread that reads an offloaded model's
// tensors outside spill.torch.pin_reads()). The SIGSEGV handler, installed at the first
// reservation, writes the note with async-signal-safe calls only (the ranges are a lock-free
// table) and hands the fault on to the handler that was there before (the default one kills
// the process, as without it). A fault outside every reservation is handed on untouched. In a
// process forked after the first reservation (a data-loader worker) the note says so instead:
// the child inherits the mappings as they were at the fork and can pin nothing.
#pragma once

#include <cstddef>

namespace spill::sim {

// [base, base + bytes) is a simulated device's reservation / is no longer one.
void note_reservation(const void* base, std::size_t bytes);
void forget_reservation(const void* base);

// The calling process owns the reservations it inherited (a child forked on purpose that
// faults on purpose, as device-check's fault check): its faults get the ordinary note.
void adopt_reservations();

}  // namespace spill::sim

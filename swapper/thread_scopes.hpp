// The calling thread's current step scope on each swapper (swapper.hpp: begin_step, begin_op
// and set_scope make a scope current for the calling thread on one swapper). A thread-local
// table keyed by the swapper's serial, which is never reused: one thread may drive as many
// swappers as the C API has device ordinals, each keeping its own scope, and nothing is ever
// dropped to make room for another. The table is trivially destructible, so pins from a
// thread_local destructor at the thread's end still read it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace spill::thread_scopes {

// Entries per thread: one per device ordinal of the C API (SPILL_MAX_DEVICES).
inline constexpr std::size_t kSlots = 64;

// A swapper's serial is live from born() to gone(); a thread's entries of swappers that are
// gone make room for new ones.
void born(std::uint64_t serial);
void gone(std::uint64_t serial);

// The calling thread's current scope on swapper `serial`; 0 when it never named one.
std::uint64_t get(std::uint64_t serial);
// Makes `scope` current; 0 drops the entry. Throws InvalidArgument (naming the scope) when the
// thread has a nonzero scope on kSlots live swappers already.
void set(std::uint64_t serial, std::uint64_t scope);

}  // namespace spill::thread_scopes

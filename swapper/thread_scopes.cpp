// See thread_scopes.hpp. The hot path (a pin asking for its thread's scope) scans only the
// entries in use, usually one; the live set is consulted only when a thread's table is full.
#include "swapper/thread_scopes.hpp"

#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

#include "core/errors.hpp"

namespace spill::thread_scopes {

namespace {

struct Entry {
  std::uint64_t serial;
  std::uint64_t scope;  // never 0: an entry set to 0 is removed
};
constinit thread_local Entry table[kSlots] = {};
constinit thread_local std::size_t used = 0;  // entries [0, used) are in use

struct Live {
  std::mutex mu;
  std::vector<std::uint64_t> serials;  // swappers constructed and not yet destroyed
};
Live& live() {
  static Live* const l = new Live();  // never destroyed: swappers may die during exit
  return *l;
}

void remove_at(std::size_t i) { table[i] = table[--used]; }

// Drops the calling thread's entries of swappers that are gone; returns whether any went.
bool prune() {
  Live& l = live();
  std::lock_guard lock(l.mu);
  const std::size_t before = used;
  for (std::size_t i = 0; i < used;) {
    if (std::find(l.serials.begin(), l.serials.end(), table[i].serial) == l.serials.end())
      remove_at(i);
    else
      ++i;
  }
  return used < before;
}

}  // namespace

void born(std::uint64_t serial) {
  Live& l = live();
  std::lock_guard lock(l.mu);
  l.serials.push_back(serial);
}

void gone(std::uint64_t serial) {
  Live& l = live();
  std::lock_guard lock(l.mu);
  std::erase(l.serials, serial);
}

std::uint64_t get(std::uint64_t serial) {
  for (std::size_t i = 0; i < used; ++i)
    if (table[i].serial == serial) return table[i].scope;
  return 0;
}

void set(std::uint64_t serial, std::uint64_t scope) {
  for (std::size_t i = 0; i < used; ++i) {
    if (table[i].serial != serial) continue;
    if (scope == 0) remove_at(i);
    else table[i].scope = scope;
    return;
  }
  if (scope == 0) return;  // absent means 0 already
  SPILL_EXPECTS(used < kSlots || prune(),
                "step scope " + std::to_string(scope) + ": this thread has a current scope on " +
                    std::to_string(kSlots) +
                    " live devices already, the most one thread keeps; set scope 0 on one it "
                    "no longer drives");
  table[used++] = {serial, scope};
}

}  // namespace spill::thread_scopes

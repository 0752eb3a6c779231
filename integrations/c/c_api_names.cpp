// The C API's block names: spill_set_block_name and spill_get_block_name over the allocator's
// names (CachingAllocator::set_block_name), with the text capped and checked here.
#include <cstring>
#include <string>
#include <string_view>

#include "core/errors.hpp"
#include "core/units.hpp"
#include "core/utf8.hpp"
#include "integrations/c/c_api_state.hpp"

using namespace spill;
using namespace spill::capi;

extern "C" {

spill_status spill_set_block_name(void* ptr, const char* name) {
  return on_block(ptr, "spill_set_block_name", [&](Lease& lease) {
    // Cut at a character boundary, then checked: names go into snapshots' JSON and messages
    // Python decodes strictly.
    lease.rt().allocator().set_block_name(ptr, kept_name(name, SPILL_MAX_BLOCK_NAME, "name"));
    return SPILL_OK;
  });
}

spill_status spill_get_block_name(const void* ptr, char** name) {
  if (name == nullptr)
    return fail(SPILL_ERROR_INVALID_ARGUMENT, "spill_get_block_name: name is NULL");
  *name = nullptr;
  return on_block(ptr, "spill_get_block_name", [&](Lease& lease) {
    expect_block_start(lease, ptr);
    return give_string(lease.rt().allocator().block_name(ptr), name, "spill_get_block_name");
  });
}

}  // extern "C"

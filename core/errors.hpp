// The exception hierarchy every spill layer throws, and the macros that add where it came from.
// Paths that must not throw (free, destructors, callbacks) use SPILL_ASSERT instead and report
// through the status of the next call.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

namespace spill {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A request that cannot be met within the device capacity, the budget or the host cap.
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

// Pinned host memory for swapped-out bytes ran out (the host_cap, or the host itself).
class HostCapExceeded : public OutOfMemory {
 public:
  using OutOfMemory::OutOfMemory;
};

// A CUDA runtime or driver call failed; what() carries the error's name.
class CudaError : public Error {
 public:
  CudaError(const std::string& what, int code) : Error(what), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

// The caller passed something wrong; what() names the input.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// A file spill was writing could not be written whole for lack of room (a full disk, a quota,
// a file size limit) or an I/O error: nothing about the input was wrong. what() names the file.
class WriteFailed : public Error {
 public:
  using Error::Error;
};

// `text` for an error message: as is when short, else its first `max` bytes followed by
// "... (N bytes)", so that a message never grows with the input.
std::string excerpt(std::string_view text, std::size_t max = 64);

// `message` without the " [file.cpp:NN]" SPILL_EXPECTS and its kin end it with: for a person
// who gave bad input (the command line), where spill's code noticed it is noise.
std::string without_source_location(std::string_view message);

// `message` with `more` added to its text, before the " [file.cpp:NN]" that ends it if any: the
// location stays last, where callers that cut it look for it (docs/c-api.md, conventions).
std::string with_more(std::string_view message, std::string_view more);

// `message` safe to print on a terminal: control characters (a file name's escape sequence or
// carriage return, say) as \xNN, so that a name cannot recolour, move or rewrite what the
// terminal shows; newlines and tabs, which spill's own messages use, stay.
std::string printable(std::string_view message);

// `name` (a file name, a model's or an op's name read from a file) safe to print inside one
// line: as printable(), and newlines and tabs escaped too, so that a name cannot forge a line
// of spill's output.
std::string printable_name(std::string_view name);

namespace detail {
[[noreturn]] void throw_invalid(const char* file, int line, const std::string& msg);
[[noreturn]] void throw_oom(const char* file, int line, const std::string& msg);
[[noreturn]] void throw_host_cap(const char* file, int line, const std::string& msg);
[[noreturn]] void assert_fail(const char* file, int line, const char* cond, const char* msg) noexcept;
std::string where(const char* file, int line);
}  // namespace detail

}  // namespace spill

// Throws spill::InvalidArgument with `msg` (a std::string expression) when `cond` is false.
#define SPILL_EXPECTS(cond, msg)                                                 \
  do {                                                                           \
    if (!(cond)) ::spill::detail::throw_invalid(__FILE__, __LINE__, (msg));      \
  } while (0)

// Throws spill::OutOfMemory with `msg`.
#define SPILL_FAIL_OOM(msg) ::spill::detail::throw_oom(__FILE__, __LINE__, (msg))

// Throws spill::HostCapExceeded with `msg`.
#define SPILL_FAIL_HOST_CAP(msg) ::spill::detail::throw_host_cap(__FILE__, __LINE__, (msg))

// For noexcept paths: aborts with a message in debug builds, compiled out with NDEBUG.
#ifdef NDEBUG
#define SPILL_ASSERT(cond, msg) ((void)0)
#else
#define SPILL_ASSERT(cond, msg) \
  ((cond) ? (void)0 : ::spill::detail::assert_fail(__FILE__, __LINE__, #cond, (msg)))
#endif

// The one way spill reads JSON it did not write itself (graph files, link reports, traces,
// snapshots): a depth-limited parse, and typed reads of values at a JSON path with a range per
// field. Every error is an InvalidArgument naming the input ("graph file 'g.json'"), the JSON
// path ("ops[3].reads[1]") and the rule broken; a value is described, never serialised, so a
// message stays short whatever the input holds.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

namespace spill {

// Arrays and objects nested deeper than this are rejected while parsing (spill's own formats
// nest four levels; metadata a little more).
inline constexpr int kMaxJsonDepth = 64;
// The default bound, in bytes of UTF-8, on strings read with JsonValue::as_string (names,
// kinds, directions).
inline constexpr std::size_t kMaxJsonString = 1024;

// Parses `text`. Errors name `origin` and say what is wrong and where: empty, not valid JSON
// (line, column, byte), truncated, nested deeper than `max_depth`, or a number out of range
// (1e400).
nlohmann::json parse_json(std::string_view text, std::string_view origin,
                          int max_depth = kMaxJsonDepth);

// The most read_file_text reads by default: 2 GiB (a JSON document takes several times its
// size in memory once parsed).
inline constexpr std::uint64_t kMaxInputFile = 2ull << 30;

// A whole file as text; InvalidArgument naming `origin` when it is missing, a directory or a
// device (/dev/zero), cannot be read, or is larger than `max_bytes` (a pipe is read in chunks up
// to that bound).
std::string read_file_text(const std::string& path, std::string_view origin,
                           std::uint64_t max_bytes = kMaxInputFile);

// A short description of a value for messages: numbers and booleans as written, strings quoted
// and cut after a few dozen characters, arrays and objects by their size.
std::string describe_json(const nlohmann::json& v);
// `s` quoted for a message, cut after `max` bytes (the full length in bytes is then said).
std::string quote_excerpt(std::string_view s, std::size_t max = 48);

// A JSON value and where it sits: the input's name and the path from the root. Reading a value
// of the wrong type or out of range throws InvalidArgument
//   "<origin>: <path>: <rule>, got <description>".
// The root's path prints as "(top)"; a field of the root is just its name.
class JsonValue {
 public:
  JsonValue(const nlohmann::json& root, std::string origin);
  // A value at `path` of a document not held whole (an item of an array read as a stream).
  JsonValue(const nlohmann::json& v, std::shared_ptr<const std::string> origin, std::string path);

  const nlohmann::json& raw() const { return *v_; }
  const std::string& origin() const { return *origin_; }
  const std::string& path() const { return path_; }
  // "<origin>: <path>" (or of the field `key` of this object).
  std::string where(std::string_view key = {}) const;
  [[noreturn]] void fail(std::string_view rule) const;
  [[noreturn]] void fail_field(std::string_view key, std::string_view rule) const;
  // fail(), saying "(a floating-point number)" after a float where an integer is required.
  [[noreturn]] void fail_integer(std::string_view rule) const;

  // Objects. at() requires the field; find() returns nothing when it is absent.
  bool is_object() const { return v_->is_object(); }
  const JsonValue& expect_object() const;
  bool has(std::string_view key) const;
  JsonValue at(std::string_view key) const;
  std::optional<JsonValue> find(std::string_view key) const;
  // Rejects any field not in `known` ("unknown field").
  void allow_only(std::initializer_list<std::string_view> known) const;

  // Arrays.
  std::size_t size() const;  // requires an array
  JsonValue at(std::size_t i) const;

  // This value, checked.
  std::uint64_t as_uint(std::uint64_t lo = 0,
                        std::uint64_t hi = std::numeric_limits<std::uint64_t>::max()) const;
  std::int64_t as_int(std::int64_t lo, std::int64_t hi) const;
  double as_number(double lo, double hi) const;
  std::string as_string(std::size_t max_bytes = kMaxJsonString) const;
  bool as_bool() const;

  // A field of this object, checked; required unless a default is given.
  std::uint64_t uint_field(std::string_view key, std::uint64_t lo, std::uint64_t hi,
                           std::optional<std::uint64_t> dflt = std::nullopt) const;
  std::int64_t int_field(std::string_view key, std::int64_t lo, std::int64_t hi,
                         std::optional<std::int64_t> dflt = std::nullopt) const;
  double number_field(std::string_view key, double lo, double hi,
                      std::optional<double> dflt = std::nullopt) const;
  std::string string_field(std::string_view key, std::optional<std::string> dflt = std::nullopt,
                           std::size_t max_bytes = kMaxJsonString) const;
  bool bool_field(std::string_view key, std::optional<bool> dflt = std::nullopt) const;

 private:
  std::string child_path(std::string_view key) const;
  const nlohmann::json* field(std::string_view key) const;  // nullptr when absent

  const nlohmann::json* v_;
  std::shared_ptr<const std::string> origin_;
  std::string path_;
};

// A file format's marker (an object with "format" and "version", or absent): throws
// InvalidArgument `not_it` unless its format is `format`, then "<origin>: <what_version> N is
// not supported (this spill reads version V)" unless its version is `version`.
void expect_format(const std::optional<JsonValue>& marker, std::string_view format,
                   std::uint64_t version, const std::string& origin, const std::string& not_it,
                   std::string_view what_version);

// What kind of spill file `document` is, for a message about a file given where another kind
// goes: ": it is a spill graph (spill plan reads it)", or "" when it is none
// of spill's (audit 37b L9: a trace given to `spill plan` said only "format: missing").
std::string which_spill_file(const nlohmann::json& document);
// Whether `document` is `spill plan --timeline`'s output: a Chrome trace whose otherData says
// "simulated": true.
bool is_plan_timeline(const nlohmann::json& document);

}  // namespace spill

#include "core/json_read.hpp"

#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <vector>

#include "core/errors.hpp"
#include "core/json_sax.hpp"

namespace spill {
namespace {

using nlohmann::json;

// A float as written in JSON: a whole one keeps its ".0" (64.0 printed as "64" read as an
// integer in "must be an integer ..., got 64"; audit 41b #7).
std::string number_text(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  std::string text = buf;
  if (std::isfinite(v) && text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

std::string short_number(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

}  // namespace

json parse_json(std::string_view text, std::string_view origin, int max_depth) {
  json root;
  JsonDomBuilder dom(root, max_depth);
  sax_parse_text(text, origin, dom, max_depth);
  return root;
}

std::string read_file_text(const std::string& path, std::string_view origin_view,
                           std::uint64_t max_bytes) {
  const std::string origin(origin_view);
  struct stat st {};
  SPILL_EXPECTS(::stat(path.c_str(), &st) == 0,
                origin + ": cannot open it for reading (" + std::strerror(errno) + ")");
  SPILL_EXPECTS(!S_ISDIR(st.st_mode), origin + ": is a directory, not a file");
  SPILL_EXPECTS(!S_ISCHR(st.st_mode) && !S_ISBLK(st.st_mode), origin + ": is a device, not a file");
  const std::string too_large = origin + ": larger than " + std::to_string(max_bytes >> 20) +
                                " MiB, the most spill reads from one input file";
  SPILL_EXPECTS(!S_ISREG(st.st_mode) || static_cast<std::uint64_t>(st.st_size) <= max_bytes,
                too_large);
  std::ifstream in(path, std::ios::binary);
  SPILL_EXPECTS(in.good(), origin + ": cannot open it for reading");
  // Read in chunks up to the bound, so that a pipe without end ends in an error rather than
  // in all the memory there is.
  std::string text;
  std::vector<char> chunk(1 << 20);
  while (in) {
    in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    const auto got = static_cast<std::size_t>(in.gcount());
    SPILL_EXPECTS(text.size() + got <= max_bytes, too_large);
    text.append(chunk.data(), got);
  }
  SPILL_EXPECTS(!in.bad(), origin + ": reading it failed");
  return text;
}

std::string quote_excerpt(std::string_view s, std::size_t max) {
  std::string out = "\"";
  std::size_t n = std::min(s.size(), max);
  for (std::size_t i = 0; i < n; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  out += "\"";
  if (s.size() > max) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

std::string describe_json(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return v.get<bool>() ? "true" : "false";
    case json::value_t::number_integer: return std::to_string(v.get<std::int64_t>());
    case json::value_t::number_unsigned: return std::to_string(v.get<std::uint64_t>());
    case json::value_t::number_float: return number_text(v.get<double>());
    case json::value_t::string:
      return "the string " + quote_excerpt(v.get_ref<const std::string&>());
    case json::value_t::array: return "an array of " + std::to_string(v.size()) + " items";
    case json::value_t::object: return "an object with " + std::to_string(v.size()) + " fields";
    case json::value_t::binary: return "binary data";
    case json::value_t::discarded: return "a discarded value";
  }
  return "a value";
}

// ---- JsonValue

JsonValue::JsonValue(const json& root, std::string origin)
    : v_(&root), origin_(std::make_shared<const std::string>(std::move(origin))) {}

JsonValue::JsonValue(const json& v, std::shared_ptr<const std::string> origin, std::string path)
    : v_(&v), origin_(std::move(origin)), path_(std::move(path)) {}

std::string JsonValue::child_path(std::string_view key) const {
  std::string k = key.size() <= 64 ? std::string(key) : quote_excerpt(key, 64);
  return path_.empty() ? k : path_ + "." + k;
}

std::string JsonValue::where(std::string_view key) const {
  if (!key.empty()) return *origin_ + ": " + child_path(key);
  return *origin_ + ": " + (path_.empty() ? std::string("(top)") : path_);
}

void JsonValue::fail(std::string_view rule) const {
  throw InvalidArgument(where() + ": " + std::string(rule) + ", got " + describe_json(*v_));
}

void JsonValue::fail_integer(std::string_view rule) const {
  // Many writers emit whole numbers as floats (Python's json for numpy values, JavaScript):
  // say why 64.0 is not an integer here, rather than accept it (every reader reads integers
  // exactly; a float above 2^53 is not one).
  if (v_->is_number_float())
    throw InvalidArgument(where() + ": " + std::string(rule) + ", got " + describe_json(*v_) +
                          " (a floating-point number)");
  fail(rule);
}

void JsonValue::fail_field(std::string_view key, std::string_view rule) const {
  throw InvalidArgument(where(key) + ": " + std::string(rule));
}

const JsonValue& JsonValue::expect_object() const {
  if (!v_->is_object()) fail("must be an object");
  return *this;
}

const json* JsonValue::field(std::string_view key) const {
  expect_object();
  auto it = v_->find(key);
  return it == v_->end() ? nullptr : &*it;
}

bool JsonValue::has(std::string_view key) const { return field(key) != nullptr; }

JsonValue JsonValue::at(std::string_view key) const {
  const json* f = field(key);
  if (f == nullptr) fail_field(key, "missing required field");
  return JsonValue(*f, origin_, child_path(key));
}

std::optional<JsonValue> JsonValue::find(std::string_view key) const {
  const json* f = field(key);
  if (f == nullptr) return std::nullopt;
  return JsonValue(*f, origin_, child_path(key));
}

void JsonValue::allow_only(std::initializer_list<std::string_view> known) const {
  expect_object();
  for (auto it = v_->begin(); it != v_->end(); ++it) {
    bool ok = false;
    for (std::string_view k : known) ok = ok || it.key() == k;
    if (!ok) fail_field(it.key(), "unknown field");
  }
}

std::size_t JsonValue::size() const {
  if (!v_->is_array()) fail("must be an array");
  return v_->size();
}

JsonValue JsonValue::at(std::size_t i) const {
  if (i >= size()) fail("has no item " + std::to_string(i));
  return JsonValue((*v_)[i], origin_, path_ + "[" + std::to_string(i) + "]");
}

std::uint64_t JsonValue::as_uint(std::uint64_t lo, std::uint64_t hi) const {
  const std::string rule =
      "must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  if (!v_->is_number_unsigned() && !(v_->is_number_integer() && v_->get<std::int64_t>() >= 0))
    fail_integer(rule);
  const auto n = v_->get<std::uint64_t>();
  if (n < lo || n > hi) fail(rule);
  return n;
}

std::int64_t JsonValue::as_int(std::int64_t lo, std::int64_t hi) const {
  const std::string rule =
      "must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  if (!v_->is_number_integer()) fail_integer(rule);
  if (v_->is_number_unsigned() &&
      v_->get<std::uint64_t>() >
          static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
    fail(rule);
  const auto n = v_->get<std::int64_t>();
  if (n < lo || n > hi) fail(rule);
  return n;
}

double JsonValue::as_number(double lo, double hi) const {
  const std::string rule =
      "must be a number in [" + short_number(lo) + ", " + short_number(hi) + "]";
  if (!v_->is_number()) fail(rule);
  const double d = v_->get<double>();
  if (!std::isfinite(d) || d < lo || d > hi) fail(rule);
  return d;
}

std::string JsonValue::as_string(std::size_t max_bytes) const {
  if (!v_->is_string()) fail("must be a string");
  const auto& s = v_->get_ref<const std::string&>();
  // Bytes of UTF-8, and said so: 600 x "é" were "1200 characters" (audit 41b #8).
  if (s.size() > max_bytes)
    fail("must be a string of at most " + std::to_string(max_bytes) + " bytes (UTF-8)");
  return s;
}

bool JsonValue::as_bool() const {
  if (!v_->is_boolean()) fail("must be true or false");
  return v_->get<bool>();
}

std::uint64_t JsonValue::uint_field(std::string_view key, std::uint64_t lo, std::uint64_t hi,
                                    std::optional<std::uint64_t> dflt) const {
  if (dflt && !has(key)) return *dflt;
  return at(key).as_uint(lo, hi);
}

std::int64_t JsonValue::int_field(std::string_view key, std::int64_t lo, std::int64_t hi,
                                  std::optional<std::int64_t> dflt) const {
  if (dflt && !has(key)) return *dflt;
  return at(key).as_int(lo, hi);
}

double JsonValue::number_field(std::string_view key, double lo, double hi,
                               std::optional<double> dflt) const {
  if (dflt && !has(key)) return *dflt;
  return at(key).as_number(lo, hi);
}

std::string JsonValue::string_field(std::string_view key, std::optional<std::string> dflt,
                                    std::size_t max_bytes) const {
  if (dflt && !has(key)) return *dflt;
  return at(key).as_string(max_bytes);
}

bool JsonValue::bool_field(std::string_view key, std::optional<bool> dflt) const {
  if (dflt && !has(key)) return *dflt;
  return at(key).as_bool();
}

bool is_plan_timeline(const nlohmann::json& document) {
  if (!document.is_object() || !document.contains("traceEvents")) return false;
  const auto other = document.find("otherData");
  return other != document.end() && other->is_object() && other->contains("simulated") &&
         (*other)["simulated"] == true;
}

std::string which_spill_file(const nlohmann::json& document) {
  if (!document.is_object()) return "";
  const auto format = document.find("format");
  if (format != document.end() && format->is_string()) {
    const std::string f = format->get<std::string>();
    if (f == "spill-graph") return ": it is a spill graph (spill plan reads it)";
    if (f == "spill-plan") return ": it is a spill plan (written by spill plan --plan-out)";
    if (f == "spill-link-bench")
      return ": it is a link benchmark (spill bench link --json; the --link of spill plan and "
             "spill train)";
    if (f == "spill-train" || f == "spill-train-predict")
      return ": it is spill train's --json output";
    if (f == "spill-plan-result") return ": it is spill plan's --json output (its results)";
  }
  const auto marker = document.find("spill");
  if (marker != document.end() && marker->is_object() && marker->contains("format") &&
      (*marker)["format"] == "spill-snapshot")
    return ": it is a memory snapshot (spill-snapshot-to-pickle converts it for memory_viz)";
  // Before any trace: spill report read it as a trace of no known kind (audit 41b #10).
  if (is_plan_timeline(document))
    return ": it is spill plan's simulated timeline (--timeline; open it in Perfetto: spill "
           "report reads recorded traces)";
  if (document.contains("traceEvents"))
    return ": it is a trace (Chrome/Perfetto JSON; spill report reads spill's traces)";
  return "";
}

void expect_format(const std::optional<JsonValue>& marker, std::string_view format,
                   std::uint64_t version, const std::string& origin, const std::string& not_it,
                   std::string_view what_version) {
  auto found = marker && marker->is_object() ? marker->find("format") : std::nullopt;
  SPILL_EXPECTS(found && found->raw() == format, not_it);
  const std::uint64_t v = marker->uint_field("version", 0, UINT64_MAX, 0);
  SPILL_EXPECTS(v == version, origin + ": " + std::string(what_version) + " " +
                                  std::to_string(v) +
                                  " is not supported (this spill reads version " +
                                  std::to_string(version) + ")");
}

}  // namespace spill

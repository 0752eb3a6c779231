// JSON read as a stream, with parse_json's rules and messages (core/json_read.hpp): a SAX
// handler keeps why a parse stopped (a syntax error, nesting too deep, a key given twice), the
// builder parse_json uses makes a document (or one item of a long array) with nesting bounded
// and duplicate keys refused, and a file is parsed in chunks: an input of millions of items
// need never be held as text or as one document.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/json_read.hpp"

namespace spill {

// Why a SAX parse stopped.
struct JsonParseStop {
  bool too_deep = false;
  std::optional<std::string> duplicate;  // the key given twice, cut to 64 characters
  // A syntax error as nlohmann reports it: its byte position, the token read, its id and text.
  std::size_t position = 0;
  std::string token;  // cut to 64 characters ("..." added when cut)
  int id = 0;
  std::string what;
};

// A handler for json::sax_parse that records a syntax error in `stop`. Handlers that refuse
// something (return false) set `stop.too_deep` or `stop.duplicate` first.
class JsonSaxHandler : public nlohmann::json_sax<nlohmann::json> {
 public:
  bool parse_error(std::size_t position, const std::string& last_token,
                   const nlohmann::detail::exception& ex) override;
  JsonParseStop stop;
};

// Builds a document, refusing to nest deeper than `max_depth` (nothing downstream then recurses
// without bound: dump, copies, destruction) and a key given twice in one object (nlohmann keeps
// the last one, so a file edited by hand could say one thing and mean another).
class JsonDomBuilder : public JsonSaxHandler {
 public:
  JsonDomBuilder(nlohmann::json& root, int max_depth) : root_(root), max_depth_(max_depth) {}
  // Starts a new document in `root` (a builder reused for each item of an array).
  void reset();
  // Containers open now (0 once the document is whole).
  std::size_t depth() const { return stack_.size(); }

  bool null() override { return put(nullptr) != nullptr; }
  bool boolean(bool v) override { return put(v) != nullptr; }
  bool number_integer(number_integer_t v) override { return put(v) != nullptr; }
  bool number_unsigned(number_unsigned_t v) override { return put(v) != nullptr; }
  bool number_float(number_float_t v, const string_t&) override { return put(v) != nullptr; }
  bool string(string_t& v) override { return put(std::move(v)) != nullptr; }
  bool binary(binary_t& v) override { return put(nlohmann::json::binary(std::move(v))) != nullptr; }
  bool start_object(std::size_t) override { return open(nlohmann::json::object()); }
  bool start_array(std::size_t) override { return open(nlohmann::json::array()); }
  bool end_object() override { return close(); }
  bool end_array() override { return close(); }
  bool key(string_t& k) override;

 private:
  nlohmann::json* put(nlohmann::json v);
  bool open(nlohmann::json v);
  bool close() {
    stack_.pop_back();
    return true;
  }

  nlohmann::json& root_;
  int max_depth_;
  std::vector<nlohmann::json*> stack_;
  nlohmann::json* slot_ = nullptr;
};

// Parses `text` through `sax`; when it stops, throws parse_json's message for why (an empty
// text is refused first, as parse_json does). `max_depth` is the handler's bound, for the
// message.
void sax_parse_text(std::string_view text, std::string_view origin, JsonSaxHandler& sax,
                    int max_depth = kMaxJsonDepth);

// The same for a file, read in chunks (a regular file; anything else, a pipe, is read whole by
// read_file_text first). The file is refused as read_file_text refuses it: missing, a
// directory or device, larger than `max_bytes`, unreadable.
void sax_parse_file(const std::string& path, std::string_view origin, JsonSaxHandler& sax,
                    int max_depth = kMaxJsonDepth, std::uint64_t max_bytes = kMaxInputFile);

}  // namespace spill

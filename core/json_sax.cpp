#include "core/json_sax.hpp"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "core/errors.hpp"

namespace spill {
namespace {

using nlohmann::json;

// What a message about a stopped parse needs to know of the text, found without holding it.
struct TextFacts {
  std::size_t size = 0;
  bool blank = true;      // nothing but white space
  char last = 0;          // the last character that is not white space
  std::string at;         // "line L, column C" of the byte before the error's position
  std::string end;        // the same at the end of the text
};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

std::string line_col(std::size_t line, std::size_t col) {
  return "line " + std::to_string(line) + ", column " + std::to_string(col);
}

// Counts lines and columns over chunks of the text, as parse_json's messages count them.
class FactsCounter {
 public:
  explicit FactsCounter(std::size_t byte) : stop_at_(byte == 0 ? 0 : byte - 1) {}
  void feed(const char* p, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i, ++f_.size) {
      if (f_.size == stop_at_) f_.at = line_col(line_, col_);
      const char c = p[i];
      if (!is_space(c)) f_.blank = false, f_.last = c;
      if (c == '\n') ++line_, col_ = 1;
      else ++col_;
    }
  }
  TextFacts finish() {
    if (f_.size <= stop_at_) f_.at = line_col(line_, col_);
    f_.end = line_col(line_, col_);
    return f_;
  }

 private:
  std::size_t stop_at_, line_ = 1, col_ = 1;
  TextFacts f_;
};

// A file read in chunks, as the input iterator nlohmann's parser reads (an istream's
// per-character path is about twice as slow). The end is a null position.
class ChunkReader {
 public:
  struct Iterator {
    using iterator_category = std::input_iterator_tag;
    using value_type = char;
    using difference_type = std::ptrdiff_t;
    using pointer = const char*;
    using reference = const char&;
    ChunkReader* reader;
    const char* at;
    const char& operator*() const { return *at; }
    Iterator& operator++() {
      if (++at == reader->end_) at = reader->refill();
      return *this;
    }
    bool operator==(const Iterator& o) const { return at == o.at; }
    bool operator!=(const Iterator& o) const { return at != o.at; }
  };

  explicit ChunkReader(std::istream& in) : in_(in), buffer_(1 << 20) {}
  Iterator begin() { return {this, refill()}; }

 private:
  const char* refill() {
    in_.read(buffer_.data(), static_cast<std::streamsize>(buffer_.size()));
    const auto got = static_cast<std::size_t>(in_.gcount());
    end_ = buffer_.data() + got;
    return got == 0 ? nullptr : buffer_.data();
  }

  std::istream& in_;
  std::vector<char> buffer_;
  const char* end_ = nullptr;
};

// nlohmann's reason ("syntax error while parsing value - invalid literal"), without its prefix
// and without the token it quotes (which may be as long as the input).
std::string reason_of(const std::string& what) {
  std::string r = what;
  if (auto colon = r.find("]"); colon != std::string::npos && r.rfind("[json.exception", 0) == 0)
    r = r.substr(colon + 1);
  if (auto at = r.find(": "); r.find("parse error") != std::string::npos && at != std::string::npos)
    r = r.substr(at + 2);
  if (auto last = r.find("; last read"); last != std::string::npos) r = r.substr(0, last);
  if (r.size() > 160) r = r.substr(0, 160) + "...";
  while (!r.empty() && r.front() == ' ') r.erase(r.begin());
  return r;
}

[[noreturn]] void throw_stop(const JsonParseStop& stop, const std::string& origin, int max_depth,
                             const TextFacts& text) {
  SPILL_EXPECTS(!text.blank, origin + ": empty: there is no JSON in it");
  if (stop.too_deep) {
    throw InvalidArgument(origin + ": arrays or objects nested deeper than " +
                          std::to_string(max_depth) + " levels");
  }
  if (stop.duplicate) {
    throw InvalidArgument(origin + ": the key " + quote_excerpt(*stop.duplicate, 64) +
                          " appears twice in one object");
  }
  const std::size_t byte = stop.position;
  const std::string at = text.at + " (byte " + std::to_string(byte) + ")";
  if (stop.id == 406) {
    throw InvalidArgument(origin + ": number " + quote_excerpt(stop.token, 40) + " at " + at +
                          " is out of range (beyond a double's range)");
  }
  const bool closes = text.last == '}' || text.last == ']';
  const bool at_end = byte + 1 >= text.size || stop.what.find("end of input") != std::string::npos;
  // "unexpected 'x'; expected end of input": a whole value with more text after it.
  if (stop.what.find("expected end of input") != std::string::npos &&
      stop.what.find("unexpected end of input") == std::string::npos) {
    throw InvalidArgument(origin + ": text after the JSON value, at " + at + ": " +
                          quote_excerpt(stop.token, 40));
  }
  if (at_end && !closes) {
    throw InvalidArgument(origin + ": truncated: the JSON ends early at byte " +
                          std::to_string(byte) + " (" + text.end + ")");
  }
  throw InvalidArgument(origin + ": not valid JSON at " + at + ": " + reason_of(stop.what) +
                        (stop.token.empty() ? std::string()
                                            : "; last read " + quote_excerpt(stop.token, 40)));
}

}  // namespace

bool JsonSaxHandler::parse_error(std::size_t position, const std::string& last_token,
                                 const nlohmann::detail::exception& ex) {
  stop.position = position;
  stop.token = last_token.substr(0, 64) + (last_token.size() > 64 ? "..." : "");
  stop.id = ex.id;
  stop.what = ex.what();
  return false;
}

void JsonDomBuilder::reset() {
  root_ = json();
  stack_.clear();
  slot_ = nullptr;
}

bool JsonDomBuilder::key(string_t& k) {
  if (stack_.back()->contains(k)) {
    stop.duplicate = k.substr(0, 64);
    return false;
  }
  slot_ = &(*stack_.back())[k];
  return true;
}

json* JsonDomBuilder::put(json v) {
  if (stack_.empty()) {
    root_ = std::move(v);
    return &root_;
  }
  json* top = stack_.back();
  if (top->is_array()) {
    top->push_back(std::move(v));
    return &top->back();
  }
  *slot_ = std::move(v);
  return slot_;
}

bool JsonDomBuilder::open(json v) {
  if (static_cast<int>(stack_.size()) >= max_depth_) {
    stop.too_deep = true;
    return false;
  }
  stack_.push_back(put(std::move(v)));
  return true;
}

void sax_parse_text(std::string_view text, std::string_view origin_view, JsonSaxHandler& sax,
                    int max_depth) {
  const std::string origin(origin_view);
  SPILL_EXPECTS(text.find_first_not_of(" \t\r\n") != std::string_view::npos,
                origin + ": empty: there is no JSON in it");
  if (json::sax_parse(text, &sax)) return;
  FactsCounter facts(sax.stop.position);
  facts.feed(text.data(), text.size());
  throw_stop(sax.stop, origin, max_depth, facts.finish());
}

void sax_parse_file(const std::string& path, std::string_view origin_view, JsonSaxHandler& sax,
                    int max_depth, std::uint64_t max_bytes) {
  const std::string origin(origin_view);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    // read_file_text says why it cannot be read, or reads a pipe whole (up to its bound).
    sax_parse_text(read_file_text(path, origin, max_bytes), origin, sax, max_depth);
    return;
  }
  SPILL_EXPECTS(static_cast<std::uint64_t>(st.st_size) <= max_bytes,
                origin + ": larger than " + std::to_string(max_bytes >> 20) +
                    " MiB, the most spill reads from one input file");
  std::ifstream in(path, std::ios::binary);
  SPILL_EXPECTS(in.good(), origin + ": cannot open it for reading");
  ChunkReader reader(in);
  const bool ok = json::sax_parse(reader.begin(), ChunkReader::Iterator{&reader, nullptr}, &sax);
  SPILL_EXPECTS(!in.bad(), origin + ": reading it failed");
  if (ok) return;
  // The message needs lines and columns: count them in a second pass, in chunks.
  FactsCounter facts(sax.stop.position);
  std::ifstream again(path, std::ios::binary);
  std::vector<char> chunk(1 << 20);
  while (again) {
    again.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    facts.feed(chunk.data(), static_cast<std::size_t>(again.gcount()));
  }
  throw_stop(sax.stop, origin, max_depth, facts.finish());
}

}  // namespace spill

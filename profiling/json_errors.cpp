#include "profiling/json_errors.hpp"

#include <fstream>
#include <sstream>

#include "core/errors.hpp"

namespace spill::profiling {

nlohmann::json parse_json_file_text(const std::string& text, const std::string& origin) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    std::size_t end = text.find_last_not_of(" \t\r\n");
    bool closes = end != std::string::npos && (text[end] == '}' || text[end] == ']');
    bool at_end = e.byte + 1 >= text.size() || std::string(e.what()).find("end of input") !=
                                                   std::string::npos;
    std::string what = at_end && !closes
                           ? "truncated: the JSON ends early at byte " + std::to_string(e.byte)
                           : "not valid JSON at byte " + std::to_string(e.byte);
    throw InvalidArgument(origin + ": " + what + " (" + e.what() + ")");
  }
}

std::string read_text_file(const std::string& path, const std::string& origin) {
  std::ifstream in(path, std::ios::binary);
  SPILL_EXPECTS(in.good(), origin + ": cannot open it for reading");
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

}  // namespace spill::profiling

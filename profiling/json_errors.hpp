// Parses JSON read from a file and turns a parse failure into an InvalidArgument that names the
// file, the byte position, and whether the file looks truncated (the error is at its end and
// it does not end with a closing bracket) or is simply not valid JSON.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace spill::profiling {

nlohmann::json parse_json_file_text(const std::string& text, const std::string& origin);

// Reads a whole file; InvalidArgument naming it when it cannot be opened.
std::string read_text_file(const std::string& path, const std::string& origin);

}  // namespace spill::profiling

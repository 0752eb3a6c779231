// Helpers for the hostile-input tests (issue 11): seeded random mutations of valid inputs for
// the readers' fuzz tests (graph JSON, link JSON, trace JSON, configuration strings, sizes), and
// small checks of error messages. A fuzz test feeds mutations of known-good inputs to a reader
// and requires a clean outcome: a result, or a spill::Error whose message is not empty and stays
// short. Anything else (another exception type, a crash, a sanitizer report, a hang caught by
// ctest's timeout) fails. Deterministic for a seed; SPILL_FUZZ_ITERATIONS runs more.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "core/errors.hpp"

namespace spill::test {

// The message of the InvalidArgument that `f` throws (a test failure when it throws none).
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  ADD_FAILURE() << "no InvalidArgument: the input was accepted";
  return "";
}

inline void expect_mentions(const std::string& msg, std::initializer_list<const char*> parts) {
  for (const char* p : parts)
    EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
}

// `text` with the first `from` replaced by `to`.
inline std::string replaced(std::string text, const std::string& from, const std::string& to) {
  auto at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

// Tokens that break readers: numbers at and past every bound, odd JSON, separators.
inline const std::vector<std::string>& interesting_tokens() {
  static const std::vector<std::string> t{"-1",
                                          "0",
                                          "1",
                                          "-0",
                                          "1.5",
                                          "1e400",
                                          "-1e400",
                                          "1e-400",
                                          "18446744073709551615",
                                          "18446744073709551616",
                                          "9223372036854775807",
                                          "9223372036854775808",
                                          "-9223372036854775809",
                                          "4294967295",
                                          "4294967297",
                                          "2147483648",
                                          "1e19",
                                          "NaN",
                                          "\"\"",
                                          "\"x\"",
                                          "null",
                                          "true",
                                          "[]",
                                          "{}",
                                          "[[[[[[[[",
                                          "]]]]",
                                          "{\"a\":",
                                          ",",
                                          ":",
                                          "\"\\u0000\"",
                                          "\"\\ud800\"",
                                          "0x10",
                                          "TiB",
                                          "B",
                                          "9000000.5TiB",
                                          "8388608TiB",
                                          ".",
                                          "\xff\xfe",
                                          " ",
                                          "\n"};
  return t;
}

// One to four stacked edits of `in`: byte flips, insertions, deletions, duplications,
// truncation, and replacing a number with an interesting token.
inline std::string mutate(const std::string& in, std::mt19937_64& rng) {
  std::string s = in;
  auto pick = [&](std::size_t n) { return n == 0 ? 0 : static_cast<std::size_t>(rng() % n); };
  const auto& tokens = interesting_tokens();
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int k = 0; k < edits; ++k) {
    switch (rng() % 8) {
      case 0:  // flip a byte
        if (!s.empty()) s[pick(s.size())] ^= static_cast<char>(1 + rng() % 255);
        break;
      case 1:  // insert a token
        s.insert(pick(s.size() + 1), tokens[pick(tokens.size())]);
        break;
      case 2: {  // delete a range
        std::size_t at = pick(s.size() + 1);
        s.erase(at, pick(16) + 1);
        break;
      }
      case 3: {  // duplicate a range
        std::size_t at = pick(s.size() + 1), n = pick(64) + 1;
        s.insert(pick(s.size() + 1), s.substr(at, n));
        break;
      }
      case 4:  // truncate
        s.resize(pick(s.size() + 1));
        break;
      default: {  // replace a number (the most likely way past a range check)
        std::vector<std::size_t> starts;
        for (std::size_t i = 0; i < s.size(); ++i)
          if ((s[i] >= '0' && s[i] <= '9') && (i == 0 || !(s[i - 1] >= '0' && s[i - 1] <= '9')))
            starts.push_back(i);
        if (starts.empty()) break;
        std::size_t at = starts[pick(starts.size())], end = at;
        while (end < s.size() && ((s[end] >= '0' && s[end] <= '9') || s[end] == '.')) ++end;
        s.replace(at, end - at, tokens[pick(tokens.size())]);
        break;
      }
    }
  }
  return s;
}

struct FuzzCounts {
  int runs = 0, accepted = 0, rejected = 0;
};

// Runs `read` on mutations of `seeds` (`iterations` of them, fewer if `seconds` pass first).
inline FuzzCounts fuzz_reader(const std::vector<std::string>& seeds, std::uint64_t seed,
                              int iterations, double seconds,
                              const std::function<void(const std::string&)>& read) {
  if (const char* env = std::getenv("SPILL_FUZZ_ITERATIONS")) {
    iterations = std::atoi(env);
    seconds = 1e9;
  }
  std::mt19937_64 rng(seed);
  FuzzCounts c;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iterations; ++i) {
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > seconds)
      break;
    const std::string input = mutate(seeds[rng() % seeds.size()], rng);
    ++c.runs;
    try {
      read(input);
      ++c.accepted;
    } catch (const Error& e) {
      ++c.rejected;
      const std::string msg = e.what();
      if (msg.empty() || msg.size() > 2000) {
        ADD_FAILURE() << "seed " << seed << " iteration " << i << ": message of " << msg.size()
                      << " characters: " << excerpt(msg, 300) << "\ninput: " << excerpt(input, 300);
        return c;
      }
    } catch (const std::exception& e) {
      ADD_FAILURE() << "seed " << seed << " iteration " << i << ": not a spill::Error: " << e.what()
                    << "\ninput: " << excerpt(input, 300);
      return c;
    }
  }
  return c;
}

}  // namespace spill::test

// Error messages: what the command line shows a person who gave bad input.
#include <gtest/gtest.h>

#include "core/errors.hpp"

namespace spill {
namespace {

TEST(ErrorMessages, TheSourceLocationComesOffTheEndOnly) {
  try {
    SPILL_EXPECTS(false, "--budget: must be above zero");
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("[test_errors.cpp:"), std::string::npos) << e.what();
    EXPECT_EQ(without_source_location(e.what()), "--budget: must be above zero");
  }
  EXPECT_EQ(without_source_location("a [x.cpp:1] b [y.cu:22]"), "a [x.cpp:1] b");
  // Brackets that are not a source location stay: the user's own text may end in one.
  for (const char* kept : {"batch [1, 64]", "file 'a [b.cpp:1]'", "bad [dir/x.cpp:3]",
                           "odd [x.cpp:]", "odd [x.cpp:1a]", "odd [x.py:1]", "]", "", " [",
                           "[x.cpp:1]"})
    EXPECT_EQ(without_source_location(kept), kept);
}

// Text added to a located message goes before its location, which stays last (audit 41a #4:
// spill_set_budget's residency report followed "[allocator_budget.cpp:81]", where callers that
// cut a trailing location missed it).
TEST(ErrorMessages, TextAddedToALocatedMessageGoesBeforeTheLocation) {
  EXPECT_EQ(with_more("budget stays [allocator_budget.cpp:81]", "; pinned 16 MiB"),
            "budget stays; pinned 16 MiB [allocator_budget.cpp:81]");
  EXPECT_EQ(with_more("no location", "; more"), "no location; more");
  EXPECT_EQ(with_more("batch [1, 64]", "\nnote"), "batch [1, 64]\nnote");
  EXPECT_EQ(without_source_location(with_more("a [x.cpp:1]", " b")), "a b");
}

// A file name's control characters are shown, not obeyed, by the terminal that prints the
// message (audit 37b L8: an ESC sequence in a name recoloured the error).
TEST(ErrorMessages, ControlCharactersArePrintedAsEscapes) {
  EXPECT_EQ(printable("trace '\x1b[31mred.json': missing"), "trace '\\x1b[31mred.json': missing");
  EXPECT_EQ(printable("a\rb\x7f\x01"), "a\\x0db\\x7f\\x01");
  EXPECT_EQ(printable("line one\n\tline two"), "line one\n\tline two");
  EXPECT_EQ(printable("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x99\x82"),
            "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x99\x82") << "UTF-8 stays";
  // 8-bit controls: a lone 0x9b (CSI on a terminal not in UTF-8 mode) and U+009B in UTF-8.
  EXPECT_EQ(printable("a\x9b" "31m b\xc2\x9b" "1m c\xff\x80\x80"),
            "a\\x9b31m b\\xc2\\x9b1m c\\xff\\x80\\x80");
}

// A name printed inside a line of spill's output (a file name, an op's name read from a graph)
// escapes newlines and tabs too: a name cannot forge a line.
TEST(ErrorMessages, NamesEscapeNewlinesToo) {
  EXPECT_EQ(printable_name("out\x1b[31m\nFORGED\t.json"), "out\\x1b[31m\\x0aFORGED\\x09.json");
  EXPECT_EQ(printable_name("caf\xc3\xa9 \xc2\x9b"), "caf\xc3\xa9 \\xc2\\x9b");
  EXPECT_EQ(printable_name("plain name.json"), "plain name.json");
}

}  // namespace
}  // namespace spill

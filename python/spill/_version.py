# The package's version; the library it loads must be the same (checked on load). Keep it equal
# to project(spill VERSION ...) in CMakeLists.txt.
__version__ = "0.2.0"

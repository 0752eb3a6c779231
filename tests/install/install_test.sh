#!/bin/sh
# Installs the build into a fresh prefix under the build folder, checks the installed tree
# (public header only, versioned library with a SONAME, no libcuda, no RPATH into the build
# tree), then builds the C consumer against it both ways (CMake find_package and pkg-config)
# and runs it, and imports the installed Python package without SPILL_LIBRARY.
# Usage: install_test.sh BUILD_DIR SOURCE_DIR VERSION SOVERSION PYTHON
set -eu
build=$1 src=$2 version=$3 soversion=$4 python=$5
work=$build/install_test
prefix=$work/prefix
rm -rf "$work"
mkdir -p "$work"

fail() { echo "FAIL: $*"; exit 1; }
step() { echo "== $*"; }
# The tools it runs besides cmake, each named with the Debian package that has it.
need() { command -v "$1" >/dev/null 2>&1 || fail "$1 is missing (Debian: $2; scripts/setup.sh installs it)"; }
need pkg-config pkgconf
need ninja ninja-build
need readelf binutils
need cc gcc

step "cmake --install into $prefix"
cmake --install "$build" --prefix "$prefix" >"$work/install.log" || { cat "$work/install.log"; fail "cmake --install"; }

step "installed tree"
headers=$(cd "$prefix/include" && find . -type f | sort)
[ "$headers" = "./spill/spill.h" ] || fail "expected include/spill/spill.h only, found: $headers"
lib=$prefix/lib/libspill.so.$version
[ -f "$lib" ] || fail "no $lib"
[ "$(readlink "$prefix/lib/libspill.so")" = "libspill.so.$soversion" ] || fail "libspill.so is not a link to libspill.so.$soversion"
readelf -d "$lib" | grep -q "SONAME.*\[libspill.so.$soversion\]" || fail "SONAME of $lib is not libspill.so.$soversion"
train=$prefix/lib/libspill_train.so.$version
[ -f "$train" ] || fail "no $train (the spill command needs it)"
"$src/tests/check_no_libcuda.sh" "$lib" "$train" "$prefix/bin/spill"
for f in "$lib" "$train" "$prefix/bin/spill"; do
  if readelf -d "$f" | grep -E 'R(UN)?PATH' | grep -q "$build"; then
    fail "$f keeps an RPATH into the build tree: $(readelf -d "$f" | grep -E 'R(UN)?PATH')"
  fi
done
for f in lib/cmake/spill/spillConfig.cmake lib/cmake/spill/spillConfigVersion.cmake \
         lib/cmake/spill/spillTargets.cmake lib/pkgconfig/spill.pc \
         lib/python3/dist-packages/spill/__init__.py lib/python3/dist-packages/spill/_install.py; do
  [ -f "$prefix/$f" ] || fail "missing $f"
done
"$prefix/bin/spill" --conf device:sim info >"$work/cli.log" 2>&1 || { cat "$work/cli.log"; fail "installed spill command"; }

step "C consumer through find_package(spill $version)"
cmake -S "$src/tests/install/consumer" -B "$work/cmake-consumer" -G Ninja \
  -DCMAKE_PREFIX_PATH="$prefix" -DSPILL_EXPECTED_VERSION="$version" >"$work/consumer-configure.log" 2>&1 ||
  { cat "$work/consumer-configure.log"; fail "configuring the consumer"; }
cmake --build "$work/cmake-consumer" >"$work/consumer-build.log" 2>&1 ||
  { cat "$work/consumer-build.log"; fail "building the consumer"; }
"$work/cmake-consumer/consumer" "$version"

step "find_package(spill COMPONENTS static) says why it fails"
mkdir -p "$work/components"
printf 'cmake_minimum_required(VERSION 3.20)\nproject(components C)\nfind_package(spill REQUIRED COMPONENTS static)\n' \
  >"$work/components/CMakeLists.txt"
if cmake -S "$work/components" -B "$work/components/build" -DCMAKE_PREFIX_PATH="$prefix" \
     >"$work/components.log" 2>&1; then
  fail "find_package(spill REQUIRED COMPONENTS static) succeeded"
fi
grep -q "spill has no component 'static'" "$work/components.log" ||
  { cat "$work/components.log"; fail "find_package with a component does not say spill has none"; }

step "C consumer through pkg-config"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
[ "$(pkg-config --modversion spill)" = "$version" ] || fail "pkg-config --modversion spill: $(pkg-config --modversion spill)"
flags=$(pkg-config --cflags --libs spill)
echo "pkg-config --cflags --libs spill: $flags"
# shellcheck disable=SC2086
cc -std=c11 -Wall -Wextra -Werror -pedantic "$src/tests/install/consumer/consumer.c" $flags \
  -o "$work/consumer-pc"
LD_LIBRARY_PATH="$prefix/lib" "$work/consumer-pc" "$version"

step "installed Python package"
env -u SPILL_LIBRARY -u SPILL_BUILD_DIR PYTHONPATH="$prefix/lib/python3/dist-packages" \
  "$python" -c "
import os, sys, spill
path = os.path.realpath(spill.library_path())
assert path == os.path.realpath(sys.argv[1]), (path, sys.argv[1])
assert spill.version == sys.argv[2], spill.version
print('python: spill', spill.version, 'from', path)
spill.configure('device:sim,sim_capacity:256MiB,budget:64MiB')
p = spill.malloc(4 << 20)
spill.snapshot(sys.argv[3])
spill.free(p)
" "$lib" "$version" "$work/snap.json"

step "installed spill-snapshot-to-pickle"
"$prefix/bin/spill-snapshot-to-pickle" "$work/snap.json" "$work/snap.pickle" ||
  fail "spill-snapshot-to-pickle on a snapshot of the installed package"
"$python" -c "
import pickle, sys
d = pickle.load(open(sys.argv[1], 'rb'))
assert set(d) == {'segments', 'device_traces'} and d['segments'], d
print('pickle of', len(d['segments']), 'segments')
" "$work/snap.pickle" || fail "the pickle spill-snapshot-to-pickle wrote"
echo "install test passed"

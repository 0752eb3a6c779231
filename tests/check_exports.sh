#!/bin/sh
# Usage: check_exports.sh [--c-api LIB] LIB...
# Each LIB fails when it exports a strong symbol that is not spill's own: a C API function
# (spill_*) or something in namespace spill (its typeinfo and vtables included). Weak symbols
# (inline functions and templates instantiated from the standard headers) are every C++
# library's; a strong std:: symbol means a static libstdc++ (or another archive) is exported,
# which code loaded later in the process would bind to (CMakeLists.txt:
# spill_keep_archives_private).
# A library after --c-api (libspill.so) fails when it exports anything but the C API, weak
# symbols included: a user's own `spill::parse_size`, or another library's copy of a
# nlohmann/boost/std template, must never bind to spill's (cmake/libspill.map).
status=0
linker_symbols='^(_init|_fini|_edata|_end|__bss_start)$'
if [ "${1-}" = "--c-api" ]; then
  lib=$2
  shift 2
  foreign=$(nm -D --defined-only "$lib" | awk '{print $3}' | grep -v -E '^spill_' |
            grep -v -E "$linker_symbols")
  count=$(nm -D --defined-only "$lib" | awk '{print $3}' | grep -c -E '^spill_')
  if [ -n "$foreign" ]; then
    echo "FAIL: $lib exports $(echo "$foreign" | wc -l) symbols besides the C API, e.g.:"
    echo "$foreign" | head -5 | c++filt
    status=1
  elif [ "$count" -lt 10 ]; then
    echo "FAIL: $lib exports only $count spill_* functions (the C API has more)"
    status=1
  else
    echo "ok: $lib exports the C API alone ($count spill_* symbols)"
  fi
fi
for lib in "$@"; do
  foreign=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRG]$/ {print $3}' |
            grep -v -E '^(spill_|_ZN5spill|_ZNK5spill|_Z(T[VIS]|Th[n0-9_]*|Tv[n0-9_]*)N?K?5spill)' |
            grep -v -E "$linker_symbols")
  if [ -n "$foreign" ]; then
    echo "FAIL: $lib exports $(echo "$foreign" | wc -l) symbols that are not spill's, e.g.:"
    echo "$foreign" | head -5 | c++filt
    status=1
  else
    echo "ok: $lib exports only spill's own strong symbols"
  fi
done
exit $status

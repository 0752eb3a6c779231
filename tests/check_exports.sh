#!/bin/sh
# Fails when a shared library exports a strong symbol that is not spill's own: a C API function
# (spill_*) or something in namespace spill (its typeinfo and vtables included). Weak symbols
# (inline functions and templates instantiated from the standard headers) are every C++
# library's; a strong std:: symbol means a static libstdc++ (or another archive) is exported,
# which code loaded later in the process would bind to (CMakeLists.txt:
# spill_keep_archives_private).
status=0
for lib in "$@"; do
  foreign=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRG]$/ {print $3}' |
            grep -v -E '^(spill_|_ZN5spill|_ZNK5spill|_Z(T[VIS]|Th[n0-9_]*|Tv[n0-9_]*)N?K?5spill)' |
            grep -v -E '^(_init|_fini|_edata|_end|__bss_start)$')
  if [ -n "$foreign" ]; then
    echo "FAIL: $lib exports $(echo "$foreign" | wc -l) symbols that are not spill's, e.g.:"
    echo "$foreign" | head -5 | c++filt
    status=1
  else
    echo "ok: $lib exports only spill's own strong symbols"
  fi
done
exit $status

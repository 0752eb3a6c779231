#!/bin/sh
# Runs `spill train ... --check` (the arguments after the binary) and passes when the budget was
# either refused up front (exit 2, before the header, the message naming the op or policy none's
# need) or trained bit-identically (exit 0). Anything else, above all a budget accepted and then
# out of memory in a step (exit 1), fails (audit 40a #1, #2).
spill=$1
shift
out=$("$spill" "$@" 2>&1)
rc=$?
printf '%s\n' "$out"
case $rc in
  0)
    printf '%s\n' "$out" | grep -q "check: bit-identical" || { echo "FAIL: trained but not checked"; exit 1; }
    echo "RESULT: trained" ;;
  2)
    printf '%s\n' "$out" | grep -q "^footprint:" && { echo "FAIL: refused after the header"; exit 1; }
    printf '%s\n' "$out" | grep -qE "cannot train in a budget of .*op |policy none cannot run .* its step maps" ||
      { echo "FAIL: refused without naming the op or the need"; exit 1; }
    echo "RESULT: refused up front" ;;
  *)
    echo "FAIL: exit $rc"; exit 1 ;;
esac

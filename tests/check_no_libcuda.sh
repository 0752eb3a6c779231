#!/bin/sh
# Fails when any given binary has libcuda.so as a direct dependency.
status=0
for bin in "$@"; do
  if readelf -d "$bin" | grep -q 'NEEDED.*libcuda\.so'; then
    echo "FAIL: $bin links libcuda directly"
    status=1
  else
    echo "ok: $bin does not link libcuda"
  fi
done
exit $status

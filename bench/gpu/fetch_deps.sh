#!/usr/bin/env bash
# Run HERE (the Debian dev machine), not on the GPU machine: downloads the Debian packages the
# build needs (test/benchmark libraries and header-only libraries) into .gpu-deps/, which is
# git-ignored, so that a device call can carry them: run(carry=[".gpu-deps"], ...). The GPU
# machine has CMake, ninja and nvcc but no Debian package access.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$root/.gpu-deps"
cd "$root/.gpu-deps"
rm -f ./*.deb
apt-get download libgtest-dev libgmock-dev libbenchmark-dev libbenchmark1debian \
  libboost1.74-dev nlohmann-json3-dev libcli11-dev \
  libopenblas-pthread-dev libopenblas0-pthread libgfortran5 libquadmath0 >/dev/null
ls -1 "$root/.gpu-deps"
du -sh "$root/.gpu-deps"

#!/usr/bin/env bash
# Installs what spill needs on a fresh Debian machine with the CUDA toolkit in /usr/local/cuda.
# As root it runs apt-get; otherwise it prints the exact command to run and fails.
# chromium is for the test that renders `spill report` pages headless; libopenblas-dev for the
# trainer's CPU kernels (libspill_train).
# python3-pytest and python3-numpy for tests/python, pkgconf for the install test;
# python3-torch and python3-torchvision for the spill.torch.capture tests (tests/python).
# Usage: scripts/setup.sh [extra-debian-package ...]
set -euo pipefail

packages=(cmake ninja-build g++ libgtest-dev libgmock-dev libbenchmark-dev libboost-dev
          nlohmann-json3-dev libcli11-dev chromium libopenblas-dev
          python3-pytest python3-numpy pkgconf python3-torch python3-torchvision "$@")
# spill.torch: libtorch-dev for the PyTorch shims (CMake finds Torch).
packages+=(libtorch-dev)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages; run:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

if [[ ! -x /usr/local/cuda/bin/nvcc ]] && ! command -v nvcc >/dev/null; then
  echo "setup: the CUDA toolkit (nvcc) was not found in /usr/local/cuda/bin or on PATH." >&2
  echo "  spill compiles its CUDA sources even on machines without a GPU; install the toolkit." >&2
  exit 1
fi

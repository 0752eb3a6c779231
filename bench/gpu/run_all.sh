#!/usr/bin/env bash
# The GPU suite, for a machine with a GPU: builds spill for the GPU, runs every test (GPU ones
# included), `spill info`, `spill device-check` on CUDA, gpt-medium at a third of its footprint
# against no budget (bench/gpu/train_gpt_medium.sh) and every benchmark, all within about
# 9 minutes. Results go to $OUT when set (else build/gpu-results): summary.txt (the table
# printed last), ctest.xml, bench.json (every benchmark's JSON, merged), link.json (`spill bench
# link`, which the planner reads as a measured link model) and logs.tar.gz.
# Dependencies: if the machine lacks the Debian -dev packages, carry .gpu-deps/ (made by
# bench/gpu/fetch_deps.sh on the dev machine); they are unpacked under the build folder.
# Environment: SPILL_CUDA_ARCH (default 90), SPILL_GPU_BUDGET_S (default 530 seconds),
# SPILL_GPU_ONLY (run only the steps whose names match; the whole list rarely fits the budget).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-$root/build/gpu-results}
build=$root/build-gpu
work=$build/results
mkdir -p "$out" "$work"
rm -f "$work"/*
deadline=$(($(date +%s) + ${SPILL_GPU_BUDGET_S:-530}))
rows=()
failed=0

# step NAME LIMIT_S COMMAND...: runs with a time limit (capped by what is left), logs to
# $work/NAME.log and adds a row to the summary. SPILL_GPU_ONLY (an extended regex over step
# names, e.g. 'configure|build|torch') runs only the steps it matches.
step() {
  local name=$1 limit=$2
  shift 2
  local start left rc status
  if [[ -n ${SPILL_GPU_ONLY:-} ]] && ! [[ $name =~ ^(${SPILL_GPU_ONLY}) ]]; then
    rows+=("$name|not selected (SPILL_GPU_ONLY)|0")
    return 0
  fi
  start=$(date +%s)
  left=$((deadline - start))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    rows+=("$name|not run: out of time|0")
    failed=1
    return 1
  fi
  timeout "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124) status="timed out after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  ((rc != 0)) && failed=1
  rows+=("$name|$status|$(($(date +%s) - start))")
  return $rc
}

cmake_args=()
if [[ -d $root/.gpu-deps ]] &&
  ! [[ -f /usr/include/gtest/gtest.h && -d /usr/include/x86_64-linux-gnu/openblas-pthread ]]; then
  deps=$build/deps
  mkdir -p "$deps"
  for f in "$root"/.gpu-deps/*.deb; do dpkg-deb -x "$f" "$deps"; done
  cmake_args+=("-DCMAKE_PREFIX_PATH=$deps/usr" "-DCMAKE_INCLUDE_PATH=$deps/usr/include"
               "-DCMAKE_CXX_FLAGS=-isystem $deps/usr/include")
  export LD_LIBRARY_PATH=$deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
fi

# The Python tests need an interpreter with pytest. SPILL_PYTHON chooses one; otherwise the one
# with pytest that also has CuPy and torch wins (the GPU machine's own Python, not Debian's).
has_module() { "$1" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$2') is None)" 2>/dev/null; }
pick_python() {
  local best="" best_score=-1 candidate py score
  for candidate in ${SPILL_PYTHON:-python3 python /usr/bin/python3 /usr/local/bin/python3}; do
    py=$(command -v "$candidate" 2>/dev/null) || continue
    has_module "$py" pytest || continue
    score=0
    has_module "$py" cupy && score=$((score + 2))
    has_module "$py" torch && score=$((score + 1))
    if ((score > best_score)); then best=$py best_score=$score; fi
  done
  echo "$best"
}
python=$(pick_python)
if [[ -n $python ]]; then
  python_line="python: $python ($("$python" -c 'import sys; print(sys.version.split()[0])'); \
$(for m in pytest torch cupy numpy; do has_module "$python" $m && printf '%s ' $m; done)found)"
  cmake_args+=("-DSPILL_PYTHON=$python")
  # cuDNN from PyTorch's nvidia-cudnn wheel when the CUDA toolkit has none.
  cudnn_root=$("$python" -c 'import nvidia.cudnn as m; print(list(m.__path__)[0])' 2>/dev/null)
  if [[ -n $cudnn_root && -f $cudnn_root/include/cudnn.h ]]; then
    cmake_args+=("-DSPILL_CUDNN_ROOT=$cudnn_root")
  fi
else
  python_line="python: none with pytest found (tried ${SPILL_PYTHON:-python3 python /usr/bin/python3 /usr/local/bin/python3}): Python tests skip"
fi
echo "$python_line"

step configure 120 cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="${SPILL_CUDA_ARCH:-90}" "${cmake_args[@]}" &&
  step build 300 cmake --build "$build" -j "$(nproc)"
built=$?

if ((built == 0)); then
  step info 30 "$build/spill" info
  step device-check 120 "$build/spill" --conf device:cuda device-check
  step bench-link 180 "$build/spill" --conf device:cuda bench link --json "$work/link.json"
  step tests 240 ctest --test-dir "$build" --output-on-failure -j 4 --output-junit "$work/ctest.xml"
  # spill as CuPy's allocator on the GPU (also part of `tests`; its own row says whether it ran).
  if [[ -n $python ]]; then
    step python-cupy 120 env SPILL_LIBRARY="$build/libspill.so" PYTHONPATH="$root/python" \
      "$python" -m pytest -v -rs -p no:cacheprovider "$root/tests/python/test_cupy_gpu.py"
    if grep -q "SKIPPED" "$work/python-cupy.log" && ! grep -q "PASSED" "$work/python-cupy.log"; then
      rows[-1]="python-cupy|skipped: $(grep -m1 '^SKIPPED \[' "$work/python-cupy.log" | sed 's/.*[0-9]: //' | cut -c1-40)|0"
    fi
  else
    rows+=("python-cupy|not run: no python with pytest|0")
  fi
  step train-gpt-medium 180 "$root/bench/gpu/train_gpt_medium.sh" "$build/spill" "$work"
  # spill.torch on CUDA (a CUDA torch is needed; pip's is fine; the shims are compiled at first
  # use into the build folder): the CPU-bridge tests with the CUDA target, then GPT-2 medium at
  # a third of its footprint beside save_on_cpu and activation checkpointing.
  if [[ -n $python ]] && "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    torch_env=(env SPILL_LIBRARY="$build/libspill.so" PYTHONPATH="$root/python"
               SPILL_TORCH_TARGET=cuda SPILL_TORCH_BUILD_DIR="$build/torch-ext")
    step torch-tests 240 "${torch_env[@]}" "$python" -m pytest -v -rs -p no:cacheprovider \
      "$root/tests/python/test_torch_bridge.py"
    step torch-gpt2-medium 240 "${torch_env[@]}" "$python" "$root/bench/gpu/bench_torch_gpt2.py" \
      --steps 5 --json "$work/bench_torch_gpt2.json"
  else
    rows+=("torch|skipped: no CUDA torch|0")
  fi
  for bench in "$build"/bench/bench_*; do
    [[ -x $bench ]] || continue
    name=$(basename "$bench")
    step "$name" 120 "$bench" --benchmark_out="$work/$name.json" --benchmark_out_format=json \
      --benchmark_min_time=0.1
  done
fi

{
  echo "spill GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
    echo "(nvidia-smi not available)"
  echo "$python_line"
  printf '%-28s %-28s %8s\n' step status seconds
  for row in "${rows[@]}"; do
    IFS='|' read -r n s t <<<"$row"
    printf '%-28s %-28s %8s\n' "$n" "$s" "$t"
  done
  if [[ -f $work/tests.log ]]; then grep -E 'tests passed|tests failed' "$work/tests.log"; fi
  if [[ -f $work/torch-tests.log ]]; then tail -n 1 "$work/torch-tests.log"; fi
  if [[ -f $work/torch-gpt2-medium.log ]]; then
    grep -E '^(GPT-2|case|unlimited|spill|save_on_cpu|checkpoint)' "$work/torch-gpt2-medium.log"
  fi
  if [[ -f $work/train-gpt-medium.log ]]; then
    grep -E '^(device|step time|predicted)' "$work/train-gpt-medium.log"
  fi
} >"$work/summary.txt"

python3 - "$work" "$out/bench.json" <<'PY' 2>/dev/null || true
import json, pathlib, sys
work, dest = pathlib.Path(sys.argv[1]), sys.argv[2]
merged = {}
for f in sorted(work.glob("bench_*.json")):
    try:
        merged[f.stem] = json.loads(f.read_text())
    except ValueError as e:
        merged[f.stem] = {"error": str(e)}
pathlib.Path(dest).write_text(json.dumps(merged, indent=1))
PY
[[ -f $work/ctest.xml ]] && cp "$work/ctest.xml" "$out/"
[[ -f $work/link.json ]] && cp "$work/link.json" "$out/"
for f in "$work"/train_*.json; do [[ -f $f ]] && cp "$f" "$out/"; done
tar -czf "$out/logs.tar.gz" -C "$work" $(cd "$work" && ls *.log 2>/dev/null) 2>/dev/null
cp "$work/summary.txt" "$out/summary.txt"
cat "$work/summary.txt"
exit $failed

#!/usr/bin/env bash
# The GPU suite, for a machine with a GPU: builds spill for the GPU, runs the tests (those that
# touch CUDA first, then the rest), `spill info`, `spill device-check` on CUDA, `spill bench
# link`, gpt-medium at a third of its footprint against no budget (train_gpt_medium.sh),
# every benchmark program and spill.torch on CUDA, in that order, within SPILL_GPU_BUDGET_S.
# Results go to $OUT when set (else build/gpu-results): summary.txt (the table printed last),
# ctest-gpu.xml and ctest.xml, bench.json (every benchmark's JSON, merged), link.json (`spill
# bench link`, which the planner reads as a measured link model), train_*.json and logs.tar.gz
# (every step's log, the trainer's traces and env.log: driver, toolkit, compiler, torch,
# cuDNN): 8 files at most, what a device call brings back.
# Dependencies: if the machine lacks the Debian -dev packages, carry .gpu-deps/ (made by
# bench/gpu/fetch_deps.sh on the dev machine); they are unpacked under the build folder.
# Environment: SPILL_CUDA_ARCH (default 90), SPILL_GPU_BUDGET_S (seconds for the whole call,
# default 300: two calls of about 5.5 minutes plus two machine starts fit a 15-minute lease),
# SPILL_GPU_ONLY (run only the steps whose names match; the whole list rarely fits the budget).
# A call that selects `build` on a machine without a configured build-gpu/ configures it first,
# and builds only the command line and libraries when no test or benchmark step is selected.
# A failed step never stops the later ones; summary.txt ends with the tail of each failed
# step's log and the names of failed tests.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-$root/build/gpu-results}
build=$root/build-gpu
work=$build/results
mkdir -p "$out" "$work"
rm -f "$work"/*
deadline=$(($(date +%s) + ${SPILL_GPU_BUDGET_S:-300}))
rows=()
failed=0
failed_steps=()

# selected NAME: whether SPILL_GPU_ONLY (if set) selects step NAME.
selected() { [[ -z ${SPILL_GPU_ONLY:-} || $1 =~ ^(${SPILL_GPU_ONLY}) ]]; }

# step NAME LIMIT_S COMMAND...: runs with a time limit (capped by what is left), logs to
# $work/NAME.log and adds a row to the summary. SPILL_GPU_ONLY (an extended regex over step
# names, e.g. 'configure|build|torch') runs only the steps it matches.
step() {
  local name=$1 limit=$2
  shift 2
  local start left rc status
  if ! selected "$name"; then
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
  echo "== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  timeout -k 10 "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  if ((rc != 0)); then
    failed=1
    failed_steps+=("$name")
  fi
  rows+=("$name|$status|$(($(date +%s) - start))")
  return $rc
}

cmake_args=()
# CMake 4 (pip's, say) refuses package files that declare compatibility with CMake < 3.5; some
# carried Debian packages may; CMake 3 ignores the setting.
cmake_args+=("-DCMAKE_POLICY_VERSION_MINIMUM=3.5")
# nvcc where CMakeLists.txt does not look (it takes /usr/local/cuda's, else PATH's).
if ! command -v nvcc >/dev/null 2>&1 && ! [[ -x /usr/local/cuda/bin/nvcc ]]; then
  for candidate in /usr/local/cuda-*/bin/nvcc /opt/cuda/bin/nvcc /usr/lib/cuda/bin/nvcc; do
    if [[ -x $candidate ]]; then
      cmake_args+=("-DCMAKE_CUDA_COMPILER=$candidate")
      break
    fi
  done
fi
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
    # libcudnn.so.9 loads its sub-libraries (ops, cnn, engines) by name at run time.
    export LD_LIBRARY_PATH=$cudnn_root/lib:${LD_LIBRARY_PATH:-}
  fi
else
  python_line="python: none with pytest found (tried ${SPILL_PYTHON:-python3 python /usr/bin/python3 /usr/local/bin/python3}): Python tests skip"
fi
echo "$python_line"

# What the machine has, for the first runs on a new one (settles what the desk check could not).
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); $(nproc) cores; SPILL_GPU_ONLY='${SPILL_GPU_ONLY:-}'"
  nvidia-smi 2>&1 | head -20
  for tool in nvcc cmake ninja g++ dpkg-deb; do
    printf '%s: %s\n' "$tool" "$("$tool" --version 2>&1 | grep -m1 -iE 'release|version|[0-9]+\.[0-9]+' || echo missing)"
  done
  echo "$python_line"
  echo "toolkit libraries: $(ls /usr/local/cuda/lib64 2>/dev/null | grep -E '^lib(cublas|cudart|cudnn)\.so' | tr '\n' ' ')"
  echo "cuDNN root (nvidia.cudnn wheel): ${cudnn_root:-none}"
  ls "${cudnn_root:-/nonexistent}/lib" 2>/dev/null | head -20
  [[ -n $python ]] && "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.is_available())' 2>&1
  echo "CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-unset} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} >"$work/env.log" 2>&1

# A fresh machine has no build-gpu/: `build` configures it even when `configure` is not selected.
# Without a test or benchmark step, only the command line and the libraries are built.
configure_cmd=(cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
               -DCMAKE_CUDA_ARCHITECTURES="${SPILL_CUDA_ARCH:-90}" "${cmake_args[@]}")
build_cmd=(cmake --build "$build" -j "$(nproc)")
# The test programs and the benchmarks are built only when a step that runs them is selected
# (by name: 'tests-gpu' alone once built only the command line, and every test "failed" as not
# found; a benchmark is selected by a pattern that names bench_).
if ! selected tests-gpu && ! selected tests-rest &&
  ! [[ -z ${SPILL_GPU_ONLY:-} || ${SPILL_GPU_ONLY} == *bench_* ]]; then
  build_cmd+=(--target spill-cli spill)
fi
if selected build && ! selected configure && ! [[ -f $build/CMakeCache.txt ]]; then
  SPILL_GPU_ONLY="${SPILL_GPU_ONLY}|configure" step configure 120 "${configure_cmd[@]}"
else
  step configure 120 "${configure_cmd[@]}"
fi && step build 300 "${build_cmd[@]}"
built=$?
if [[ -f $work/configure.log ]] && grep -q "cuDNN not found" "$work/configure.log"; then
  rows+=("cudnn|not found: GPU conv/bn/pool off|0")
fi

if ((built == 0)); then
  step info 30 "$build/spill" info
  step device-check 60 "$build/spill" --conf device:cuda device-check
  # Sizes up to 64 MiB (enough for the planner's fit of latency and bandwidth), in seconds.
  step bench-link 90 "$build/spill" --conf device:cuda bench link --quick --json "$work/link.json"
  # The tests that touch CUDA first, in a step of their own (the rest ran in CI on the
  # simulated device): a slow or hung one then cannot hide the others' results. A step cut
  # short keeps the results ctest printed so far (the summary lists the failures).
  gpu_tests='cuda|Cuda|Gpu|gpu|Select\.|PatternKernels'
  step tests-gpu 150 ctest --test-dir "$build" --output-on-failure -j 8 -R "$gpu_tests" \
    --output-junit "$work/ctest-gpu.xml"
  # The trainer on the GPU, each model checked bit for bit against the same steps with no
  # budget (cuBLAS, cuDNN for the CNN, spill's kernels, swapping by the graph plan and by the
  # swapper's recorded plan with op times measured on the device). Each run's trace goes into
  # logs.tar.gz: on the H200 (2026-12-04) these small models' measured steps at a third were
  # 2-8 times their predicted ones (mlp 27 ms against 3 ms), and the step table alone does not
  # say where the time went.
  step tests-train 150 bash -c 'rc=0; for m in mlp cnn gpt-mini; do "$1" --conf device:cuda \
    train "$m" --check --steps 4 --trace "$2/trace_$m.json" --json "$2/train_$m.json" || rc=1
    done
    "$1" --conf device:cuda train gpt-mini --policy plan --check --steps 4 \
    --trace "$2/trace_gpt-mini_plan.json" --json "$2/train_gpt-mini_plan.json" || rc=1
    exit $rc' _ "$build/spill" "$work"
  # doc_examples among them runs the documentation's GPU blocks with this Python (docs/pytorch.md's
  # CUDA quick start, which compiles the CUDA shim into torch's extension cache; docs/python.md's
  # CuPy block where CuPy is installed); on the CPU build machine they skip.
  # Not the CPU bridge's torch suites (python_torch_*): the torch steps below run those tests
  # on CUDA; on the CPU bridge they are CI's (torch 1.13), and under this machine's torch 2
  # they would meet bridge-only paths no user takes (torch 2's torch.save reads CPU storages
  # without the pinned copy the bridge makes for 1.13) and outrun the step (audit 37a).
  step tests-rest 240 ctest --test-dir "$build" --output-on-failure -j 8 \
    -E "$gpu_tests|python_torch_" --output-junit "$work/ctest.xml"
  # spill as CuPy's allocator on the GPU (also part of tests-rest; its own row says whether it
  # ran).
  if [[ -n $python ]]; then
    step python-cupy 120 env SPILL_LIBRARY="$build/libspill.so" PYTHONPATH="$root/python" \
      "$python" -m pytest -v -rsP -p no:cacheprovider "$root/tests/python/test_cupy_gpu.py"  # (P: passing tests' output, the versions line)
    if [[ -f $work/python-cupy.log ]] && grep -q "SKIPPED" "$work/python-cupy.log" &&
      ! grep -q "PASSED" "$work/python-cupy.log"; then
      rows[-1]="python-cupy|skipped: $(grep -m1 '^SKIPPED \[' "$work/python-cupy.log" | sed 's/.*[0-9]: //' | cut -c1-40)|0"
    fi
  else
    rows+=("python-cupy|not run: no python with pytest|0")
  fi
  step train-gpt-medium 180 "$root/bench/gpu/train_gpt_medium.sh" "$build/spill" "$work"
  # The benchmarks before the torch steps: short, and bench_device's VMM call costs decide the
  # trainer's next change (a first call that selects it with the torch steps kept it).
  for bench in "$build"/bench/bench_*; do
    [[ -x $bench ]] || continue
    name=$(basename "$bench")
    step "$name" 120 "$bench" --benchmark_out="$work/$name.json" --benchmark_out_format=json \
      --benchmark_min_time=0.1
  done
  # spill.torch on CUDA (a CUDA torch is needed; pip's is fine; the shims are compiled at first
  # use into the build folder): the CPU-bridge tests with the CUDA target, then GPT-2 medium at
  # a third of its footprint beside save_on_cpu and activation checkpointing.
  if ! selected torch-internals && ! selected torch-cnn-repro && ! selected torch-tests &&
    ! selected torch-gpt2-medium; then
    rows+=("torch|not selected (SPILL_GPU_ONLY)|0")
  elif ! [[ -f $build/libspill.so ]]; then
    # A fresh machine with the torch steps selected but not `build`: every test would fail
    # on the missing library instead.
    rows+=("torch|no libspill.so: select build|0")
    failed=1
  elif [[ -n $python ]] && "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    # PYTHONFAULTHANDLER: a process that crashes (the cnn's training process did, exit -11
    # with no output, on 2026-12-04) prints every thread's Python stack to its stderr, which
    # the tests show.
    torch_env=(env SPILL_LIBRARY="$build/libspill.so" PYTHONPATH="$root/python"
               SPILL_TORCH_TARGET=cuda SPILL_TORCH_BUILD_DIR="$build/torch-ext"
               PYTHONFAULTHANDLER=1)
    # PyTorch takes its cuBLAS and cuBLASLt workspaces (32 MiB or more on Hopper) from the
    # allocator, unswappable: for the tests' small models (budgets of tens of MiB) they would
    # be most of the budget. The tests set small ones themselves (128 KiB each, small-pool
    # blocks: CUDA_WORKSPACES in test_torch_bridge.py); GPT-2 medium below keeps the defaults.
    # First the canaries of the torch internals spill.torch relies on (seconds): a torch that
    # changed one fails there, naming it, before the slower tests fail less clearly.
    step torch-internals 60 "${torch_env[@]}" "$python" -m pytest -v -rs -p no:cacheprovider \
      "$root/tests/python/test_torch_internals.py"
    # The cnn test's process died with SIGSEGV inside F.conv2d with spill as the allocator
    # (2026-12-04): each case of repro_torch_cnn.py in a process of its own (plain torch,
    # spill as the test ran it, one conv, cuDNN's non-deterministic algorithms, cuDNN off,
    # policy none, cuBLAS's default workspaces), then the first that
    # failed again under cuda-gdb for the native stack (the machine has no gdb). Reading the
    # symbols of torch's and cuDNN's libraries (gigabytes) could outlast the step, so gdb reads
    # none at first: the stack's addresses, then the libraries' address ranges, then the stack
    # again with the symbols of spill, c10 and libc only.
    step torch-cnn-repro 180 "${torch_env[@]}" bash -c '
      "$1" "$2" | tee "$3/cnn-repro.txt"
      first=$(sed -n "s/^failed: //p" "$3/cnn-repro.txt" | cut -d" " -f1)
      gdb=$(command -v cuda-gdb || ls /usr/local/cuda/bin/cuda-gdb 2>/dev/null)
      if [[ -n $first && $first != none && -n $gdb ]]; then
        echo "== $first under cuda-gdb"
        timeout 120 "$gdb" -q -batch -ex "set pagination off" -ex "set auto-solib-add off" \
          -ex run -ex bt -ex "info sharedlibrary" -ex "sharedlibrary libspill" \
          -ex "sharedlibrary libc10" -ex "sharedlibrary libc.so" -ex bt -ex "info threads" \
          --args "$1" "$2" "$first" 2>&1 | grep -v "^\[New Thread\|^\[Thread .* exited" |
          tail -n 150
      fi' _ "$python" "$root/bench/gpu/repro_torch_cnn.py" "$work"
    # About 50 Python processes, each importing a CUDA torch: spread over 8 workers where
    # pytest-xdist is installed (the GPU machine's image has it; each test is its own process
    # with its own budget, and 8 of them use a few GiB of the GPU's memory at most).
    xdist=()
    has_module "$python" xdist && xdist=(-n 8)
    # In two steps (both selected by 'torch-tests'): on 2026-12-04 the four files took 133 s
    # of one 240 s step; test_torch_bridge.py has grown since (43 to 71 tests, audit 34a),
    # and a step cut at its limit reports none of the tests it did not reach.
    step torch-tests 240 "${torch_env[@]}" \
      "$python" -m pytest -v -rs --durations=15 "${xdist[@]}" -p no:cacheprovider \
      "$root/tests/python/test_torch_bridge.py"
    step torch-tests-modules 180 "${torch_env[@]}" \
      "$python" -m pytest -v -rs --durations=15 "${xdist[@]}" -p no:cacheprovider \
      "$root/tests/python/test_torch_copies.py" "$root/tests/python/test_torch_foreach.py" \
      "$root/tests/python/test_torch_modules.py"
    step torch-gpt2-medium 240 "${torch_env[@]}" "$python" "$root/bench/gpu/bench_torch_gpt2.py" \
      --steps 5 --json "$work/bench_torch_gpt2.json"
  else
    rows+=("torch|skipped: no CUDA torch|0")
  fi
fi

{
  echo "spill GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
    echo "(nvidia-smi not available)"
  echo "$python_line"
  if [[ -f $work/info.log ]]; then head -n 12 "$work/info.log"; fi
  printf '%-28s %-28s %8s\n' step status seconds
  for row in "${rows[@]}"; do
    IFS='|' read -r n s t <<<"$row"
    printf '%-28s %-28s %8s\n' "$n" "$s" "$t"
  done
  if [[ -f $work/bench-link.log ]]; then
    grep -E '^(size|64\.00 MiB|data)' "$work/bench-link.log" | sed 's/^/bench-link: /'
  fi
  if [[ -f $work/device-check.log ]]; then
    grep -E 'GB/s|chunk:|busy:|FAIL|checks? failed' "$work/device-check.log" | sed 's/^ */device-check: /'
  fi
  for t in tests-gpu tests-rest; do
    [[ -f $work/$t.log ]] || continue
    echo "$t: $(grep -E 'tests passed|tests failed' "$work/$t.log" || echo 'no ctest total (cut short?)')"
    # Failed tests, also when the step was cut short before ctest's own list.
    grep -E '\*\*\*(Failed|Timeout|Exception)|\(Failed\)|\(Timeout\)' "$work/$t.log" | sed 's/^/  /' | head -40
  done
  # pytest -v's result per test, also when the step was cut short before pytest's own summary.
  for t in torch-internals torch-tests torch-tests-modules python-cupy; do
    [[ -f $work/$t.log ]] || continue
    # `path::test PASSED` serially, `[gw3] [ 40%] PASSED path::test` under pytest-xdist.
    echo "$t: $(grep -cE '::.* PASSED|PASSED [^ ]*::' "$work/$t.log") passed, \
$(grep -cE '::.* (FAILED|ERROR)|(FAILED|ERROR) [^ ]*::' "$work/$t.log") failed, \
$(grep -cE '::.* SKIPPED|SKIPPED [^ ]*::' "$work/$t.log") skipped; last line: \
$(tail -n 1 "$work/$t.log" | cut -c1-120)"
    grep -E '::.* (FAILED|ERROR)|(FAILED|ERROR) [^ ]*::' "$work/$t.log" |
      sed -E 's/ +\[ *[0-9]+%\]$//; s/^/  /' | head -40
  done
  if [[ -f $work/torch-cnn-repro.log ]]; then
    grep -E '^(plain_torch|spill[a-z_]*) +exit|^failed:|^Program received|^#[0-9]+ ' "$work/torch-cnn-repro.log" |
      head -n 40 | sed 's/^/torch-cnn-repro: /'
  fi
  if [[ -f $work/torch-gpt2-medium.log ]]; then
    grep -E '^(GPT-2|case|unlimited|spill|save_on_cpu|checkpoint|  spill step)' "$work/torch-gpt2-medium.log"
  fi
  if [[ -f $work/tests-train.log ]]; then
    grep -E "identical|differ|error" "$work/tests-train.log" | sed 's/^/tests-train: /' | head -8
    # Steps 3-4 of each run at a third against their prediction (on 2026-12-04 these small
    # models took 2-8 times it), the ops' own device time and the ops the host waited before.
    python3 - "$work" <<'PY' 2>/dev/null
import json, pathlib, sys
for name in ("mlp", "cnn", "gpt-mini", "gpt-mini_plan"):
    path = pathlib.Path(sys.argv[1]) / f"train_{name}.json"
    if not path.exists():
        continue
    doc = json.loads(path.read_text())
    steps = doc["steps"][2:]
    if not steps:
        continue
    mean = lambda key: sum(s.get(key, float("nan")) for s in steps) / len(steps)
    # Policies lru and plan have no prediction of their own (audit 40a #4): policy graph's.
    pred = ("predicted", mean("predicted_step_s")) if "predicted_step_s" in steps[0] else (
        "graph plan (for comparison)", doc.get("graph_plan_for_comparison", {}).get("step_s", float("nan")))
    print(f"tests-train: {name}: steps 3-4 {mean('step_s') * 1e3:.2f} ms, {pred[0]} "
          f"{pred[1] * 1e3:.2f} ms, ops {mean('ops_s') * 1e3:.2f} ms, host in "
          f"spill {mean('spill_s') * 1e3:.2f} ms, waited before {mean('op_waits'):.0f} ops")
PY
  fi
  if [[ -f $work/train-gpt-medium.log ]]; then
    grep -E '^(device|step time|predicted|floor|small-pool|split|  gaps)' "$work/train-gpt-medium.log"
  fi
  for name in "${failed_steps[@]}"; do
    echo "---- $name: last lines of $name.log"
    tail -n 25 "$work/$name.log" | cut -c1-300
  done
} >"$work/summary.txt"

ls "$work"/bench_*.json >/dev/null 2>&1 && python3 - "$work" "$out/bench.json" <<'PY' 2>/dev/null
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
# At most 8 files come back from a device call: summary.txt, logs.tar.gz and these.
for f in ctest-gpu.xml ctest.xml link.json train_unlimited.json train_third.json; do
  [[ -f $work/$f ]] && cp "$work/$f" "$out/"
done
tar -czf "$out/logs.tar.gz" -C "$work" $(cd "$work" && ls *.log trace_*.json train_*.json 2>/dev/null) 2>/dev/null
cp "$work/summary.txt" "$out/summary.txt"
cat "$work/summary.txt"
exit $failed

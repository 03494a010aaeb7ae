#!/usr/bin/env bash
# The CUDA backend's checks on a GPU machine, in one go (about 10 minutes on an H100/H200):
# build with the machine's torch/pybind11/scikit-build-core (no internet), the CUDA tests, the
# same tests under compute-sanitizer (memcheck; racecheck on the mask kernel), and the two
# --device cuda benchmarks. Logs go to $OUT (at most 8 files; summary.txt first).
#
#   bash scripts/gpu_check.sh prepare        # HERE, with internet: fetches the wheels the GPU
#                                            # image lacks into .whl/ (git-ignored via .git/info/exclude)
#   bash scripts/gpu_check.sh                # THERE: all stages
#   bash scripts/gpu_check.sh build test     # THERE: some stages (build test sanitize bench)
#
# Every stage is cut to fit GPU_CHECK_SECONDS (default 560) from the start, so one call stays
# inside the device tool's 600 s limit; a stage that does not fit is noted and skipped. All four
# stages take about 10 minutes, so on the device tool use two calls on the warm machine:
#   run(command="bash scripts/gpu_check.sh build test sanitize", carry=[".whl"], timeout_s=600)
#   run(command="bash scripts/gpu_check.sh bench", timeout_s=600)   # "build bench" if it went cold
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/rocketkit-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [[ "${1:-}" == "prepare" ]]; then
  grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  v=$("$PY" -c "import importlib.metadata as m; print(m.version('scipy-openblas32'))")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "scipy-openblas32==$v"
  ls -la .whl
  exit 0
fi

stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(build test sanitize bench)
want() { [[ " ${stages[*]} " == *" $1 "* ]]; }
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
status=0
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-560}))
# run NAME LOG TIMEOUT CMD...: runs CMD with a time limit (cut to the deadline), logs it, records
# pass/fail and seconds.
run() {
  local name=$1 log=$2 limit=$3
  shift 3
  local left=$((DEADLINE - SECONDS - 15))
  if [[ $left -lt 30 ]]; then
    note "$(printf '%-28s skipped: %ss left of GPU_CHECK_SECONDS' "$name" "$((DEADLINE - SECONDS))")"
    status=1
    return 1
  fi
  [[ $limit -gt $left ]] && limit=$left
  local t0=$SECONDS
  echo "\$ $*" >> "$log"
  timeout --signal=INT --kill-after=20 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  note "$(printf '%-28s rc=%-3s %4ss  (%s)' "$name" "$rc" "$((SECONDS - t0))" "$(basename "$log")")"
  [[ $rc -ne 0 ]] && status=1
  return $rc
}

{
  nvidia-smi
  "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version
  command -v compute-sanitizer
  "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|numpy|scipy|pybind11|scikit-build-core|cmake|ninja|pytest|nvidia-c)" || true
} > "$OUT/env.txt" 2>&1
note "rocketkit GPU check $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"

if want build; then
  if ! "$PY" -c "import scipy_openblas32" 2>/dev/null; then
    ls .whl/scipy_openblas32-*.whl >/dev/null 2>&1 ||
      { note "scipy-openblas32 is missing and no .whl/ was carried: run 'bash scripts/gpu_check.sh prepare' first"; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/scipy_openblas32-*.whl >> "$OUT/build.log" 2>&1
  fi
  # --no-deps: the image has torch & co. but not every runtime dependency (gguf, ...), and no internet.
  export ROCKETKIT_ENABLE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
  # The nvidia-* wheels' headers, if present, let CMake check our cuBLAS/cuSOLVER declarations.
  ROCKETKIT_CUDA_MATH_INCLUDE=$("$PY" -c "
import os, nvidia
subs = ('cu13/include', 'cu12/include', 'cublas/include', 'cusolver/include')
print(':'.join(os.path.join(p, s) for p in nvidia.__path__ for s in subs if os.path.isdir(os.path.join(p, s))))" 2>/dev/null)
  export ROCKETKIT_CUDA_MATH_INCLUDE
  run "build (pip install .)" "$OUT/build.log" 420 \
    "$PY" -m pip install -v --no-build-isolation --no-deps . || { note "build failed: see build.log"; exit 1; }
  (cd /tmp && "$PY" -c "import rocketkit, json; i = rocketkit.build_info(); print(json.dumps(i)); assert i['cuda_compiled'] and rocketkit.has_cuda()") \
    >> "$OUT/build.log" 2>&1 && note "import rocketkit: CUDA build, GPU visible" || { note "import check failed"; status=1; }
  so=$("$PY" -c "import rocketkit._C as c; print(c.__file__)" 2>/dev/null)
  [[ -n "$so" ]] && note "_C size $(du -h "$so" | cut -f1); linked: $(ldd "$so" | grep -cE 'cublas|cusolver') cuBLAS/cuSOLVER (0 = loaded at first use)"
  grep -E "rocketkit: (CUDA|cuBLAS|no cuBLAS)" "$OUT/build.log" | sed 's/^/  /' | tee -a "$SUMMARY"
fi

if want test; then
  run "tests (test_cuda, mckp cuda)" "$OUT/tests.log" 300 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py "tests/test_mckp.py::test_cuda_matches_cpu"
  tail -n 3 "$OUT/tests.log" | sed 's/^/  /' | tee -a "$SUMMARY"
fi

if want sanitize; then
  if command -v compute-sanitizer > /dev/null; then
    # Small shapes only: every kernel runs many times slower under the sanitizer.
    run "compute-sanitizer memcheck" "$OUT/memcheck.log" 420 \
      compute-sanitizer --tool memcheck --error-exitcode 99 --leak-check no \
      "$PY" -m pytest -q -p no:cacheprovider -x tests/test_cuda.py \
      -k "odd_shapes or every_candidate or ridge or rank_deficient or extreme or zero_layer or bad_inputs or mckp or column_sparse"
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -n 3 | sed 's/^/  /' | tee -a "$SUMMARY"
    run "compute-sanitizer racecheck" "$OUT/racecheck.log" 240 \
      compute-sanitizer --tool racecheck --error-exitcode 99 \
      "$PY" -m pytest -q -p no:cacheprovider -x tests/test_cuda.py -k "odd_shapes and (37-53 or 64-17)"
    grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -n 3 | sed 's/^/  /' | tee -a "$SUMMARY"
  else
    note "compute-sanitizer not found: sanitize stage skipped"
    status=1
  fi
fi

if want bench; then
  run "bench_mckp --device cuda" "$OUT/bench_mckp.log" 180 "$PY" benchmarks/bench_mckp.py --device cuda --repeats 3
  grep -E "^(Llama|stress)" "$OUT/bench_mckp.log" | sed 's/^/  /' | tee -a "$SUMMARY"
  run "bench_errors --device cuda" "$OUT/bench_errors.log" 540 \
    "$PY" benchmarks/bench_errors.py --device cuda --cpu-shape 1024x1024 \
    --shapes 8192x8192,8192x1024,28672x8192,8192x28672
  grep -E "^(== |rocketkit|  candidate|torch baseline|ratio|one 70B)" "$OUT/bench_errors.log" | sed 's/^/  /' | tee -a "$SUMMARY"
fi

note "overall: $([[ $status -eq 0 ]] && echo PASS || echo FAIL)"
exit $status

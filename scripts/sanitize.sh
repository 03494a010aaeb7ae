#!/usr/bin/env bash
# Builds rocketkit._C with AddressSanitizer + UndefinedBehaviorSanitizer (CPU only) into
# build/sanitize, stages it next to a copy of the Python sources, and runs the native tests
# and the fuzz tests against it. Exits non-zero on any failure or sanitizer report.
# Leaves the installed package and the shared build/ tree alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUILD=$ROOT/build/sanitize
STAGE=$BUILD/stage
LOG=$BUILD/pytest.log
start=$(date +%s)

mkdir -p "$BUILD"
# A wheel install builds in an isolated environment; plain CMake needs its tools here.
command -v cmake >/dev/null || "$PY" -m pip install -q "cmake>=3.24"
"$PY" -c "import pybind11" 2>/dev/null || "$PY" -m pip install -q "pybind11>=2.12"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DROCKETKIT_SANITIZE=ON -DROCKETKIT_ENABLE_CUDA=OFF \
  -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
  -DSKBUILD_PROJECT_VERSION="$version" >"$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log"; exit 1; }
cmake --build "$BUILD" --target _C -j "$(nproc)" >"$BUILD/build.log" 2>&1 \
  || { tail -50 "$BUILD/build.log"; exit 1; }

rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -r python/rocketkit "$STAGE/"
find "$STAGE" \( -name __pycache__ -o -name '*.so' \) -prune -exec rm -rf {} +
cp "$BUILD"/_C*.so "$STAGE/rocketkit/"

# The extension is instrumented but python3 is not, so the sanitizer runtimes (GCC ships
# ASan and UBSan as two libraries) must be loaded before anything else.
runtimes=""
for lib in libasan.so libubsan.so; do
  path=$("${CXX:-c++}" -print-file-name="$lib")
  if [[ "$path" != /* || ! -e "$path" ]]; then
    echo "sanitize.sh: ${CXX:-c++} has no $lib" >&2
    exit 1
  fi
  runtimes+="$path "
done

export LD_PRELOAD="$runtimes"
# CPython keeps its interned objects until exit by design: leaks are not findings here.
# A failed huge allocation must stay a MemoryError, as without ASan. Sanitizer reports go
# to fd 2, which --capture=sys leaves uncaptured.
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONMALLOC=malloc             # every Python allocation goes through ASan's malloc
export PYTHONUNBUFFERED=1              # keeps test output and sanitizer reports in order
export ROCKETKIT_FUZZ_EXAMPLES=${ROCKETKIT_FUZZ_EXAMPLES:-60}

# The editable install puts an import redirect in front of sys.path; drop it so that
# `rocketkit` resolves to the staged copy, and refuse to run against anything else.
set +e
PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$STAGE" 2>&1 <<'EOF' | tee "$LOG"
import sys
stage = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
import rocketkit
from rocketkit import _C
info = rocketkit.build_info()
print(f"sanitize.sh: rocketkit._C = {_C.__file__}, sanitize = {info['sanitize']}", flush=True)
if not _C.__file__.startswith(stage) or info["sanitize"] is not True:
    sys.exit("sanitize.sh: the staged, sanitized rocketkit._C was not the one imported")
import os, pytest
tests = [t for t in ("tests/test_errors.py", "tests/test_mckp.py", "tests/test_fuzz.py")
         if os.path.exists(t)]
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--capture=sys", *tests]))
EOF
rc=${PIPESTATUS[0]}
set -e

if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|SUMMARY: UndefinedBehaviorSanitizer" "$LOG"; then
  echo "sanitize.sh: sanitizer report found (see above)" >&2
  [[ $rc != 0 ]] || rc=1
fi
echo "sanitize.sh: exit $rc after $(( $(date +%s) - start )) s"
exit "$rc"

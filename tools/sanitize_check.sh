#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer
# (-DMLX_QSDPA_SANITIZE=ON) into its own venv, build/sanitize/venv (its CMake
# build in build/sanitize/cmake; the user's install and build/ are not
# touched), then runs the sanitizer subset of the oracle tests
# (tests/test_sanitize_subset.py, `-m sanitize`) under the sanitizers. Any
# report (an out-of-bounds read or write, undefined behaviour) fails the run
# with the report's stack on stderr.
#
#   bash tools/sanitize_check.sh            # extra arguments go to pytest
#   bash tools/sanitize_check.sh -m "not slow"   # the whole suite instead
#
# The first run builds everything (~2 min on two cores); later runs
# recompile only what changed. The venv's Python needs tomllib (>= 3.11).
#
# Python and MLX are not instrumented, so the compiler's sanitizer runtimes
# are preloaded (LD_PRELOAD) and leak detection is off (CPython keeps its
# objects alive at exit). GCC only (CXX, default g++): its libasan/libubsan.
# PYTHON picks the interpreter of the venv (default python3).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
export CXX=${CXX:-g++}
dir="$root/build/sanitize"
venv="$dir/venv"

"$CXX" --version | head -1 | grep -qi -e gcc -e 'g++' ||
  { echo "sanitize_check: CXX=$CXX is not GCC (this script preloads GCC's libasan/libubsan)" >&2; exit 2; }
asan=$("$CXX" -print-file-name=libasan.so)
ubsan=$("$CXX" -print-file-name=libubsan.so)
for lib in "$asan" "$ubsan"; do
  [ -f "$lib" ] || { echo "sanitize_check: $CXX has no $(basename "$lib") (install GCC's sanitizer runtimes)" >&2; exit 2; }
done

echo "== sanitize_check: building with -DMLX_QSDPA_SANITIZE=ON into $venv"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Release (-O3, the kernel as users get it) with line tables for the reports,
# unstripped. A build directory of its own, so that the option never leaks
# into the regular build's CMake cache.
# The build requirements go into the venv itself (--no-build-isolation), so
# that a second run recompiles only what changed.
mkdir -p "$dir"
"$venv/bin/python" - <<'PY' > "$dir/build-requires.txt"
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))
PY
"$venv/bin/python" -m pip install -q -r "$dir/build-requires.txt"
"$venv/bin/python" -m pip install -q --no-build-isolation \
  -C build-dir=build/sanitize/cmake \
  -C cmake.define.MLX_QSDPA_SANITIZE=ON \
  -C cmake.define.CMAKE_CXX_FLAGS=-g1 \
  -C install.strip=false \
  ".[cpu,test]"

# (Found without importing it: the import needs the runtimes preloaded.)
pkg=$("$venv/bin/python" -c "import importlib.util as u; print(u.find_spec('mlx_qsdpa').submodule_search_locations[0])")
# Refuse to pass vacuously: the installed library must be instrumented.
if ! readelf -d "$pkg/libmlx_qsdpa.so" | grep -q 'libasan'; then
  echo "sanitize_check: $pkg/libmlx_qsdpa.so is not built with ASan" >&2
  exit 2
fi

echo "== sanitize_check: tests under ASan + UBSan ($asan, $ubsan)"
export LD_PRELOAD="$asan $ubsan${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:print_summary=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONMALLOC=malloc   # Python's own allocations through ASan too
# Two passes: one kernel thread first, so that a bug's first report comes out
# whole (GCC's libasan and libubsan each serialize only their own reports, and
# two threads hitting the same bug interleave them), then the default thread
# count (the thread pool's own paths). --capture=sys: the reports are written
# to file descriptor 2, which pytest's default capture would swallow when the
# process dies.
for threads in 1 default; do
  echo "== sanitize_check: MLX_QSDPA_NUM_THREADS=$threads"
  set +e
  if [ "$threads" = default ]; then
    (unset MLX_QSDPA_NUM_THREADS; "$venv/bin/python" -m pytest tests -m sanitize -v -p no:cacheprovider --capture=sys "$@")
  else
    MLX_QSDPA_NUM_THREADS=$threads "$venv/bin/python" -m pytest tests -m sanitize -v -p no:cacheprovider --capture=sys "$@"
  fi
  rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "sanitize_check: no test was selected (-m sanitize): the subset is gone" >&2
    exit 1
  elif [ "$rc" -ne 0 ]; then
    echo "sanitize_check: FAILED (pytest exit status $rc, MLX_QSDPA_NUM_THREADS=$threads)" >&2
    exit "$rc"
  fi
done
# Every code of every format through every CPU kernel variant this machine
# runs, and the oracle sweep on each variant: the decoders' loads and stores
# at every element width.
echo "== sanitize_check: every code and the sweep on every CPU kernel variant"
set +e
"$venv/bin/python" -m pytest tests/test_decode_codes.py tests/test_cpu_variants.py -q \
  -p no:cacheprovider --capture=sys "$@"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  echo "sanitize_check: FAILED (pytest exit status $rc, decode codes / variants)" >&2
  exit "$rc"
fi
echo "== sanitize_check: passed"

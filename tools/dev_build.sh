#!/usr/bin/env bash
# Developer build without pip: configures and builds into build/<name> and
# assembles an importable package at build/<name>/pkg/mlx_qsdpa (the .py
# files are symlinked from python/mlx_qsdpa, the built libraries copied).
#
#   tools/dev_build.sh dev            # then: PYTHONPATH=build/dev/pkg python -m pytest
#   tools/dev_build.sh dev -DFOO=ON   # extra CMake arguments
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=${1:-dev}
shift || true
bdir="$root/build/$name"
py=${PYTHON:-python3}
mlx_cmake=$("$py" -m mlx --cmake-dir)/share/cmake/MLX
[ -n "${MLX_CMAKE_DIR:-}" ] && mlx_cmake=$MLX_CMAKE_DIR
mkdir -p "$root/build"
cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$py")" \
  -Dnanobind_DIR="$("$py" -m nanobind --cmake_dir)" \
  -DMLX_DIR="$mlx_cmake" "$@" >"$bdir.configure.log" 2>&1 || { cat "$bdir.configure.log"; exit 1; }
cmake --build "$bdir" -j"$(nproc)"
# The install tree has the wheel's layout: <prefix>/mlx_qsdpa/{_ext, lib,
# include, share/cmake, metallib}. The .py files are linked from the source.
rm -rf "$bdir/pkg"
cmake --install "$bdir" --prefix "$bdir/pkg" >/dev/null
pkg="$bdir/pkg/mlx_qsdpa"
for f in "$root"/python/mlx_qsdpa/*.py "$root"/python/mlx_qsdpa/*.pyi "$root"/python/mlx_qsdpa/py.typed; do
  [ -e "$f" ] && ln -sf "$f" "$pkg/"
done
echo "dev_build: PYTHONPATH=$bdir/pkg"

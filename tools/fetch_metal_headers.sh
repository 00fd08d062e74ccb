#!/usr/bin/env bash
# Downloads the macOS wheel of mlx-metal of the MLX version we build against
# (the installed mlx, else 0.32.4; MLX_METAL_VERSION overrides) and unpacks
# its headers into build/mlx-metal-<version>/: mlx/backend/metal/*.h and
# metal-cpp, which the Linux compile check of the Metal host code
# (tests/metal/test_metal_host_compile.py) compiles csrc/backends/metal/*.cpp
# against. Idempotent: does nothing when the headers are already there.
#
#   bash tools/fetch_metal_headers.sh            # prints the unpacked directory
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
installed=$("$py" -c "import mlx.core as mx; print(mx.__version__)" 2>/dev/null || true)
version=${MLX_METAL_VERSION:-${installed:-0.32.4}}
dest="$root/build/mlx-metal-$version"
marker="$dest/mlx/include/mlx/backend/metal/device.h"
if [ -f "$marker" ] && [ -d "$dest/mlx/include/metal_cpp" ]; then
  echo "$dest"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --only-binary=:all: \
  --platform macosx_14_0_arm64 --python-version 3.12 \
  -d "$tmp" "mlx-metal==$version"
wheel=$(ls "$tmp"/mlx_metal-*.whl)
rm -rf "$dest.partial"
mkdir -p "$dest.partial"
# Only the headers are needed (the wheel also holds libmlx and mlx.metallib).
"$py" - "$wheel" "$dest.partial" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("mlx/include/") or n.startswith("mlx/share/")]
    z.extractall(out, names)
PY
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "$dest"

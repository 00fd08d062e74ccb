#!/usr/bin/env bash
# Downloads the macOS wheel of mlx-metal (same version as the MLX we build
# against) and unpacks it into build/mlx-metal-<version>/. It carries the
# headers the Metal host code compiles against: mlx/backend/metal/*.h and
# metal-cpp. Used by the Linux compile check of csrc/metal/*.cpp
# (tests/metal/test_host_compile.py). Idempotent: does nothing when the
# headers are already there.
#
#   bash tools/fetch_metal_headers.sh            # prints the unpacked directory
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=${MLX_METAL_VERSION:-0.32.4}
dest="$root/build/mlx-metal-$version"
marker="$dest/mlx/include/mlx/backend/metal/device.h"
if [ -f "$marker" ] && [ -d "$dest/mlx/include/metal_cpp" ]; then
  echo "$dest"
  exit 0
fi
py=${PYTHON:-python3}
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

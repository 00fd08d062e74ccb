#!/usr/bin/env bash
# The CPU kernel's arm64 NEON variant, cross-compiled and run under
# qemu-user: tests/cpu/kernel_check.cpp attends random data of every format
# with it and compares with a float64 reference. Needs Debian's
# g++-aarch64-linux-gnu and qemu-user (apt-get install g++-aarch64-linux-gnu
# qemu-user); CXX and QEMU override the tools.
set -euo pipefail
cd "$(dirname "$0")/.."
CXX="${CXX:-aarch64-linux-gnu-g++}"
QEMU="${QEMU:-$(command -v qemu-aarch64 || command -v qemu-aarch64-static || true)}"
[ -n "$QEMU" ] || { echo "qemu-aarch64 not found (apt-get install qemu-user)" >&2; exit 1; }
out=build/check-arm64
mkdir -p "$out"
flags=(-std=c++20 -O2 -Icsrc -Wall -Wno-psabi)
variant=(-DQSDPA_CPU_VARIANT=kVariantArm64Neon)
"$CXX" "${flags[@]}" "${variant[@]}" -DQSDPA_CPU_VARIANT_NS=arm64_neon \
  -DQSDPA_CPU_VARIANT_NAME='"arm64-neon"' -ffp-contract=fast -c csrc/backends/cpu/kernel.cpp -o "$out/kernel.o"
# The kernel's code must really be NEON vector code (W = 4 floats per q register).
fmla=$(aarch64-linux-gnu-objdump -d "$out/kernel.o" | grep -c 'fmla.*v[0-9]*\.4s' || true)
[ "$fmla" -gt 0 ] || { echo "the arm64 kernel has no NEON fmla" >&2; exit 1; }
"$CXX" "${flags[@]}" "${variant[@]}" -static tests/cpu/kernel_check.cpp "$out/kernel.o" -o "$out/kernel_check"
"$QEMU" "$out/kernel_check"

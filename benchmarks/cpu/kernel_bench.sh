#!/usr/bin/env bash
# Builds benchmarks/cpu/kernel_bench.cpp with the x86-64-v3 variant of the
# CPU kernel (the flags of cmake/cpu_variants.cmake) and runs it:
#   bash benchmarks/cpu/kernel_bench.sh [Lk [bits [Lq [MODE [group_size]]]]]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=build/kernel-bench
mkdir -p "$out"
def=(-DQSDPA_CPU_VARIANT=kVariantX86V3 -DQSDPA_CPU_VARIANT_NS=x86_64_v3 -DQSDPA_CPU_VARIANT_NAME='"x86-64-v3"')
g++ -std=c++20 -O3 -Icsrc "${def[@]}" -ffp-contract=fast -Wno-psabi -march=x86-64-v3 \
  -c csrc/backends/cpu/kernel.cpp -o "$out/kernel.o"
g++ -std=c++20 -O2 -Icsrc "${def[@]}" benchmarks/cpu/kernel_bench.cpp "$out/kernel.o" -o "$out/kernel_bench"
"$out/kernel_bench" "$@"

#!/usr/bin/env bash
# One call's GPU time (Nsight Compute) of the main decode shape, for other
# commits' whole source trees built beside the working tree: how a refactor
# is held to "no slower" on one machine, in one run.
#
#   git archive -o base.tar <commit>             # here; carry base.tar over
#   bash benchmarks/cuda/ab_trees.sh base=base.tar [name=file.tar ...]
#
# Each archive is unpacked into its own folder and built there with its own
# tools/dev_build.sh; the working tree is built as "tree". Then, AB_ROUNDS
# times (default 3), every build runs benchmarks/cuda/profile.py (3 calls per
# context; the first call of a process is cold) under ncu, in turn, so that
# clock drift meets every build alike. Lines go to $QSDPA_GPU_LOGS/ab.txt
# as `<name>.<round> ctx=N grid=(...) us: t1 t2 t3`. Needs /tmp/gpu/env.sh
# sourced (../shared/GPU.md). AB_CTXS: the contexts (4096,32768,131072).
set -uo pipefail
out=${QSDPA_GPU_LOGS:-/tmp/qsdpa-out}
mkdir -p "$out"
ctxs=${AB_CTXS:-4096,32768,131072}
root=$(pwd)
names=()
declare -A pkgs

build_tree() { # name, source folder
  if (cd "$2" && PYTHON=python3 bash tools/dev_build.sh cuda -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CUDA_ARCHITECTURES="${QSDPA_CUDA_ARCH:-90}") > "$out/ab_build_$1.log" 2>&1; then
    names+=("$1")
    pkgs[$1]="$2/build/cuda/pkg"
  else
    echo "ab_trees: the build of $1 failed (see $out/ab_build_$1.log)" | tee -a "$out/ab.txt"
    tail -20 "$out/ab_build_$1.log"
  fi
}

for spec in "$@"; do
  name=${spec%%=*} file=${spec#*=}
  dir=/tmp/qsdpa-ab-$name
  rm -rf "$dir" && mkdir -p "$dir/build" && tar xf "$file" -C "$dir" || { echo "ab_trees: cannot unpack $file"; continue; }
  build_tree "$name" "$dir"
done
build_tree tree "$root"

for round in $(seq "${AB_ROUNDS:-3}"); do
  for name in "${names[@]}"; do
    PYTHONPATH=${pkgs[$name]}:$PYTHONPATH timeout 180 ncu --clock-control none --metrics gpu__time_duration.sum \
      --kernel-name regex:qsdpa python3 "$root/benchmarks/cuda/profile.py" "$ctxs" > "$out/ab_raw.txt" 2>&1
    python3 "$root/benchmarks/cuda/ncu_table.py" "$out/ab_raw.txt" "$ctxs" 3 "$name.$round" >> "$out/ab.txt"
  done
done
cat "$out/ab.txt"

#!/usr/bin/env bash
# One GPU round: build against MLX's CUDA build, check, test, sanitize,
# benchmark. Run from the repo root after the two staging
# commands of ../shared/tools/gpu-stage.sh (source /tmp/gpu/env.sh first).
#
#   bash benchmarks/cuda/run_gpu.sh STEP...   (build smoke tests sanitizer bench)
#
# Logs go to $QSDPA_GPU_LOGS (default /tmp/qsdpa-out); a short summary is
# printed last. Where $OUT is set (the device tool's folder, of which only a
# few files come back), every finished step refreshes $OUT/logs.tgz (all the
# logs) and $OUT/summary.txt, so a command cut off by its time limit still
# returns what it did. QSDPA_GPU_DEADLINE_S: steps that would start later
# than this many seconds into the command are skipped (and listed).
set -uo pipefail
out=${QSDPA_GPU_LOGS:-/tmp/qsdpa-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
pkg=build/cuda/pkg
mkdir -p build
summary=()

step_build() {
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$out/gpu.txt" 2>&1
  python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" >> "$out/gpu.txt" 2>&1
  local t0=$SECONDS
  # RelWithDebInfo: the GPU machine's g++ (/opt/gcc) cannot run lto-wrapper,
  # and nanobind links its module with LTO in Release builds only.
  if PYTHON=python3 bash tools/dev_build.sh cuda -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      ${QSDPA_CUDA_ARCH:+-DCMAKE_CUDA_ARCHITECTURES=$QSDPA_CUDA_ARCH} > "$out/build.log" 2>&1; then
    summary+=("build: ok ($((SECONDS - t0)) s)")
  else
    summary+=("build: FAILED ($((SECONDS - t0)) s)"); tail -40 "$out/build.log"; return 1
  fi
  PYTHONPATH=$pkg:$PYTHONPATH python3 -c "import mlx_qsdpa as q; print('backend', q.gpu_backend())" >> "$out/gpu.txt" 2>&1
  grep -E "registers|spill" "$out/build.log" | sort | uniq -c | sort -rn | head -5 >> "$out/gpu.txt" || true
}

# Nsight Compute's GPU time of every decode kernel that a command runs
# (unlocked clocks: the clocks a user's run sees): ncu_durations SECONDS CMD...
ncu_durations() {
  PYTHONPATH=$pkg:$PYTHONPATH timeout "$1" ncu --clock-control none --metrics gpu__time_duration.sum \
    --kernel-name regex:qsdpa "${@:2}"
}

# A Python script or module run with the CUDA kernels' test overrides:
# overrides [--kernel simt] [--splits N] [--workspace pool] (-m MODULE | SCRIPT) [ARGS...]
overrides() {
  python3 benchmarks/cuda/with_overrides.py "$@"
}

step_smoke() {
  PYTHONPATH=$pkg:$PYTHONPATH timeout 300 python3 benchmarks/cuda/smoke.py > "$out/smoke.log" 2>&1
  summary+=("smoke: $(tail -1 "$out/smoke.log")")
  grep FAIL "$out/smoke.log" | head -8
}

step_tests() {
  local t0=$SECONDS
  QSDPA_DEVICE=gpu PYTHONPATH=$pkg:$PYTHONPATH timeout 420 python3 -m pytest tests -m "not slow and not sanitize" -q --maxfail=40 -p no:cacheprovider \
    -n 8 --timeout 300 --ignore=tests/metal > "$out/tests_gpu.log" 2>&1
  summary+=("tests (QSDPA_DEVICE=gpu): $(tail -1 "$out/tests_gpu.log") [$((SECONDS - t0)) s]")
  grep -E "^(FAILED|ERROR)" "$out/tests_gpu.log" | head -10
}

step_tests_variants() { # the pool fallback for partials and counters; the merge tree at many split counts (tests/conftest.py sets the test overrides from these variables)
  local t0=$SECONDS f="$out/tests_variants.log"
  : > "$f"
  for v in QSDPA_CUDA_WORKSPACE=pool QSDPA_CUDA_SPLITS=3 QSDPA_CUDA_SPLITS=100; do
    env $v QSDPA_DEVICE=gpu PYTHONPATH=$pkg:$PYTHONPATH timeout 300 python3 -m pytest tests/test_correctness.py \
      tests/test_masks.py tests/test_views.py tests/test_many_calls.py -q --maxfail=20 -p no:cacheprovider -n 8 \
      --timeout 300 > "$out/tv.log" 2>&1
    echo "$v: $(tail -1 "$out/tv.log")" >> "$f"
    grep -E "^(FAILED|ERROR)" "$out/tv.log" | head -5 >> "$f"
  done
  rm -f "$out/tv.log"
  summary+=("tests, variants: $(tr '\n' ';' < "$f") [$((SECONDS - t0)) s]")
}

step_tune() { # split counts (0: the default plan), quant_sdpa only
  : > "$out/tune.txt"
  for s in 0 1 8 16 32 64 128; do
    PYTHONPATH=$pkg:$PYTHONPATH overrides --splits "$s" -m mlx_qsdpa bench --device gpu \
      --layers 16 --no-progress --methods quant_sdpa --ctx 256,4096,32768,131072 2>&1 | \
      awk -v s=$s '/quant_sdpa/ && !/bench/ {print "splits=" s " " $0}' >> "$out/tune.txt"
  done
  summary+=("tune: $out/tune.txt")
  cat "$out/tune.txt"
}

step_cpu() { # the CPU kernel on this host's CPU: the oracle files on each variant it runs, the ISA test, a 32K bench on 2 threads and on all
  local t0=$SECONDS f="$out/cpu.txt" v t
  { lscpu | grep -E "^(Model name|CPU\(s\))"; grep -o -w -E "avx512[a-z]+|avx2|fma|f16c" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
    PYTHONPATH=$pkg:$PYTHONPATH python3 -c "from mlx_qsdpa import _ext; print('variants', _ext.cpu_variants(), 'default', _ext.cpu_variant())"
  } > "$f" 2>&1
  for v in $(PYTHONPATH=$pkg:$PYTHONPATH python3 -c "from mlx_qsdpa import _ext; print(' '.join(n for n, ok in _ext.cpu_variants() if ok))"); do
    QSDPA_CPU_VARIANT=$v QSDPA_DEVICE=cpu PYTHONPATH=$pkg:$PYTHONPATH timeout 300 python3 -m pytest tests/test_correctness.py \
      tests/test_decode_codes.py tests/test_formats.py tests/test_views.py tests/test_masks.py tests/test_nonfinite.py \
      tests/test_large_d.py tests/test_cpu_variants.py -q -p no:cacheprovider -n 8 --timeout 300 > "$out/tcpu.log" 2>&1
    echo "oracle files on $v: $(tail -1 "$out/tcpu.log")" >> "$f"
    grep -E "^(FAILED|ERROR)" "$out/tcpu.log" | head -5 >> "$f"
  done
  PYTHONPATH=$pkg:$PYTHONPATH timeout 120 python3 -m pytest tests/test_cpu_isa.py -q -p no:cacheprovider > "$out/tcpu.log" 2>&1
  echo "test_cpu_isa: $(tail -1 "$out/tcpu.log")" >> "$f"
  for t in 2 0; do
    echo "== MLX_QSDPA_NUM_THREADS=${t/#0/all}" >> "$f"
    (if [ "$t" != 0 ]; then export MLX_QSDPA_NUM_THREADS=$t; fi
     PYTHONPATH=$pkg:$PYTHONPATH timeout 200 python3 -m mlx_qsdpa bench --device cpu --ctx 32768 --no-progress \
       --methods quant_sdpa,fp16_sdpa >> "$f" 2>&1)
  done
  summary+=("cpu: $(grep -c passed "$f") oracle runs, see $f [$((SECONDS - t0)) s]")
  cat "$f"
}

step_tests_simt() { # tests/conftest.py forces the generic kernel from QSDPA_CUDA_KERNEL
  local t0=$SECONDS
  QSDPA_CUDA_KERNEL=simt QSDPA_DEVICE=gpu PYTHONPATH=$pkg:$PYTHONPATH timeout 300 python3 -m pytest \
    tests/test_correctness.py tests/test_masks.py tests/test_views.py tests/test_formats.py \
    tests/test_nonfinite.py tests/test_format_table.py tests/test_rotation_codebook.py -q --maxfail=20 \
    -p no:cacheprovider -n 8 --timeout 300 > "$out/tests_simt.log" 2>&1
  summary+=("tests, generic kernel forced: $(tail -1 "$out/tests_simt.log") [$((SECONDS - t0)) s]")
}

step_sanitizer() {
  local t0=$SECONDS
  # A representative subset: both kernels, one and two passes, masks,
  # sinks, strided views, every format family.
  QSDPA_DEVICE=gpu PYTHONPATH=$pkg:$PYTHONPATH timeout 420 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest -q -p no:cacheprovider tests/test_views.py tests/test_masks.py \
    -k "not peak" > "$out/sanitizer.log" 2>&1
  local rc=$?
  summary+=("compute-sanitizer memcheck: rc=$rc, $(grep -E 'ERROR SUMMARY' "$out/sanitizer.log" | tail -1); pytest: $(grep -E 'passed|failed' "$out/sanitizer.log" | tail -1) [$((SECONDS - t0)) s]")
}

bench() { # name, extra args
  local name=$1; shift
  PYTHONPATH=$pkg:$PYTHONPATH timeout 300 python3 -m mlx_qsdpa bench --device gpu --layers 16 --no-progress \
    --json "$out/bench_$name.json" "$@" > "$out/bench_$name.txt" 2>&1
  echo "== $name: python -m mlx_qsdpa bench --device gpu --layers 16 $*" >> "$out/bench_all.txt"
  cat "$out/bench_$name.txt" >> "$out/bench_all.txt"
}

step_bench() {
  : > "$out/bench_all.txt"
  bench main --ctx 4096,16384,32768,131072
  bench b8 --batch 8 --ctx 4096,32768
  bench bits8 --bits 8 --ctx 32768,131072
  bench mxfp4 --mode mxfp4 --bits 4 --group-size 32 --ctx 32768,131072
  bench lq4 --lq 4 --ctx 32768,131072
  summary+=("bench: $out/bench_all.txt")
}

step_formats() { # issue 22's formats against affine 4-bit, in one process each
  local a
  for a in "" "--mode turbo --bits 3" "--mode turbo --bits 4" "--rotation hadamard" \
      "--mode turbo --bits 3 --rotation hadamard" "--mode turbo --bits 3 --value-mode affine --value-bits 4"; do
    # shellcheck disable=SC2086
    bench "formats${a// /_}" --ctx 4096,32768,131072 --methods quant_sdpa,fp16_sdpa $a
  done
  summary+=("formats: $out/bench_all.txt")
}

step_quickbench() {
  : > "$out/bench_all.txt"
  bench quick --ctx 256,4096,32768,131072 --methods quant_sdpa,fp16_sdpa
  bench quick_lq4 --lq 4 --ctx 32768 --methods quant_sdpa,fp16_sdpa
}

step_graphs() { # the issue's protocol (16 calls per eval) beside MLX's graph settings and 64 calls per eval: how much of a batched call is the host's
  local setting name
  for setting in "" MLX_MAX_OPS_PER_BUFFER=1 MLX_MAX_OPS_PER_BUFFER=4 MLX_USE_CUDA_GRAPHS=0; do
    name=graphs_${setting:-default}
    (if [ -n "$setting" ]; then export "${setting?}"; fi
     bench "$name" --ctx 4096,32768,131072 --methods quant_sdpa,fp16_sdpa,qmm_path)
    sed -i "s/^== $name:/== ${setting:-(MLX defaults)} $name:/" "$out/bench_all.txt"
  done
  bench graphs_layers64 --layers 64 --ctx 4096,32768,131072 --methods quant_sdpa,fp16_sdpa,qmm_path
  summary+=("graphs: $out/bench_all.txt")
}

step_chain() { # calls in sequence (each call's queries are the previous output), as a model's layers
  bench chain --chain --ctx 4096,32768,131072 --methods quant_sdpa,fp16_sdpa
}

step_profile() { # kernel times and limits under Nsight Compute
  PYTHONPATH=$pkg:$PYTHONPATH timeout 300 ncu --kernel-name regex:qsdpa --launch-skip 0 --launch-count 12 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section LaunchStats python3 benchmarks/cuda/profile.py 4096,32768,131072 > "$out/ncu.txt" 2>&1
  grep -E "qsdpa_|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Stall|Grid Size|Waves Per SM|One or More" "$out/ncu.txt" | head -150 > "$out/ncu_summary.txt"
  summary+=("profile: $out/ncu_summary.txt")
}

step_e2e() { # needs mlx-lm staged (tools/gpu_stage_mlx_lm.sh)
  QSDPA_DEVICE=gpu PYTHONPATH=$pkg:$PYTHONPATH timeout 300 python3 -m pytest tests/test_mlx_lm.py -q -p no:cacheprovider \
    > "$out/tests_mlx_lm_gpu.log" 2>&1
  summary+=("mlx-lm tests (QSDPA_DEVICE=gpu): $(tail -1 "$out/tests_mlx_lm_gpu.log")")
  PYTHONPATH=$pkg:$PYTHONPATH timeout 300 python3 -m mlx_qsdpa bench --e2e --device gpu --no-progress \
    > "$out/bench_e2e.txt" 2>&1
  summary+=("bench --e2e: $out/bench_e2e.txt")
  tail -12 "$out/bench_e2e.txt"
}

step_gdb() { # a host backtrace of the bad-input tests that crashed on the GPU
  QSDPA_DEVICE=gpu PYTHONPATH=$pkg:$PYTHONPATH timeout 240 cuda-gdb -batch -ex run -ex bt -ex quit --args \
    python3 -m pytest -x -q -p no:cacheprovider tests/test_errors.py > "$out/gdb.log" 2>&1
  summary+=("gdb test_errors: $(grep -E 'passed|failed|SIGSEGV|SIGFPE' "$out/gdb.log" | tail -2 | tr '\n' ' ')")
}

step_overhead() { # host building / recording / GPU wait per call (benchmarks/cuda/overhead.py)
  local f="$out/overhead.txt"
  { echo "== default"; PYTHONPATH=$pkg:$PYTHONPATH python3 benchmarks/cuda/overhead.py
    echo "== one split (one kernel, no partials)"
    PYTHONPATH=$pkg:$PYTHONPATH overrides --splits 1 benchmarks/cuda/overhead.py 256,4096,32768
    echo "== 64 calls per eval"; PYTHONPATH=$pkg:$PYTHONPATH python3 benchmarks/cuda/overhead.py 256,32768 64
  } > "$f" 2>&1
  summary+=("overhead: $f")
  cat "$f"
}

step_ncutime() { # GPU duration of each kernel of one call (Nsight Compute, duration only); default plan and 16 splits; NCU_LQ: query length (1; other lengths get their own files)
  local lq=${NCU_LQ:-1} f="$out/ncutime.txt" fs="$out/ncutime_summary.txt"
  if [ "$lq" != 1 ]; then f="$out/ncutime_lq$lq.txt"; fs="$out/ncutime_lq${lq}_summary.txt"; fi
  : > "$f"
  for s in ${NCU_SPLITS:-0 16}; do
    echo "== splits=$s Lq=$lq" >> "$f"
    ncu_durations 240 python3 benchmarks/cuda/with_overrides.py --splits "$s" benchmarks/cuda/profile.py \
      256,4096,32768,131072 "$lq" >> "$f" 2>&1
  done
  grep -E "^==|qsdpa|gpu__time_duration" "$f" | sed -E 's/^ +//' | cut -c1-60 > "$fs"
  summary+=("kernel durations: $fs")
  cat "$fs"
}

step_sweep() { # one call's GPU time (ncu) per forced split count: SWEEP_SPLITS (0: the plan), SWEEP_CTXS, SWEEP_ARGS (profile.py options), SWEEP_LABEL
  local f="$out/sweep.txt" ctxs=${SWEEP_CTXS:-4096,16384,32768,131072} s
  for s in ${SWEEP_SPLITS:-0 16 32 48 64}; do
    ncu_durations 120 python3 benchmarks/cuda/with_overrides.py --splits "$s" benchmarks/cuda/profile.py "$ctxs" \
      ${SWEEP_ARGS:-} > "$out/sweep_raw.txt" 2>&1
    python3 benchmarks/cuda/ncu_table.py "$out/sweep_raw.txt" "$ctxs" 3 "${SWEEP_LABEL:-main} splits=$s" >> "$f"
  done
  summary+=("sweep: $f")
}

# One call of every shape the issue reports (the plan's split count), labelled SHAPES_LABEL:
# SHAPES (default: all) from main (4-bit gs64 fp16 Lq=1), bits8, mxfp4, nvfp4, lq4, bf16, b8.
shape_sweep() { # label, shapes...
  local label=$1 sh ctxs args; shift
  for sh in "$@"; do
    case $sh in
      main) ctxs=256,4096,32768,131072 args="" ;;
      bits8) ctxs=32768,131072 args="--bits 8" ;;
      mxfp4) ctxs=32768,131072 args="--mode mxfp4 --bits 4 --group-size 32" ;;
      nvfp4) ctxs=32768,131072 args="--mode nvfp4 --bits 4 --group-size 16" ;;
      lq4) ctxs=4096,32768,131072 args="4" ;; # profile.py's second positional argument: Lq
      bf16) ctxs=4096,32768,131072 args="--dtype bfloat16" ;;
      b8) ctxs=4096,32768 args="--batch 8" ;;
      *) echo "shapes: unknown shape $sh" >> "$out/sweep.txt"; continue ;;
    esac
    SWEEP_SPLITS=0 SWEEP_CTXS=$ctxs SWEEP_ARGS=$args SWEEP_LABEL="$label $sh" step_sweep
  done
}

step_shapes() { # one call of each shape (shape_sweep): SHAPES, SHAPES_LABEL
  # shellcheck disable=SC2086
  shape_sweep "${SHAPES_LABEL:-this}" ${SHAPES:-main bits8 mxfp4 nvfp4 lq4 bf16 b8}
  grep -E "^${SHAPES_LABEL:-this} " "$out/sweep.txt" | tail -40
}

# A/B of the kernels of other commits on one machine: AB_TARS="name=file.tar ..."
# (each `git archive <commit> csrc/backends/cuda > file.tar`, carried to the machine), then the
# working tree's own kernels as "tree"; each is built and swept (step_shapes) in turn, twice
# over (AB_ROUNDS). Extracted with `tar xmf`: plain `tar xf` restores the archive's older
# mtimes, so ninja would rebuild nothing and the "other" kernels would be the last ones built.
# Files that an archive lacks stay as the tree has them.
step_ab() {
  local own round spec name file
  own=$(mktemp /tmp/qsdpa-ab-XXXX.tar)
  tar cf "$own" csrc/backends/cuda
  for round in $(seq "${AB_ROUNDS:-2}"); do
    for spec in ${AB_TARS:-} "tree=$own"; do
      name=${spec%%=*} file=${spec#*=}
      tar xmf "$file" || { summary+=("ab: cannot extract $file"); continue; }
      step_build > /dev/null 2>&1 || { summary+=("ab: build of $name failed"); continue; }
      SHAPES_LABEL="$name.$round" step_shapes > /dev/null
    done
  done
  tar xmf "$own"
  rm -f "$own"
  summary+=("ab: $out/sweep.txt")
  grep -E "^[^ ]+\.[0-9]+ " "$out/sweep.txt" | cut -c1-100
}

step_floor() { # the GPU time of near-empty kernels with the decode kernel's 32K launch shape (launch_floor.cu)
  nvcc -std=c++17 -O3 -arch=sm_90 -I. -o /tmp/launch_floor benchmarks/cuda/launch_floor.cu > "$out/floor.txt" 2>&1 &&
    timeout 120 ncu --clock-control none --metrics gpu__time_duration.sum /tmp/launch_floor >> "$out/floor.txt" 2>&1
  grep -E "^ +floor_|gpu__time_duration|^launch_floor:" "$out/floor.txt" | sed -E 's/^ +//' | cut -c1-70 > "$out/floor_summary.txt"
  summary+=("floor: $out/floor_summary.txt")
  cat "$out/floor_summary.txt"
}

step_stalls() { # why warps wait, one 128K call: stall reasons per issued instruction, and per SASS line
  local f="$out/stalls.txt"
  PYTHONPATH=$pkg:$PYTHONPATH timeout 240 ncu --kernel-name regex:qsdpa --launch-skip 2 --launch-count 1 \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum,smsp__cycles_active.avg" \
    python3 benchmarks/cuda/profile.py 131072 > "$f" 2>&1
  PYTHONPATH=$pkg:$PYTHONPATH timeout 240 ncu --kernel-name regex:qsdpa --launch-skip 2 --launch-count 1 \
    --section WarpStateStats --section SourceCounters --import-source no --page source --print-source sass --csv \
    python3 benchmarks/cuda/profile.py 131072 > "$out/stalls_source.csv" 2>&1
  python3 benchmarks/cuda/stall_lines.py "$out/stalls_source.csv" > "$out/stalls_lines.txt" 2>&1
  summary+=("stalls: $f, $out/stalls_lines.txt")
  grep -E "stalled|inst_executed|cycles_active" "$f" | sed -E 's/^ +//' | sort -k3 -rn | head -30
}

# The logs so far, as one archive and a summary in $OUT.
save() {
  [ -n "${OUT:-}" ] || return 0
  printf '%s\n' "${summary[@]}" > "$out/summary.txt"
  cp "$out/summary.txt" "$OUT/summary.txt"
  tar czf "$OUT/logs.tgz.part" -C "$out" . && mv "$OUT/logs.tgz.part" "$OUT/logs.tgz"
}

steps_left=$#
for s in "$@"; do
  steps_left=$((steps_left - 1))
  if [ -n "${QSDPA_GPU_DEADLINE_S:-}" ] && [ "$SECONDS" -ge "$QSDPA_GPU_DEADLINE_S" ]; then
    summary+=("$s: skipped (past QSDPA_GPU_DEADLINE_S=$QSDPA_GPU_DEADLINE_S at ${SECONDS} s)")
    save
    continue
  fi
  "step_$s" || true
  save
done
echo "==== summary ===="
printf '%s\n' "${summary[@]}"
[ -f "$out/bench_all.txt" ] && grep -E "^==|quant_sdpa|fp16_sdpa|qmm_path|dequant" "$out/bench_all.txt" | cut -c1-90
exit 0
